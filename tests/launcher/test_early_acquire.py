"""The mpi launcher's first acquire is sent early (as the job mode is built, through the Session the
launcher opened in the background), so that its jobs are in hand when the loop starts.

Its jobs are handed to the loop exactly once; a start-up that fails after it (an error, a SIGTERM or
SIGINT before the job mode handles signals, one more during the way out) deletes the Session at
once, which gives them back: they were not left held until the Session expired. A launcher told to
end by a signal still ends by it, and does not wait out a server outage first. Real uvicorn server
(SQLite), real launchers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import closed_port, make_runnable, offline_site, wait_for_states

pytestmark = pytest.mark.mpi


def _jobs_and_batch_job(name: str, trace: Path, count: int) -> tuple[list[int], int]:
    from balsam.api import ApplicationDefinition, BatchJob

    class Mark(ApplicationDefinition):
        site = name
        command_template = f"bash -c 'echo $BALSAM_JOB_ID >> {trace}'"

    Mark.sync()
    ids = make_runnable(Mark.submit(workdir=f"m/{i}", save=False) for i in range(count))
    batch_job = BatchJob.objects.create(site_id=Mark.resolve_site_id(), project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode="mpi")
    return ids, batch_job.id


def _free_now(site_id: int, count: int) -> list[int]:
    """The ids a new Session of the site leases now (one acquire, no retry, no wait); the Session is
    deleted after, which gives them back."""
    from balsam.launcher.service_calls import open_raw_lease

    lease = open_raw_lease(site_id, None)
    try:
        return sorted(int(row["id"]) for row in lease.acquire(count + 10))
    finally:
        lease.close(retry_count=0)


def _fail_in_process_then_free_now(monkeypatch, path: Path, batch_job_id: int, error: str, site_id: int,
                                   count: int) -> list[int]:
    """run_launcher in this process for the BatchJob, its mode's run patched to raise a RuntimeError
    matching ``error``; then the ids free right after it returned (the launcher's log handlers are
    taken off this process's logger after)."""
    from balsam.launcher import entry

    monkeypatch.setenv("BALSAM_BATCH_JOB_ID", str(batch_job_id))
    monkeypatch.setenv("BALSAM_SITE_PATH", str(path))
    monkeypatch.delenv("BALSAM_LAUNCHER_NODELIST", raising=False)
    try:
        with pytest.raises(RuntimeError, match=error):
            entry.run_launcher("mpi", 1.0, site_path=str(path))
        return _free_now(site_id, count)
    finally:
        root = logging.getLogger("balsam")
        for handler in [h for h in root.handlers if getattr(h, "_balsam_launcher", False)]:
            root.removeHandler(handler)
            handler.close()


def test_the_jobs_of_the_early_acquire_run_exactly_once(new_site, tmp_path: Path) -> None:
    name, path = new_site(idle_ttl_sec=2)
    trace = tmp_path / "runs"
    trace.touch()
    ids, batch_job_id = _jobs_and_batch_job(name, trace, 6)
    proc = start_launcher(path, "mpi", 1, env={"BALSAM_BATCH_JOB_ID": str(batch_job_id)})
    wait_for_states(ids, {"RUN_DONE", "JOB_FINISHED"}, timeout=60)
    assert finish(proc) == 0, Path(proc.console_path).read_text()
    runs = Counter(int(line) for line in trace.read_text().split())
    assert runs == Counter({job_id: 1 for job_id in ids}), runs
    text = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    early = [ln for ln in text.splitlines() if "the first acquire, sent early, got" in ln]
    assert len(early) == 1 and " 0 jobs" not in early[0], text[-3000:]


def test_a_start_up_failure_after_the_early_acquire_gives_its_jobs_back_at_once(new_site, tmp_path: Path,
                                                                              monkeypatch) -> None:
    from balsam.api import Site
    from balsam.launcher.modes.mpi import MPIMode

    name, path = new_site(idle_ttl_sec=2)
    ids, batch_job_id = _jobs_and_batch_job(name, tmp_path / "runs", 4)
    site_id = Site.objects.get(name=name).id
    seen: dict[str, list[int]] = {}

    def failing_run(self: MPIMode) -> int:
        # The mode was built: the first acquire went out. Once it is answered, a new Session finds
        # only the jobs it did not lease (one node: two waves of one job); then the start-up fails.
        early = getattr(self, "_early", None)
        assert early is not None, "no early acquire was sent"
        early._acquire_thread.join(30)
        seen["while held"] = _free_now(site_id, len(ids))
        self.pool.close()
        raise RuntimeError("the start-up failed after the early acquire")

    monkeypatch.setattr(MPIMode, "run", failing_run)
    # At once: one acquire right after the launcher returned, not after the Session's expiry.
    free = _fail_in_process_then_free_now(monkeypatch, path, batch_job_id, "after the early acquire", site_id,
                                          len(ids))
    assert set(seen["while held"]) < set(ids), seen  # some were held by the early acquire
    assert free == sorted(ids), free


# The end of each launcher script here: run the mpi launcher as `python -m balsam.launcher` would.
_RUN_THE_MPI_LAUNCHER = """
sys.argv = ["balsam.launcher", "-j", "mpi", "-t", "1"]
import runpy
runpy.run_module("balsam.launcher", run_name="__main__")
"""


# SIGTERM right after the mpi mode was built (its first acquire answered), before the launcher
# installs the mode's signal handlers; then the launcher is what it would have been.
SIGNALLED = """
import os, signal, sys, time
from balsam.launcher.modes.mpi import MPIMode
built = MPIMode.__init__
def init(self, context):
    built(self, context)
    self._early._acquire_thread.join(30)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
MPIMode.__init__ = init
""" + _RUN_THE_MPI_LAUNCHER


def test_a_sigterm_during_start_up_after_the_early_acquire_gives_its_jobs_back_at_once(new_site, tmp_path: Path) -> None:
    ids, free, proc = _launch_then_free_now(SIGNALLED, new_site, tmp_path)
    # Ended by the signal, as a launcher without a job mode yet always was.
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert free == sorted(ids), (free, proc.stderr)  # at once, not after the Session's expiry


def _term_on_replay_once(flag: str) -> str:
    """The end of a launcher script: a SIGTERM as run_launcher's way out replays the start-up's
    records, once ``flag`` (a list the script fills) says so; then the mpi launcher is run."""
    return f"""
replay = entry.HeldRecords.replay
def replay_and_term(self):
    if {flag}:
        {flag}.clear()
        os.kill(os.getpid(), signal.SIGTERM)
    return replay(self)
entry.HeldRecords.replay = replay_and_term
""" + _RUN_THE_MPI_LAUNCHER


def _launch_then_free_now(script: str, new_site,
                          tmp_path: Path) -> tuple[list[int], list[int], subprocess.CompletedProcess]:
    """Four runnable jobs and a BatchJob; ``script`` launched for it to its end; then ``(ids, the ids
    free now, the launcher's process)``."""
    from balsam.api import Site

    name, path = new_site(idle_ttl_sec=2)
    ids, batch_job_id = _jobs_and_batch_job(name, tmp_path / "runs", 4)
    proc = _launch(script, path, batch_job_id)
    return ids, _free_now(Site.objects.get(name=name).id, len(ids)), proc


def _launch(script: str, path: Path, batch_job_id: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "BALSAM_BATCH_JOB_ID": str(batch_job_id), "BALSAM_SITE_PATH": str(path)}
    env.pop("BALSAM_LAUNCHER_NODELIST", None)
    # SIGINT as in a terminal: a test run started in the background (`cmd &`, CI) inherits it ignored,
    # and the launcher then rightly keeps ignoring it.
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# The mode's run fails after the early acquire was answered; a SIGTERM comes while run_launcher's
# way out replays the start-up's records, before its discard: it skipped the discard (a traceback,
# rc 1, the jobs held until the Session expired).
SIGNALLED_ON_THE_WAY_OUT = """
import os, signal, sys
from balsam.launcher import entry
from balsam.launcher.modes.mpi import MPIMode
armed = []
def failing_run(self):
    self._early._acquire_thread.join(30)
    self.pool.close()
    armed.append(1)
    raise RuntimeError("the start-up failed after the early acquire")
MPIMode.run = failing_run
""" + _term_on_replay_once("armed")


def test_a_sigterm_on_the_way_out_of_a_failed_start_up_still_gives_the_jobs_back(new_site, tmp_path: Path) -> None:
    ids, free, proc = _launch_then_free_now(SIGNALLED_ON_THE_WAY_OUT, new_site, tmp_path)
    assert free == sorted(ids), (free, proc.returncode, proc.stderr[-2000:])
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)


