"""Launcher pieces that need no allocation: option parsing, countdown, update rounds, CLI errors."""

from __future__ import annotations

import gc
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest

from balsam.launcher.entry import LauncherError, Partition, parse_partition, parse_tag, split_nodes
from balsam.launcher.job_mode import Countdown, IdleTimer, JobMode
from balsam.launcher.wake import WakeEvent
from balsam.client.status_updater import split_into_rounds
from balsam.platform import NodeInfo
from balsam.util import format_threads_cpu, pause_gc_for_start_up, resume_gc_after_start_up, threads_cpu_seconds

from launcher_helpers import mpi_mode


def test_partition_syntax_of_balsam_07() -> None:
    assert parse_partition("mpi:2:role=leader:x=1") == Partition("mpi", 2, {"role": "leader", "x": "1"})
    assert parse_partition("serial:126") == Partition("serial", 126, {})
    for bad, why in [("mpi", "MODE:NODES"), ("mpi:two", "not an integer"), ("mpi:0", "at least 1"), ("mpi:1:oops", "KEY=VALUE")]:
        with pytest.raises(LauncherError, match=why):
            parse_partition(bad)
    assert parse_tag("system=H2O") == ("system", "H2O")


def test_nodes_are_split_into_contiguous_partitions() -> None:
    nodes = [NodeInfo(str(i), f"h{i}", [0]) for i in range(5)]
    groups = split_nodes(nodes, [Partition("mpi", 2), Partition("serial", 3)])
    assert [[n.hostname for n in g] for g in groups] == [["h0", "h1"], ["h2", "h3", "h4"]]
    with pytest.raises(LauncherError, match="ask for 6 nodes but the allocation has 5"):
        split_nodes(nodes, [Partition("mpi", 3), Partition("serial", 3)])


def test_a_partition_killed_by_a_signal_fails_the_launcher() -> None:
    from balsam.launcher.entry import partitions_exit_code

    assert partitions_exit_code([0, 0]) == 0 and partitions_exit_code([]) == 0
    assert partitions_exit_code([0, -9]) == 137  # max() gave 0: a killed partition read as success
    assert partitions_exit_code([2, -15]) == 2


def test_countdown_keeps_a_safety_margin() -> None:
    start = time.time()
    long = Countdown(60, start_time=start)
    assert long.margin_sec == 120 and long.grace_sec == 10
    assert 58 * 60 - 2 < long.remaining_sec() <= 58 * 60 and long.remaining_min() == 57
    short = Countdown(0.5, start_time=start)
    assert short.margin_sec == pytest.approx(3.0) and not short.expired
    assert Countdown(1, start_time=start - 61).expired


