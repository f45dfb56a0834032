"""End to end: a real uvicorn server, real `python -m balsam.launcher` processes, real mpiexec + mpi4py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launcher_helpers import SESSION_EXPIRE_SEC, events_of, make_runnable, rerun_timeouts_until_done, wait_for_states
from launcher_harness import finish, start_launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

MODES = ["mpi", "serial"]


def console(proc: subprocess.Popen) -> str:
    return Path(proc.console_path).read_text()


def traced(trace: Path, seconds: object) -> str:
    """A command template that sleeps ``seconds`` between lines ``start <id> <t>`` / ``end <id> <t>`` in ``trace``."""
    return (f"bash -c 'echo start $BALSAM_JOB_ID $(date +%s.%N) >> {trace}; sleep {seconds}; "
            f"echo end $BALSAM_JOB_ID $(date +%s.%N) >> {trace}'")


def intervals(trace: Path) -> list[tuple[float, float]]:
    """(start, end) pairs from lines ``start <t>`` / ``end <t>`` written by the test apps."""
    starts, ends = {}, {}
    for line in trace.read_text().split("\n"):
        parts = line.split()
        if len(parts) == 3:
            (starts if parts[0] == "start" else ends)[parts[1]] = float(parts[2])
    return [(starts[k], ends[k]) for k in starts if k in ends]


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = peak = 0
    for _, step in points:
        level += step
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("mode", MODES)
def test_jobs_run_with_output_events_and_logs(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = new_site(idle_ttl_sec=2)

    class Hello(ApplicationDefinition):
        site = name
        # Under mpi mode the template is what mpiexec starts: shell syntax goes inside bash -c.
        command_template = "bash -c 'echo hello {{ who }} from $BALSAM_JOB_ID; echo to-stderr >&2'"

    Hello.sync()
    ids = make_runnable(Hello.submit(workdir=f"hello/{i}", who=f"w{i}", save=False) for i in range(4))
    batch_job = BatchJob.objects.create(site_id=Hello.resolve_site_id(), project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode=mode, scheduler_id=4242)
    # The job template exports BALSAM_BATCH_JOB_ID; without it the launcher looks its BatchJob up by
    # the scheduler id the platform reads from the environment.
    env = {"BALSAM_BATCH_JOB_ID": str(batch_job.id)} if mode == "mpi" else {"BALSAM_LOCAL_JOB_ID": "4242"}
    t0 = time.time()
    proc = start_launcher(path, mode, 1, env=env)
    jobs = wait_for_states(ids, {"RUN_DONE"}, timeout=60)
    assert finish(proc) == 0, console(proc)
    assert time.time() - t0 < 40  # left after idle_ttl_sec, long before the 1-minute wall time
    for i, job_id in enumerate(ids):
        out = (path / "data" / f"hello/{i}" / "job.out").read_text()
        assert f"hello w{i} from {job_id}" in out and "to-stderr" in out
        assert jobs[job_id].return_code == 0 and jobs[job_id].batch_job_id == batch_job.id
    for job_id, rows in events_of(ids).items():
        moves = [(e.from_state, e.to_state) for e in rows]
        assert moves[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE")], moves
        assert rows[-2].data == {"num_nodes": 1.0}
    logs = [p.name for p in (path / "log").iterdir()]
    assert any(n.startswith(f"{mode}_mode_") and n.endswith(".log") for n in logs), logs
    # The last line says where the launcher's CPU went, by thread (read as the loop stopped).
    text = "".join(p.read_text() for p in (path / "log").glob(f"{mode}_mode_*.log"))
    done = next(ln for ln in text.splitlines() if ("serial master done" if mode == "serial" else "mpi mode done") in ln)
    by_thread = done.split("by thread, until the stop: ")[1]
    assert "MainThread " in by_thread and ("prefetch " if mode == "serial" else "mpi-acquire") in by_thread, done


@pytest.mark.parametrize("mode", MODES)
def test_the_launcher_gives_the_default_postprocess_in_its_own_update(mode: str, new_site) -> None:
    """No processing module runs here. A job whose app keeps the default postprocess reaches
    JOB_FINISHED through the launcher's update alone (RUN_DONE and POSTPROCESSED in one call, at the
    exit's time); an app with its own postprocess stays RUN_DONE for the processing module, and so
    does every job of a site whose settings turn this off (Balsam 0.7's way)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2, default_postprocess_in_launcher=True)  # the setting's default
    off_name, off_path = new_site(idle_ttl_sec=2, default_postprocess_in_launcher=False)

    class Plain(ApplicationDefinition):
        site = name
        command_template = "echo plain"

    class Hooked(ApplicationDefinition):
        site = name
        command_template = "echo hooked"

        def postprocess(self) -> None:
            self.job.state = "POSTPROCESSED"

    class PlainElsewhere(ApplicationDefinition):
        site = off_name
        command_template = "echo plain"

    for app in (Plain, Hooked, PlainElsewhere):
        app.sync()
    plain = make_runnable(Plain.submit(workdir=f"plain/{i}", save=False) for i in range(3))
    hooked = make_runnable([Hooked.submit(workdir="hooked", save=False)])
    elsewhere = make_runnable([PlainElsewhere.submit(workdir="plain", save=False)])
    procs = [start_launcher(path, mode, 1), start_launcher(off_path, mode, 1)]
    wait_for_states(plain, {"JOB_FINISHED"})
    wait_for_states(hooked + elsewhere, {"RUN_DONE"})
    assert [finish(p) for p in procs] == [0, 0]
    history = events_of(plain + hooked + elsewhere)
    for job_id in plain:
        rows = history[job_id]
        assert [(e.from_state, e.to_state) for e in rows][-4:] == [
            ("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE"), ("RUN_DONE", "POSTPROCESSED"), ("POSTPROCESSED", "JOB_FINISHED")]
        assert rows[-3].timestamp == rows[-2].timestamp  # postprocessed at the exit, in the same update
    for job_id in hooked + elsewhere:
        assert [e.to_state for e in history[job_id]][-2:] == ["RUNNING", "RUN_DONE"]


@pytest.mark.parametrize("mode", MODES)
def test_run_error_carries_returncode_and_output_tail(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=2, error_tail_num_lines=3)

    class Broken(ApplicationDefinition):
        site = name
        command_template = "bash -c 'for i in 1 2 3 4 5 6; do echo line$i; done; echo fatal: disk on fire >&2; exit 3'"

    class Fine(ApplicationDefinition):
        site = name
        command_template = "echo fine"

    Broken.sync()
    Fine.sync()
    ids = make_runnable([Broken.submit(workdir="broken", save=False), Fine.submit(workdir="fine", save=False)])
    proc = start_launcher(path, mode, 1)
    jobs = wait_for_states(ids, {"RUN_ERROR", "RUN_DONE"})
    assert finish(proc) == 0
    assert str(jobs[ids[0]].state) == "RUN_ERROR" and jobs[ids[0]].return_code == 3
    assert str(jobs[ids[1]].state) == "RUN_DONE"
    error_event = events_of([ids[0]])[ids[0]][-1]
    assert error_event.to_state == "RUN_ERROR"
    assert error_event.data["returncode"] == 3
    assert error_event.data["error"].splitlines() == ["line5", "line6", "fatal: disk on fire"]
    assert Job.objects.get(id=ids[0]).state == "RUN_ERROR"


@pytest.mark.parametrize("mode", MODES)
def test_run_error_with_a_nul_in_the_output_tail_still_reaches_run_error(mode: str, new_site) -> None:
    """The server refuses NUL characters: the tail is sent with each NUL replaced (U+FFFD). The
    tail used to go as it was, the RUN_ERROR was refused (HTTP 422), the job stayed RUNNING until
    its session expired and then ran again as RUN_TIMEOUT, forever."""
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=2, error_tail_num_lines=3)

    class Binary(ApplicationDefinition):
        site = name
        command_template = "bash -c 'printf \"partial\\000binary\\n\"; echo last line; exit 3'"

    Binary.sync()
    ids = make_runnable([Binary.submit(workdir="nul", save=False)])
    proc = start_launcher(path, mode, 1)
    jobs = wait_for_states(ids, {"RUN_ERROR", "RUN_TIMEOUT"}, timeout=SESSION_EXPIRE_SEC + 30)
    assert finish(proc) == 0
    assert str(jobs[ids[0]].state) == "RUN_ERROR" and jobs[ids[0]].return_code == 3
    error_event = events_of(ids)[ids[0]][-1]
    assert error_event.to_state == "RUN_ERROR"
    assert error_event.data["error"].splitlines() == ["partial\ufffdbinary", "last line"]
    assert Job.objects.get(id=ids[0]).state == "RUN_ERROR"