# Ctrl-C twice: the first right after the mode was built (its early acquire committed on the server,
# its answer 1 s late), the second while the start-up's way out waits for that answer. The second
# one cut the discard short: the Session was never deleted.
INTERRUPTED_TWICE = """
import os, signal, sys, threading, time
from balsam.client import lease
real = lease.JobLease.acquire
def late(self, *a, **k):
    got = real(self, *a, **k)
    time.sleep(1.0)
    return got
lease.JobLease.acquire = late
from balsam.launcher import service_calls
service_calls.DISCARD_GRACE_SEC = 60.0  # (a SIGINT gives the server a grace; here the answer always comes)
from balsam.launcher.modes.mpi import MPIMode
built = MPIMode.__init__
def init(self, context):
    built(self, context)
    threading.Timer(0.4, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
MPIMode.__init__ = init
""" + _RUN_THE_MPI_LAUNCHER


def test_a_second_sigint_does_not_cut_the_give_back_short(new_site, tmp_path: Path) -> None:
    ids, free, proc = _launch_then_free_now(INTERRUPTED_TWICE, new_site, tmp_path)
    assert free == sorted(ids), (free, proc.returncode, proc.stderr[-2000:])
    # Ended by the interrupt, as a launcher without an early lease (click's "Aborted!", rc 1).
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)