def test_idle_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The timer's clock, stepped by the test: with real 60 ms sleeps, the "not expired just after
    # idle()" check failed whenever a loaded host paused the test 50 ms between the two lines.
    from balsam.launcher import job_mode

    now = [1000.0]
    monkeypatch.setattr(job_mode, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    timer = IdleTimer(0.05)
    timer.busy()
    now[0] += 0.06
    assert not timer.expired
    timer.idle()
    assert not timer.expired
    now[0] += 0.06
    assert timer.expired


def test_update_rounds_hold_one_update_per_job_in_order() -> None:
    updates = [{"id": 1, "state": "RUNNING"}, {"id": 2, "state": "RUNNING"}, {"id": 1, "state": "RUN_DONE"},
               {"id": 3, "state": "FAILED"}, {"id": 1, "state": "X"}]
    rounds = split_into_rounds(updates)
    assert [[(u["id"], u["state"]) for u in r] for r in rounds] == [
        [(1, "RUNNING"), (2, "RUNNING"), (3, "FAILED")], [(1, "RUN_DONE")], [(1, "X")]]


def test_a_wake_event_set_again_does_not_notify_and_never_loses_a_wake_up() -> None:
    wake = WakeEvent()
    notified = []
    wake._cond.notify_all = lambda: notified.append(1)  # type: ignore[method-assign]
    wake.set()
    wake.set()  # set already: nothing to do (no lock, no notify)
    assert wake.is_set() and notified == [1]
    wake.clear()
    wake.set()
    assert notified == [1, 1]

    # The loop's protocol (clear, look, wait) against setters that publish first: every item is
    # seen, and the loop never sleeps past its timeout with one waiting.
    wake = WakeEvent()
    items: list[int] = []
    seen: list[int] = []
    late = []

    def producer() -> None:
        for i in range(20000):
            items.append(i)
            wake.set()

    thread = threading.Thread(target=producer)
    thread.start()
    while len(seen) < 20000:
        wake.clear()
        while len(seen) < len(items):
            seen.append(items[len(seen)])
        if len(seen) < 20000 and not wake.wait(1.0):
            late.append(len(items) - len(seen))
    thread.join()
    # A wait that timed out with items waiting would be a lost wake-up.
    assert seen == list(range(20000)) and not [n for n in late if n]


def test_job_mode_base_class_is_the_plugin_contract() -> None:
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.launcher.modes.serial import SerialMode
    from balsam.plugins.manager import get_plugin_manager

    pm = get_plugin_manager()
    assert pm.load_driver("job_mode", "mpi") is MPIMode and pm.load_driver("job_mode", "serial") is SerialMode
    assert issubclass(MPIMode, JobMode) and issubclass(SerialMode, JobMode)
    with pytest.raises(TypeError):
        JobMode(None)  # abstract: run() is required


def run_cli(*args: str, cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balsam.launcher", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_errors_are_one_line(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BALSAM_SITE_PATH"}
    result = run_cli("-j", "mpi", "-t", "1", cwd=str(tmp_path), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: not inside a Balsam site") and result.stderr.count("\n") == 1

    site = tmp_path / "site"
    (site / "log").mkdir(parents=True)
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text("launcher:\n  idle_ttl_sec: 1\n")
    for args, message in [
        (("-j", "mpx", "-t", "1"), "unknown job_mode 'mpx'"),
        (("-j", "mpi", "-t", "0"), "wall time must be positive"),
        (("-j", "mpi", "-t", "1", "--part", "mpi:x"), "node count 'x' is not an integer"),
        (("-j", "mpi", "-t", "1", "--part", "mpi:3"), "partitions ask for 3 nodes"),
    ]:
        result = run_cli(*args, cwd=str(site), env=env)
        assert result.returncode == 1, result
        assert result.stderr.startswith("Error: ") and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    (site / "settings.yml").write_text("launcher:\n  platform: nosuchplatform\n")
    result = run_cli("-j", "mpi", "-t", "1", cwd=str(site), env=env)
    assert result.returncode == 1 and "launcher.platform" in result.stderr and "nosuchplatform" in result.stderr


def test_balsam_launcher_command_is_registered() -> None:
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "balsam"), "launcher", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--job-mode" in result.stdout and "--part" in result.stdout


def test_plain_command_lines_skip_bash_and_shell_syntax_keeps_it(tmp_path) -> None:
    from balsam.launcher.app_run import AppProcess, direct_argv

    env = dict(os.environ)
    assert direct_argv("sleep 300", env)[1:] == ["300"]
    assert direct_argv("/bin/ls -l 'a b'", env) == ["/bin/ls", "-l", "a b"]
    # Unquoted lines are split without shlex: the same words as the shell (spaces only; \x0b is no separator).
    for plain in ["  sleep   1 2 ", "sleep a\x0bb", "sleep --x=1 -y"]:
        assert direct_argv(plain, env)[1:] == shlex.split(plain)[1:], plain
    for needs_shell in ["echo hi", "ls *.txt", "a && b", "cat < in", "FOO=1 env", "cd /tmp", "./app", "x $HOME",
                        "no-such-program-here x", "python3 -c 'print(1)'", "unbalanced 'quote"]:
        assert direct_argv(needs_shell, env) is None, needs_shell
    # An absolute path that is not executable goes through bash, which words the error in job.out.
    (tmp_path / "not-executable").write_text("")
    assert direct_argv(f"{tmp_path / 'not-executable'} x", env) is None
    # Both paths give the job the same environment, working directory and output file.
    for cmd in ["env", "env;"]:  # exec'd directly / through bash
        workdir = tmp_path / ("direct" if cmd == "env" else "bash")
        workdir.mkdir()
        job_env = {k: v for k, v in env.items() if k != "HOME"}
        job_env.update(BALSAM_JOB_ID="7", QUOTED="a 'b' $c")
        proc = AppProcess(1, cmd, workdir, job_env)
        assert proc.wait(10) == 0
        seen = dict(line.split("=", 1) for line in (workdir / "job.out").read_text().splitlines() if "=" in line)
        assert seen["BALSAM_JOB_ID"] == "7" and seen["QUOTED"] == "a 'b' $c" and "HOME" not in seen


def _waiting(job_id: int, packing: int):
    from balsam.launcher.app_run import PreparedJob
    from balsam.launcher.node_manager import Demand

    return PreparedJob(job=None, id=job_id, workdir=".", cmdline="true", env={}, demand=Demand(node_packing_count=packing))


def test_mpi_mode_leases_the_free_nodes_plus_one_wave_ahead(tmp_path) -> None:
    mode = mpi_mode(tmp_path)
    # Idle partition of one node: what fits now and one more node's worth, waiting.
    first = mode._acquire_request()
    assert first["max_aggregate_nodes"] == 2.0 and first["max_nodes_per_job"] == 1 and first["probe"]
    assert first["count"] == mode.max_concurrent
    # Two half-node jobs running and two waiting: nothing more is leased until one ends.
    for job_id in (1, 2):
        mode.node_manager.assign(job_id, _waiting(job_id, 2).demand)
    mode.pending.extend([_waiting(3, 2), _waiting(4, 2)])
    assert mode._acquire_request() is None
    mode.node_manager.free(1)
    again = mode._acquire_request()
    assert again["max_aggregate_nodes"] == 0.5 and not again["probe"]
    assert again["count"] == mode.max_concurrent - 2


def test_mpi_mode_lookahead_respects_max_concurrent_mpiruns(tmp_path) -> None:
    mode = mpi_mode(tmp_path, max_concurrent_mpiruns=2)
    mode.pending.extend([_waiting(1, 64), _waiting(2, 64)])
    assert mode._acquire_request() is None  # two waiting already: as many as may run at once


def test_lease_ahead_is_one_wave_until_jobs_end_faster_than_acquires_return() -> None:
    from balsam.launcher.modes.mpi import LeaseAhead

    ahead = LeaseAhead(2, window_sec=1.0, round_trips=3, min_sec=0.25, max_sec=2.0)
    assert ahead.nodes(now=10.0) == 2 and ahead.min_request(2) == 0.01  # nothing ended yet: one wave
    ahead.job_ended(1.0, now=10.0)
    assert ahead.nodes(now=10.5) == 2  # a job a second: one wave covers the round trip
    for i in range(50):  # 50 half-node jobs in 0.5 s: 25 nodes freed in the last second
        ahead.job_ended(0.5, now=11.0 + i * 0.01)
    # 25 nodes/s over 3 round trips of 0.1 s (more than 0.25 s): 7.5 nodes, in whole waves of 2.
    ahead.round_trip_sec = 0.1
    assert ahead.nodes(now=11.5) == 8
    assert ahead.min_request(8) == 3  # half the extra lookahead: acquires come in batches
    ahead.acquire_took(10.0)  # a slow API: capped at max_sec (2 s) of exits
    assert ahead.nodes(now=11.5) == 50
    assert ahead.nodes(now=13.0) == 2  # no exit within the window: one wave again


def test_lease_ahead_counts_a_young_launcher_over_its_short_life() -> None:
    from balsam.launcher.modes.mpi import LeaseAhead

    ahead = LeaseAhead(1, window_sec=1.0, round_trips=3, min_sec=0.25, max_sec=2.0)
    for i in range(4):  # the first 0.2 s: 4 whole-node exits = 20 nodes/s, not 4
        ahead.job_ended(1.0, now=5.0 + i * 0.05)
    assert ahead.freed_nodes_per_sec(now=5.2) == pytest.approx(20.0)
    assert ahead.nodes(now=5.2) == 6  # 20 nodes/s x 0.3 s


def test_mpi_mode_leases_further_ahead_while_short_jobs_end(tmp_path) -> None:
    import time

    mode = mpi_mode(tmp_path)
    now = time.monotonic()
    for i in range(40):
        mode.lease_ahead.job_ended(0.5, now - 0.5 + i * 0.01)
    mode.pending.extend(_waiting(100 + i, 2) for i in range(4))  # two nodes' worth waiting
    request = mode._acquire_request()
    # Free node (1) + lookahead (whole waves of 1 node covering 3 round trips of exits) - waiting (2).
    lookahead = mode.lease_ahead.nodes(time.monotonic())
    assert lookahead > 1 and request["max_aggregate_nodes"] == pytest.approx(1 + lookahead - 2)


def test_mpi_mode_acquire_returns_prepared_jobs_and_the_unbuildable_end_failed(tmp_path) -> None:
    import types

    from balsam.launcher.app_run import PreparedJob
    from balsam.launcher.modes.mpi import Unbuildable

    mode = mpi_mode(tmp_path)

    class Preparer:
        batches: list = []

        def end_stale_runs(self, jobs):  # the acquired batch's earlier runs, ended together before preparing
            self.batches.append([job.id for job in jobs])

        def prepare(self, job):
            if job.id == 2:
                from balsam.launcher.app_run import JobBuildError

                raise JobBuildError("no such app")
            return _waiting(job.id, 2)

    class Source:
        def acquire(self, count, **limits):
            return [types.SimpleNamespace(id=1), types.SimpleNamespace(id=2), types.SimpleNamespace(id=3)]

    class Updater:
        def __init__(self):
            self.puts = []

        def put(self, job_id, state, **fields):
            self.puts.append((job_id, str(state), fields))

    mode.preparer = Preparer()
    got = mode._fetch(Source(), mode._acquire_request())
    assert [type(j) for j in got] == [PreparedJob, Unbuildable, PreparedJob] and got[1].reason == "no such app"
    assert mode.preparer.batches == [[1, 2, 3]]
    updater = Updater()
    mode._take(got, updater)
    assert [p.id for p in mode.pending] == [1, 3]
    assert updater.puts == [(2, "FAILED", {"state_data": {"error": "no such app"}})]


def test_early_lease_takes_the_filters_of_the_settings_read_after_it_opened(monkeypatch) -> None:
    from balsam.launcher import service_calls

    class Lease:
        filter_tags: dict = {}
        sort_by = None
        wrap = None
        closed = False

        def close(self, **kwargs) -> None:
            self.closed = True

    prefetched = []

    class Models:
        class Job:
            _from_api = staticmethod(lambda row: ("job", row))

        class ApplicationDefinition:
            @staticmethod
            def prefetch_site(site_id, limit):
                prefetched.append((site_id, limit))
                return 0

    opened = Lease()
    # The Session is opened with the REST client alone; the models come after it (their import
    # overlaps its round trip), then the site's apps are prefetched by the same thread.
    monkeypatch.setattr(service_calls, "open_raw_lease", lambda site_id, batch_job_id: opened)
    monkeypatch.setattr(service_calls, "api_models", lambda: Models)
    early = service_calls.EarlyLease.start(3, 7)
    assert early.matches(3, 7) and not early.matches(3, 8)
    lease = early.take({"experiment": "xpcs"}, "long_large_first")
    assert lease is opened and lease.filter_tags == {"experiment": "xpcs"} and lease.sort_by == "long_large_first"
    assert lease.wrap({"id": 1}) == ("job", {"id": 1})
    early.join()
    assert prefetched == [(3, service_calls.APP_PREFETCH_LIMIT)] and early.apps_prefetched == 0
    early.discard()  # taken: discarding leaves it open for its owner
    assert not opened.closed
    unused = service_calls.EarlyLease.start(3, 7)
    unused.discard()
    assert opened.closed


def test_early_lease_hands_over_the_open_error_and_a_failed_app_prefetch_is_harmless(monkeypatch) -> None:
    from balsam.launcher import service_calls

    def refused(site_id, batch_job_id):
        raise RuntimeError("no session for you")

    monkeypatch.setattr(service_calls, "open_raw_lease", refused)
    early = service_calls.EarlyLease.start(3, 7)
    with pytest.raises(RuntimeError, match="no session for you"):
        early.take({}, None)

    class Lease:
        wrap = None
        closed = False

        def close(self, **kwargs) -> None:
            self.closed = True

    class Models:
        class Job:
            _from_api = staticmethod(lambda row: row)

        class ApplicationDefinition:
            @staticmethod
            def prefetch_site(site_id, limit):
                raise ConnectionError("API gone")

    opened = Lease()
    monkeypatch.setattr(service_calls, "open_raw_lease", lambda site_id, batch_job_id: opened)
    monkeypatch.setattr(service_calls, "api_models", lambda: Models)
    early = service_calls.EarlyLease.start(3, 7)
    assert early.take({}, None) is opened
    early.join()
    assert early.apps_prefetched is None and not opened.closed


def test_the_launcher_process_does_not_import_httpx_command_line_tool() -> None:
    # `python -m balsam.launcher` runs the package's __main__; the REST client still works.
    code = ("import sys, balsam.launcher.__main__, httpx; "
            "assert 'httpx._main' in sys.modules and sys.modules['httpx._main'] is None; "
            "assert 'rich.console' not in sys.modules and 'pygments' not in sys.modules; "
            "httpx.Client(base_url='http://127.0.0.1:9').close()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_threads_cpu_is_read_by_thread_name() -> None:
    if not os.path.exists("/proc/self/task"):
        assert threads_cpu_seconds() == []  # not Linux: nothing to read, and the log says "not read"
        return
    release = threading.Event()
    burned = [threading.Event(), threading.Event()]

    def burn(done: threading.Event) -> None:
        while time.thread_time() < 0.1:  # 100 ms of this thread's own CPU, whatever the machine's speed
            pass
        done.set()
        release.wait(30)  # alive (and so listed) until the reading below

    workers = [threading.Thread(target=burn, args=(done,), name="burner") for done in burned]
    for worker in workers:
        worker.start()
    try:
        assert all(done.wait(30) for done in burned)
        rows = {name: (n, sec) for name, n, sec in threads_cpu_seconds()}
    finally:
        release.set()
        for worker in workers:
            worker.join()
    assert "MainThread" in rows
    n, sec = rows["burner"]
    assert n == 2 and sec >= 0.15  # two threads of at least 100 ms each, read in clock ticks of 10 ms


def test_threads_cpu_format() -> None:
    assert format_threads_cpu([("MainThread", 1, 0.674), ("spawner-reader", 2, 0.13)]) == \
        "MainThread 0.67 s, spawner-reader x2 0.13 s"
    assert format_threads_cpu([]) == "not read"


def test_the_collector_pauses_for_start_up_and_comes_back_with_start_ups_objects_frozen() -> None:
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    try:
        pause_gc_for_start_up()
        assert not gc.isenabled()
        resume_gc_after_start_up()
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen_before
        resume_gc_after_start_up()  # idempotent
        assert gc.isenabled()
        # Off by someone else's choice: the start-up pause neither owns nor undoes it.
        gc.disable()
        pause_gc_for_start_up()
        resume_gc_after_start_up()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_python_m_balsam_launcher_starts_with_the_collector_paused() -> None:
    # Up to the job mode's start (where entry.py resumes it): --help ends inside the CLI.
    code = ("import gc, runpy, sys\n"
            "sys.argv = ['python -m balsam.launcher', '--help']\n"
            "try:\n    runpy.run_module('balsam.launcher', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('collector', gc.isenabled())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "collector False"


def test_text_sent_in_state_data_never_holds_what_the_server_refuses() -> None:
    """NUL (the server answers 422) and lone surrogates (no UTF-8 body can hold one) become U+FFFD,
    in the output tail and in every reason the launcher reports; other text is sent as it is."""
    import orjson

    from balsam.launcher.runner import report_exit, report_failed, report_timeout
    from balsam.util import api_text

    class Recorder:
        def __init__(self) -> None:
            self.updates: list[dict] = []

        def put(self, job_id, state, state_timestamp=None, state_data=None, **fields) -> None:
            self.updates.append({"id": job_id, "state": str(state), "state_data": state_data, **fields})

    assert api_text("tab\tbell\x07 é ok") == "tab\tbell\x07 é ok"
    assert api_text("a\x00b\udce9c\ud800") == "a\ufffdb\ufffdc\ufffd"
    updater = Recorder()
    report_exit(updater, 1, 3, "out\x00put")
    report_failed(updater, 2, "cannot open /data/caf\udce9: no such file")
    report_timeout(updater, 3, "stopped (\x00)")
    assert [u["state_data"] for u in updater.updates] == [
        {"returncode": 3, "error": "out\ufffdput"},
        {"error": "cannot open /data/caf\ufffd: no such file"},
        {"reason": "stopped (\ufffd)"},
    ]
    assert b"\\u0000" not in orjson.dumps(updater.updates)  # and orjson encodes them (no surrogate left)


def test_tail_file_replaces_nul_bytes(tmp_path) -> None:
    from balsam.util import tail_file

    out = tmp_path / "job.out"
    out.write_bytes(b"first\nbinary\x00\xff data\nlast\n")
    assert tail_file(out, 2) == "binary\ufffd\ufffd data\nlast"


def test_serial_workers_keep_their_mpi_identity_from_tasks_but_not_user_settings() -> None:
    from balsam.launcher.modes.serial_worker import drop_rank_bootstrap_environment

    env = {name: "x" for name in (
        # hydra (MPICH), as `mpiexec -n 2 env` shows here; Cray PALS; PMIx; Open MPI
        "PMI_FD", "PMI_RANK", "PMI_SIZE", "PMI_HOSTNAME", "HYDI_CONTROL_FD", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
        "PALS_RANKID", "PALS_NODEID", "PALS_APID", "PMI_CONTROL_PORT", "PMI_SHARED_SECRET",
        "PMIX_RANK", "PMIX_NAMESPACE", "PMIX_SERVER_URI41", "OMPI_COMM_WORLD_RANK", "OMPI_MCA_orte_hnp_uri",
        "OMPI_MCA_ess_base_vpid",
    )}
    kept = {name: "y" for name in (
        "MPICH_GPU_SUPPORT_ENABLED", "I_MPI_PIN", "HYDRA_LAUNCHER", "OMPI_MCA_btl", "PMIX_MCA_gds", "FI_PROVIDER",
        "PBS_NODEFILE", "SLURM_JOB_ID", "PATH", "OMP_NUM_THREADS",
    )}
    environ = {**env, **kept}
    assert drop_rank_bootstrap_environment(environ) == sorted(env)
    assert environ == kept