@pytest.mark.parametrize("mode", MODES)
def test_wall_time_ends_jobs_as_run_timeout_and_they_rerun(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=2)

    class SlowFirstTime(ApplicationDefinition):
        site = name
        # The first run outlives the launcher's wall time; the re-run finds the marker and succeeds.
        command_template = "bash -c 'if [ -f ran-once ]; then echo second run; else touch ran-once; echo first run; sleep 300; fi'"

    SlowFirstTime.sync()
    ids = make_runnable([SlowFirstTime.submit(workdir="slow", save=False)])
    # 9 s (it was 12 s: the job needs only to be running before the stop); the launcher stops its
    # margin early (10 %, at least 1 s), so at ~8 s, past 0.8 of the wall time checked below.
    wall_min = 0.15
    t0 = time.time()
    # The allocation starts now (as the job template tells a launcher), however slowly the launcher
    # itself starts on a loaded machine.
    proc = start_launcher(path, mode, wall_min, env={"BALSAM_LAUNCHER_START_TIME": repr(t0)})
    jobs = wait_for_states(ids, {"RUN_TIMEOUT"}, timeout=40)
    assert finish(proc, 30) == 0
    timeout_event = events_of(ids)[ids[0]][-1]
    assert timeout_event.to_state == "RUN_TIMEOUT" and "wall time" in timeout_event.data["reason"]
    ended = timeout_event.timestamp.replace(tzinfo=timeout_event.timestamp.tzinfo or __import__("datetime").timezone.utc)
    assert ended.timestamp() - t0 < wall_min * 60, "the launcher must end its jobs before the allocation ends"
    assert ended.timestamp() - t0 > wall_min * 60 * 0.8  # not too early either

    # What the processing module's default handle_timeout() does: re-queue the job.
    job = jobs[ids[0]]
    job.state = "RESTART_READY"
    job.save()
    proc2 = start_launcher(path, mode, 1)
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc2) == 0
    assert "second run" in (path / "data" / "slow" / "job.out").read_text()
    states = [e.to_state for e in events_of(ids)[ids[0]]]
    assert states[-5:] == ["RUNNING", "RUN_TIMEOUT", "RESTART_READY", "RUNNING", "RUN_DONE"]
    assert Job.objects.get(id=ids[0]).return_code == 0