# The mode ran to its end (idle); a SIGTERM comes as run_launcher's way out replays the records:
# the start-up's handler was back in force and ended a finished launcher with a traceback, rc 1.
SIGNALLED_AFTER_THE_RUN = """
import os, signal, sys
from balsam.launcher import entry
from balsam.launcher.modes.mpi import MPIMode
done = []
real_run = MPIMode.run
def run(self):
    code = real_run(self)
    done.append(1)
    return code
MPIMode.run = run
""" + _term_on_replay_once("done")


def test_a_sigterm_after_the_mode_ended_ends_the_launcher_by_it(new_site, tmp_path: Path) -> None:
    from balsam.api import BatchJob, Site

    name, path = new_site(idle_ttl_sec=1)
    batch_job = BatchJob.objects.create(site_id=Site.objects.get(name=name).id, project="local", queue="local",
                                        num_nodes=1, wall_time_min=1, job_mode="mpi")
    proc = _launch(SIGNALLED_AFTER_THE_RUN, path, batch_job.id)
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)


def test_the_give_back_waits_for_an_early_acquire_answered_late(new_site, tmp_path: Path, monkeypatch, caplog) -> None:
    """The start-up fails at once, while the early acquire's answer is still on its way (committed on
    the server, 1 s late): the Session is deleted after that answer, not under it (an acquire in
    flight could lease the jobs after the deletion), and the log says what was given back."""
    caplog.set_level(logging.INFO, logger="balsam.launcher.service_calls")

    from balsam.api import Site
    from balsam.client.lease import JobLease
    from balsam.launcher.modes.mpi import MPIMode

    name, path = new_site(idle_ttl_sec=2)
    ids, batch_job_id = _jobs_and_batch_job(name, tmp_path / "runs", 4)
    site_id = Site.objects.get(name=name).id
    real_acquire = JobLease.acquire
    committed = threading.Event()

    def late(self, *args, **kwargs):
        got = real_acquire(self, *args, **kwargs)
        if threading.current_thread().name == "early-acquire":
            committed.set()
            time.sleep(1.0)
        return got

    def failing_run(self: MPIMode) -> int:
        assert self._early is not None, "no early acquire was sent"
        assert committed.wait(30)  # on the server; its answer is not back yet
        self.pool.close()
        raise RuntimeError("the start-up failed at once")

    monkeypatch.setattr(JobLease, "acquire", late)
    monkeypatch.setattr(MPIMode, "run", failing_run)
    free = _fail_in_process_then_free_now(monkeypatch, path, batch_job_id, "failed at once", site_id, len(ids))
    assert free == sorted(ids), free
    said = [r.getMessage() for r in caplog.records if "acquired early are given back" in r.getMessage()]
    assert len(said) == 1, caplog.text


# SIGTERM while the settings are read, the server down (nothing listens on its port).
SIGNALLED_DURING_AN_OUTAGE = """
import os, signal, sys
from balsam.launcher import entry
load = entry._load_settings
def load_and_term(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return load(*a, **k)
entry._load_settings = load_and_term
sys.argv = ["balsam.launcher", "-j", "mpi", "-t", "1", "--site", sys.argv[1]]
import runpy
runpy.run_module("balsam.launcher", run_name="__main__")
"""


def test_a_sigterm_during_a_server_outage_at_start_up_ends_the_launcher_soon(tmp_path: Path) -> None:
    """It waited for the early Session's opening to the end of its connect wait (ten minutes here)
    before it ended, ignoring further SIGTERMs; now the server gets a short grace."""
    site, env = offline_site(tmp_path, f"http://127.0.0.1:{closed_port()}")
    env.update({"BALSAM_BATCH_JOB_ID": "5", "BALSAM_CLIENT_CONNECT_WAIT_SEC": "600"})
    try:
        # Far under the connect wait (and the client's retries, about 2.5 min): the grace is 2 s.
        proc = subprocess.run([sys.executable, "-c", SIGNALLED_DURING_AN_OUTAGE, str(site)], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the launcher did not end within 60 s of its SIGTERM: {exc.stderr!r}")
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)


