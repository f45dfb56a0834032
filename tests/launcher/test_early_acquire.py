"""The mpi launcher's first acquire is sent early (as the job mode is built, through the Session the
launcher opened in the background), so that its jobs are in hand when the loop starts.

Its jobs are handed to the loop exactly once; a start-up that fails after it (an error, a SIGTERM
before the job mode handles signals) deletes the Session at once, which gives them back: they were
not left held until the Session expired. Real uvicorn server (SQLite), real launchers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states

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
    from balsam.launcher._api import open_raw_lease

    lease = open_raw_lease(site_id, None)
    try:
        return sorted(int(row["id"]) for row in lease.acquire(count + 10))
    finally:
        lease.close(retry_count=0)


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
    import logging

    from balsam.api import Site
    from balsam.launcher import entry
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
    monkeypatch.setenv("BALSAM_BATCH_JOB_ID", str(batch_job_id))
    monkeypatch.setenv("BALSAM_SITE_PATH", str(path))
    monkeypatch.delenv("BALSAM_LAUNCHER_NODELIST", raising=False)
    try:
        with pytest.raises(RuntimeError, match="after the early acquire"):
            entry.run_launcher("mpi", 1.0, site_path=str(path))
        # At once: one acquire right after the launcher returned, not after the Session's expiry.
        free = _free_now(site_id, len(ids))
    finally:
        root = logging.getLogger("balsam")
        for handler in [h for h in root.handlers if getattr(h, "_balsam_launcher", False)]:
            root.removeHandler(handler)
            handler.close()
    assert set(seen["while held"]) < set(ids), seen  # some were held by the early acquire
    assert free == sorted(ids), free


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
sys.argv = ["balsam.launcher", "-j", "mpi", "-t", "1"]
import runpy
runpy.run_module("balsam.launcher", run_name="__main__")
"""


def test_a_sigterm_during_start_up_after_the_early_acquire_gives_its_jobs_back_at_once(new_site, tmp_path: Path) -> None:
    from balsam.api import Site

    name, path = new_site(idle_ttl_sec=2)
    ids, batch_job_id = _jobs_and_batch_job(name, tmp_path / "runs", 4)
    site_id = Site.objects.get(name=name).id
    env = {**os.environ, "BALSAM_BATCH_JOB_ID": str(batch_job_id), "BALSAM_SITE_PATH": str(path)}
    env.pop("BALSAM_LAUNCHER_NODELIST", None)
    proc = subprocess.run([sys.executable, "-c", SIGNALLED], env=env, capture_output=True, text=True, timeout=60)
    # Ended by the signal, as a launcher without a job mode yet always was.
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    free = _free_now(site_id, len(ids))  # at once, not after the Session's expiry
    assert free == sorted(ids), (free, proc.stderr)