@pytest.mark.parametrize("mode, packing, expected", [("serial", 1, 1), ("serial", 2, 2), ("mpi", 1, 1), ("mpi", 2, 2)])
def test_node_packing_limits_concurrency(mode: str, packing: int, expected: int, new_site) -> None:
    from balsam.api import ApplicationDefinition

    assert len(os.sched_getaffinity(0)) >= 2, "this test needs a node with at least 2 CPUs"
    name, path = new_site(idle_ttl_sec=2)
    trace = path / "trace.txt"

    class Tracer(ApplicationDefinition):
        site = name
        command_template = traced(trace, 0.4)

    Tracer.sync()
    ids = make_runnable(Tracer.submit(workdir=f"t/{i}", node_packing_count=packing, save=False) for i in range(8))
    proc = start_launcher(path, mode, 1)
    wait_for_states(ids, {"RUN_DONE"}, timeout=90)
    assert finish(proc) == 0
    spans = intervals(trace)
    assert len(spans) == 8
    # Never more concurrent tasks than node_packing_count allows on the one node (and the CPUs allow),
    # and the packing is actually used.
    assert max_overlap(spans) == expected


@pytest.mark.parametrize("mode", MODES)
def test_kill9_launcher_jobs_return_after_lease_expiry(mode: str, new_site) -> None:
    from balsam.api import Job

    name, path = new_site(idle_ttl_sec=15)
    from balsam.api import ApplicationDefinition

    class Sleeper(ApplicationDefinition):
        site = name
        command_template = (
            "bash -c 'echo start $(date +%s.%N) >> ../trace-$BALSAM_JOB_ID; sleep 2; "
            "echo end $(date +%s.%N) >> ../trace-$BALSAM_JOB_ID'"
        )

    Sleeper.sync()
    ids = make_runnable(Sleeper.submit(workdir=f"s/{i}", node_packing_count=2, save=False) for i in range(4))
    first = start_launcher(path, mode, 2)
    deadline = time.monotonic() + 30
    while Job.objects.filter(id=ids, state="RUNNING").count() < 2:
        assert time.monotonic() < deadline and first.poll() is None, console(first)
        time.sleep(0.1)
    running_before_kill = {j.id for j in Job.objects.filter(id=ids, state="RUNNING")}
    # RUNNING is reported when the task is spawned, before its shell writes the trace: wait for the
    # line, or a kill just after the spawn leaves one start to count instead of two.
    traces = [path / "data" / "s" / f"trace-{job_id}" for job_id in running_before_kill]
    while not all(t.exists() and "start" in t.read_text() for t in traces):
        assert time.monotonic() < deadline and first.poll() is None, console(first)
        time.sleep(0.05)
    # kill -9 the launcher and its MPI ranks (the whole process group); its lease stays on the server.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    second = start_launcher(path, mode, 2)

    # Act as the processing module's default handle_timeout: re-queue what comes back as RUN_TIMEOUT.
    requeued = rerun_timeouts_until_done(ids, 60)
    second.send_signal(signal.SIGTERM)
    finish(second)

    assert requeued == running_before_kill  # exactly the jobs that were running came back
    history = events_of(ids)
    for job_id in ids:
        rows = history[job_id]
        assert [e.to_state for e in rows].count("RUN_DONE") == 1  # none lost, none finished twice
        starts = [float(line.split()[1]) for line in (path / "data" / "s" / f"trace-{job_id}").read_text().splitlines()
                  if line.startswith("start")]
        if job_id in running_before_kill:
            timeout_event = next(e for e in rows if e.to_state == "RUN_TIMEOUT")
            assert "expired" in str(timeout_event.data).lower() or timeout_event.data
            expiry = timeout_event.timestamp.timestamp() if timeout_event.timestamp.tzinfo else \
                timeout_event.timestamp.replace(tzinfo=__import__("datetime").timezone.utc).timestamp()
            assert expiry >= killed_at + SESSION_EXPIRE_SEC - 1.5, "the lease was taken away before it expired"
            assert len(starts) == 2 and starts[1] >= expiry - 0.5, "re-run started while the dead launcher's lease was live"
        else:
            assert len(starts) == 1  # acquired but never started by the killed launcher: run once, by the second