def test_a_signal_the_launcher_inherited_as_ignored_stays_ignored_at_start_up() -> None:
    """A launcher started with SIGTERM ignored (``trap '' TERM``; ``cmd &`` in a script does so for
    SIGINT) went on ignoring it; the start-up handler took it over and ended the start-up with a
    traceback (rc 1): end() put SIG_IGN back, and raising the signal again then did nothing."""
    from balsam.launcher.entry import StartUpSignal, StartUpSignals

    before = {sig: signal.getsignal(sig) for sig in StartUpSignals.SIGNALS}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SIGINT as in a terminal (a background test run, `cmd &` or CI, inherits it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signals = StartUpSignals()
        signals.starting = True  # as inside run_launcher's try
        try:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0)  # a Python handler runs here at the latest
        except StartUpSignal as exc:
            pytest.fail(f"an ignored SIGTERM ended the start-up: {exc}")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # not ignored: taken over
        signals.end()
        assert signals.received == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_log_file_is_written_before_a_start_up_signal_is_raised_again(tmp_path: Path) -> None:
    """SIGTERM's default action kills the launcher where end() raises it again: the records the
    buffered log file handler (the default settings) still held were lost, the discard's among them."""
    import logging

    from balsam.launcher.entry import StartUpSignals, configure_logging

    log_path = tmp_path / "launcher.log"
    root = logging.getLogger("balsam")
    level = root.level
    before = {sig: signal.getsignal(sig) for sig in StartUpSignals.SIGNALS}
    on_disk: list[str] = []
    # Stands in for the default action (which would end pytest): what is on disk when it comes.
    signal.signal(signal.SIGTERM, lambda signum, frame: on_disk.append(log_path.read_text()))
    try:
        configure_logging(log_path)
        signals = StartUpSignals()
        signals.starting = False  # on the way out: the signal is noted
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0)
        assert signals.received == [signal.SIGTERM]
        logging.getLogger("balsam.launcher.service_calls").info("the discard's last line")
        signals.end()
        time.sleep(0)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for handler in [h for h in root.handlers if getattr(h, "_balsam_launcher", False)]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    assert len(on_disk) == 1 and "the discard's last line" in on_disk[0], on_disk


def test_a_hurried_discard_says_the_session_is_released_when_it_expires(caplog) -> None:
    """The launcher ends right after a hurried discard (the signal raised again): the thread still
    waiting for the server never deletes the Session, so the log must not say it does."""
    import logging

    from balsam.launcher.service_calls import EarlyLease

    caplog.set_level(logging.INFO, logger="balsam.launcher.service_calls")
    opening = EarlyLease(1, 1)  # its thread not started: the opening is never answered
    opening.discard(hurried=lambda: True, grace_sec=0.05)

    answered = threading.Event()
    acquiring = EarlyLease(1, 1)
    acquiring._lease = object()
    acquiring._ready.set()
    acquiring._acquire_thread = threading.Thread(target=answered.wait, args=(10,), daemon=True)
    acquiring._acquire_thread.start()
    try:
        acquiring.discard(hurried=lambda: True, grace_sec=0.05)
    finally:
        answered.set()
    said = [r.getMessage() for r in caplog.records if r.name == "balsam.launcher.service_calls"]
    assert len(said) == 2, said
    assert "the opening of its early Session got no answer within 0.05 s" in said[0], said
    assert "its early acquire got no answer within 0.05 s" in said[1], said
    for line in said:
        assert "released when the Session expires" in line and "deleted" not in line, line


def test_a_signal_before_the_start_up_is_guarded_is_noted_and_ends_it_there() -> None:
    """run_launcher creates the handler not ``starting``: a signal before its ``try`` (or while the
    handler is installed) is noted, not raised where no ``finally`` would discard the early lease;
    the start-up then ends at its first step, and end() raises the signal again."""
    from balsam.launcher.entry import StartUpSignal, StartUpSignals

    before = {sig: signal.getsignal(sig) for sig in StartUpSignals.SIGNALS}
    raised: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: raised.append(signum))  # the "original" handler
    try:
        signals = StartUpSignals(starting=False)
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0)
        assert signals.received == [signal.SIGTERM] and raised == []
        signals.starting = True  # the outer try's first statement
        with pytest.raises(StartUpSignal):
            signals.raise_noted()
        assert not signals.starting  # a further signal is noted: the discard is not cut short
        signals.end()
        time.sleep(0)
        assert raised == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