def test_unbuildable_jobs_fail_with_reason_and_others_run(new_site) -> None:
    from balsam.api import App, ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class NeedsParam(ApplicationDefinition):
        site = name
        command_template = "echo {{ value }}"

    class Unloadable(ApplicationDefinition):
        site = name
        command_template = "echo never"

    NeedsParam.sync()
    Unloadable.sync()
    ids = make_runnable([
        NeedsParam.submit(workdir="ok", value="fine", save=False),
        NeedsParam.submit(workdir="missing", save=False),
        Unloadable.submit(workdir="corrupt", save=False),
    ])
    record = App.objects.get(id=Unloadable.__app_id__)
    record.serialized_class = "bm90IGEgZGlsbCBwYXlsb2Fk"  # base64 of "not a dill payload"
    record.save()
    proc = start_launcher(path, "mpi", 1)
    jobs = wait_for_states(ids, {"RUN_DONE", "FAILED"})
    assert finish(proc) == 0
    assert [str(jobs[i].state) for i in ids] == ["RUN_DONE", "FAILED", "FAILED"]
    history = events_of(ids)
    assert "command line" in history[ids[1]][-1].data["error"] and "value" in history[ids[1]][-1].data["error"]
    assert "loading the app" in history[ids[2]][-1].data["error"]


def test_python_run_app_returns_its_value(new_site) -> None:
    from balsam._api.app import parse_run_markers
    from balsam._api.codec import deserialize
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Adder(ApplicationDefinition):
        site = name

        def run(self, x, y):
            return x + y

    Adder.sync()
    ids = make_runnable([Adder.submit(workdir="add", x=2, y=3, save=False)])
    proc = start_launcher(path, "serial", 1)
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc) == 0
    value, exc = parse_run_markers((path / "data" / "add" / "job.out").read_text())
    assert exc is None and deserialize(value) == 5


def test_partitions_run_their_own_tagged_jobs(new_site) -> None:
    import json
    import socket

    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo mode=$BALSAM_JOB_MODE"

    Echo.sync()
    a = make_runnable(Echo.submit(workdir=f"a/{i}", tags={"part": "a"}, save=False) for i in range(2))
    b = make_runnable(Echo.submit(workdir=f"b/{i}", tags={"part": "b"}, save=False) for i in range(2))
    other = make_runnable([Echo.submit(workdir="other", tags={"part": "c"}, save=False)])
    host = socket.gethostname()
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(2)]
    proc = start_launcher(path, "mpi", 1, "--part", "mpi:1:part=a", "--part", "serial:1:part=b",
                          env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    wait_for_states(a + b, {"RUN_DONE"})
    assert finish(proc) == 0
    for i in range(2):
        assert "mode=mpi" in (path / "data" / f"a/{i}" / "job.out").read_text()
        assert "mode=serial" in (path / "data" / f"b/{i}" / "job.out").read_text()
    assert str(wait_for_states(other, {"PREPROCESSED"})[other[0]].state) == "PREPROCESSED"
    logs = {p.name.split("_mode_")[0] + p.suffix for p in (path / "log").iterdir() if "_mode_" in p.name}
    assert {"mpi.log", "serial.log"} <= logs


def test_serial_mode_spreads_tasks_over_worker_ranks(new_site) -> None:
    import json
    import socket

    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class WhichRank(ApplicationDefinition):
        site = name
        # The task's parent: a spawner process on every node, not the master or worker rank; the
        # spawner's parent: the rank (the rank's own PMI_RANK is not passed on to tasks).
        command_template = ("bash -c 'rank=$(($(ps -o ppid= -p $PPID))); "
                            "echo rank=$rank $(xargs -0 < /proc/$PPID/cmdline) $(xargs -0 < /proc/$rank/cmdline); sleep 0.3'")

    WhichRank.sync()
    ids = make_runnable(WhichRank.submit(workdir=f"r/{i}", node_packing_count=2, save=False) for i in range(8))
    host = socket.gethostname()
    # Two "nodes" on this host: rank 0 (master) runs node 0's tasks, rank 1 (worker) node 1's.
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(2)]
    proc = start_launcher(path, "serial", 1, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc) == 0
    lines = [(path / "data" / f"r/{i}" / "job.out").read_text().split() for i in range(8)]
    assert len({line[0] for line in lines}) == 2, lines  # under two rank processes
    assert all(any(arg.endswith("spawner.py") for arg in line[1:]) for line in lines), lines
    assert all("balsam.launcher.modes.serial_worker" in line for line in lines), lines


def test_serial_mode_tasks_do_not_inherit_the_worker_ranks_mpi_identity(new_site) -> None:
    """Every rank of a multi-node serial partition was started by mpiexec and has its PMI
    variables (PMI_FD, PMI_RANK, HYDI_CONTROL_FD, MPI_LOCALRANKID...); a task given them took itself
    for that rank: an mpi4py task failed with "PMI_Init returned -1". They are not passed on."""
    import json
    import socket
    import sys

    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class MPIHello(ApplicationDefinition):
        site = name
        command_template = ("bash -c 'env | grep -E \"^(PMI|PMIX|HYDI|MPI_LOCAL)\" | sort; "
                            f"{sys.executable} -c \"from mpi4py import MPI; print(\\\"size\\\", MPI.COMM_WORLD.Get_size())\"'")

    MPIHello.sync()
    ids = make_runnable(MPIHello.submit(workdir=f"m/{i}", node_packing_count=2, save=False) for i in range(4))
    host = socket.gethostname()
    # Two "nodes" on this host: rank 0 (master) runs node 0's tasks, rank 1 (worker) node 1's.
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(2)]
    proc = start_launcher(path, "serial", 1, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"})
    assert finish(proc) == 0
    outputs = [(path / "data" / f"m/{i}" / "job.out").read_text() for i in range(4)]
    assert {str(job.state) for job in jobs.values()} == {"RUN_DONE"}, outputs
    assert outputs == ["size 1\n"] * 4  # a singleton each, and no rank variable in its environment


#: Run as a job: prints whether SIGPIPE is ignored in this process and in the nearest ``mpiexec``
#: above it (found up the parent chain in /proc).
SIGPIPE_PROBE = r"""
import os, signal
bit = 1 << (signal.SIGPIPE - 1)
def ignored(pid):
    line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) & bit)
def parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
pid, launcher = os.getpid(), None
while pid > 1 and launcher is None:
    pid = parent(pid)
    if open(f"/proc/{pid}/comm").read().strip().startswith("mpiexec"):
        launcher = pid
# Python ignores SIGPIPE itself: the task's own disposition is read from its shell instead.
print("task", ignored(os.getppid()), "mpiexec", ignored(launcher) if launcher else None)
"""


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_the_mpi_launcher_keeps_sigpipe_ignored_and_the_task_gets_the_default(new_site, tmp_path, mode) -> None:
    """Both modes start their MPI launcher (mpi mode: one per job; serial mode on two nodes: the
    workers') with SIGPIPE ignored, so a late write cannot kill it after a run that succeeded
    (runner.local_pool); the job's own process has the default disposition."""
    import json
    import socket
    import sys

    from balsam.api import ApplicationDefinition

    probe = tmp_path / "sigpipe_probe.py"
    probe.write_text(SIGPIPE_PROBE)
    name, path = new_site(idle_ttl_sec=2)

    class Probe(ApplicationDefinition):
        site = name
        command_template = f"bash -c '{sys.executable} {probe}; true'"

    Probe.sync()
    ids = make_runnable([Probe.submit(workdir=f"p/{mode}", save=False)])
    env = {}
    if mode == "serial":  # two "nodes" on this host: the workers are started through mpiexec
        host = socket.gethostname()
        env["BALSAM_LAUNCHER_NODELIST"] = json.dumps([{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1],
                                                       "gpu_ids": []} for i in range(2)])
    proc = start_launcher(path, mode, 1, env=env)
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc) == 0
    assert (path / "data" / f"p/{mode}" / "job.out").read_text().split() == ["task", "False", "mpiexec", "True"]


def test_launcher_replaces_a_session_the_server_dropped(new_site) -> None:
    from balsam.api import ApplicationDefinition, Session

    name, path = new_site(idle_ttl_sec=6)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo {{ n }}"

    Echo.sync()
    first = make_runnable([Echo.submit(workdir="one", n=1, save=False)])
    proc = start_launcher(path, "mpi", 1)
    wait_for_states(first, {"RUN_DONE"})
    sessions = list(Session.objects.all())
    assert len(sessions) == 1
    sessions[0].delete()  # e.g. expired while the launcher could not reach the server
    second = make_runnable([Echo.submit(workdir="two", n=2, save=False)])
    wait_for_states(second, {"RUN_DONE"}, timeout=30)
    assert finish(proc) == 0
    log = next(p for p in (path / "log").iterdir() if p.name.startswith("mpi_mode_") and p.name.endswith(".log"))
    assert "is gone on the server" in log.read_text()


def test_serial_tasks_are_pinned_to_their_cpus(new_site) -> None:
    from balsam.api import ApplicationDefinition

    assert len(os.sched_getaffinity(0)) >= 2, "this test needs a node with at least 2 CPUs"
    name, path = new_site(idle_ttl_sec=2)

    class Affinity(ApplicationDefinition):
        site = name
        command_template = "bash -c 'grep Cpus_allowed_list /proc/self/status; sleep 0.3'"

    Affinity.sync()
    ids = make_runnable(Affinity.submit(workdir=f"cpu/{i}", node_packing_count=2, save=False) for i in range(4))
    proc = start_launcher(path, "serial", 1)
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc) == 0
    allowed = [(path / "data" / f"cpu/{i}" / "job.out").read_text().split()[-1] for i in range(4)]
    cpus = {str(c) for c in os.sched_getaffinity(0)}
    assert all(a in cpus for a in allowed), allowed  # one CPU each, not the whole node
    assert len(set(allowed)) == 2  # two tasks at a time, on different CPUs


def test_a_serial_task_of_two_threads_per_core_gets_two_hardware_threads(new_site) -> None:
    """The default platform's CPU ids are hardware threads: a task of 2 threads at 2 threads per
    core was pinned to one CPU (its thread count divided by threads_per_core as if ids were cores)."""
    from balsam.api import ApplicationDefinition

    assert len(os.sched_getaffinity(0)) >= 2, "this test needs a node with at least 2 CPUs"
    name, path = new_site(idle_ttl_sec=2)

    class Affinity(ApplicationDefinition):
        site = name
        command_template = "bash -c 'grep Cpus_allowed_list /proc/self/status; echo OMP=$OMP_NUM_THREADS'"

    Affinity.sync()
    ids = make_runnable([Affinity.submit(workdir="ht", threads_per_rank=2, threads_per_core=2, save=False)])
    proc = start_launcher(path, "serial", 1)
    wait_for_states(ids, {"RUN_DONE"})
    assert finish(proc) == 0
    out = (path / "data" / "ht" / "job.out").read_text().split()
    allowed, omp = out[-2], out[-1]
    pinned = set()
    for part in allowed.split(","):
        low, _, high = part.partition("-")
        pinned |= set(range(int(low), int(high or low) + 1))
    assert len(pinned) == 2 and omp == "OMP=2", (allowed, omp)


def test_multi_node_mpi_job_gets_whole_nodes(new_site) -> None:
    import json
    import socket

    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Ranks(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo rank $PMI_RANK of $PMI_SIZE; sleep 0.5'"

    Ranks.sync()
    host = socket.gethostname()
    # Two "nodes" on this host: the 2-node job takes both, the 1-node job must wait for it.
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(2)]
    big, small = make_runnable([Ranks.submit(workdir="big", num_nodes=2, ranks_per_node=2, save=False),
                                Ranks.submit(workdir="small", node_packing_count=4, save=False)])
    proc = start_launcher(path, "mpi", 1, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    wait_for_states([big, small], {"RUN_DONE"})
    assert finish(proc) == 0
    lines = sorted((path / "data" / "big" / "job.out").read_text().split("\n"))
    assert [line for line in lines if line] == [f"rank {r} of 4" for r in range(4)]
    history = events_of([big, small])
    assert history[big][-2].data == {"num_nodes": 2.0} and history[small][-2].data == {"num_nodes": 0.25}
    big_span = (history[big][-2].timestamp, history[big][-1].timestamp)
    small_start = history[small][-2].timestamp
    assert not (big_span[0] < small_start < big_span[1])  # never alongside the job holding every node


def test_mpi_mode_hands_short_jobs_over_in_the_spawner(new_site) -> None:
    """Short MPI jobs start on the resources of the one ahead the moment it exits (queued in the
    spawner, balsam.launcher.handover): each still starts once, never more than the node packing
    allows at a time, and its RUNNING carries the time it really started (not when it was queued)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)
    trace = path / "trace.txt"

    class Short(ApplicationDefinition):
        site = name
        command_template = traced(trace, 0.05)

    Short.sync()
    ids = make_runnable(Short.submit(workdir=f"short/{i}", node_packing_count=2, save=False) for i in range(16))
    proc = start_launcher(path, "mpi", 1)
    wait_for_states(ids, {"RUN_DONE"}, timeout=90)
    assert finish(proc) == 0
    spans = intervals(trace)
    assert len(spans) == 16 and max_overlap(spans) <= 2
    log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    handed = re.search(r"16 started \((\d+) by hand-over", log)
    assert handed and int(handed.group(1)) >= 1, log[-2000:]
    runs = []
    for job_id, rows in events_of(ids).items():
        moves = [(e.from_state, e.to_state) for e in rows]
        assert moves[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE")], (job_id, moves)
        runs.append((rows[-2].timestamp.timestamp(), rows[-1].timestamp.timestamp()))
    # RUNNING -> RUN_DONE as the events say: a job queued behind another is RUNNING from its start.
    assert max_overlap(runs) <= 2, sorted(runs)


def test_mpi_mode_gives_back_jobs_queued_behind_a_long_job(new_site) -> None:
    """Jobs queued in the spawner behind a job that runs long (over 1 s) are given back and run on
    the slot that frees up, even when nothing else is pending, instead of waiting for that job."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)
    trace = path / "trace.txt"

    class Mixed(ApplicationDefinition):
        site = name
        command_template = traced(trace, "{{ secs }}")

    Mixed.sync()
    # The long job first: it is placed first, and the next jobs queue behind it.
    ids = make_runnable(Mixed.submit(workdir=f"mixed/{i}", secs=6 if i == 0 else 0.05, node_packing_count=2, save=False)
                        for i in range(6))
    proc = start_launcher(path, "mpi", 1)
    wait_for_states(ids, {"RUN_DONE"}, timeout=90)
    assert finish(proc) == 0
    text = trace.read_text()
    ends = {parts[1]: float(parts[2]) for parts in (ln.split() for ln in text.splitlines()) if parts[:1] == ["end"]}
    long_end = ends.pop(str(ids[0]))
    assert len(ends) == 5 and max(ends.values()) < long_end - 2, text
    log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    assert "queued ones given back" in log and " 0 queued ones given back" not in log, log[-2000:]


#: Appends a line to ``runs`` in its workdir each run; exits 1 the first time (a marker file), 0 after.
FLAKY_TEMPLATE = ("bash -c 'echo run >> runs; if [ -e tried ]; then echo second run ok; "
                  "else touch tried; echo first run fails; exit 1; fi'")


def _runs(path: Path, workdir: str) -> int:
    return (path / "data" / workdir / "runs").read_text().count("run")


def test_serial_mode_relaunches_quick_failures_as_balsam_07(new_site) -> None:
    """Balsam 0.7's serial worker relaunched a task that exited with -11, 1, 255 or 12345 within
    20 s of its start, up to 3 times, before reporting RUN_ERROR (runner.RETRY_CODES): a job that
    fails once finishes, one that always fails ends RUN_ERROR after 4 runs (one RUN_ERROR event,
    which says so), another exit code is reported at once. Window and other pools:
    test_quick_failure_retry.py."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Flaky(ApplicationDefinition):
        site = name
        command_template = FLAKY_TEMPLATE

    class Exits(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo run >> runs; echo failing; exit {{ code }}'"

    Flaky.sync()
    Exits.sync()
    ids = make_runnable([Flaky.submit(workdir="flaky", save=False), Exits.submit(workdir="always1", code=1, save=False),
                         Exits.submit(workdir="exit2", code=2, save=False)])
    proc = start_launcher(path, "serial", 1)
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"})
    assert finish(proc) == 0
    flaky, always, other = ids
    assert [str(jobs[j].state) for j in ids] == ["RUN_DONE", "RUN_ERROR", "RUN_ERROR"]
    assert (_runs(path, "flaky"), _runs(path, "always1"), _runs(path, "exit2")) == (2, 4, 1)
    history = events_of(ids)
    moves = [(e.from_state, e.to_state) for e in history[flaky]]
    assert moves[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE")], moves
    assert [e.to_state for e in history[always]].count("RUN_ERROR") == 1
    error = history[always][-1]
    assert error.to_state == "RUN_ERROR" and error.data["returncode"] == 1 and jobs[always].return_code == 1
    assert error.data["error"].startswith("failing\nbalsam: relaunched 3 times"), error.data
    assert "relaunched" not in history[other][-1].data["error"] and jobs[other].return_code == 2
    log = "".join(p.read_text() for p in (path / "log").glob("serial_mode_*.log"))
    assert f"job {flaky} exited 1 after" in log and f"job {always} exited 1 after" in log
    assert "relaunching (3 of 3)" in log and f"job {flaky} finished after 1 relaunch" in log


def test_serial_mode_worker_ranks_relaunch_quick_failures_too(new_site) -> None:
    """The rule runs on every rank: jobs placed on a worker rank's node are relaunched there."""
    import json
    import socket

    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Flaky(ApplicationDefinition):
        site = name
        command_template = FLAKY_TEMPLATE

    Flaky.sync()
    ids = make_runnable(Flaky.submit(workdir=f"flaky/{i}", save=False) for i in range(4))
    host = socket.gethostname()
    # Two "nodes" of one CPU slot each: node 0's jobs run on rank 0 (master), node 1's on rank 1.
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0], "gpu_ids": []} for i in range(2)]
    proc = start_launcher(path, "serial", 1, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"})
    assert finish(proc) == 0
    assert {str(j.state) for j in jobs.values()} == {"RUN_DONE"}
    assert [_runs(path, f"flaky/{i}") for i in range(4)] == [2, 2, 2, 2]
    worker_logs = [p for p in (path / "log").glob("serial_mode_*.log") if not p.name.endswith(".master.log")]
    assert worker_logs and "relaunching (1 of 3)" in "".join(p.read_text() for p in worker_logs)


def test_mpi_mode_reports_a_quick_failure_at_once_as_balsam_07(new_site) -> None:
    """0.7's mpi mode reported every non-zero exit: no relaunch there (docs/launcher.md)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Flaky(ApplicationDefinition):
        site = name
        command_template = FLAKY_TEMPLATE

    Flaky.sync()
    ids = make_runnable([Flaky.submit(workdir="flaky", save=False)])
    proc = start_launcher(path, "mpi", 1)
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"})
    assert finish(proc) == 0
    assert str(jobs[ids[0]].state) == "RUN_ERROR" and _runs(path, "flaky") == 1
