"""The Slurm driver's times against the real Slurm of the CI host, the agent in a zone other than UTC.

squeue and sacct print times in the local zone of the process that runs them (the agent's ``TZ``,
America/Chicago or Europe/Berlin on a login node): read as UTC they would move a job's start and end
by hours. The driver runs them with ``TZ=UTC``. Checked here against the job's own clock: its script
writes ``date +%s`` (seconds since the epoch, no zone) when it starts and before it ends.
"""

from __future__ import annotations

import datetime as dt
import getpass
import time
from pathlib import Path

import pytest

from balsam.scheduler import SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_slurm import SlurmScheduler

from fake_env import ended, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.mark.parametrize("zone", ["America/Chicago", "Europe/Berlin"])
def test_start_and_end_are_the_jobs_own_instants_whatever_the_agents_zone(zone: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        marks = tmp_path / "marks"
        script = tmp_path / "qlaunch00001.sh"
        script.write_text(f"#!/bin/bash\ndate +%s > {marks}\nsleep 8\ndate +%s >> {marks}\n")
        script.chmod(0o755)
        slurm = SlurmScheduler(user=getpass.getuser())
        jobid = slurm.submit(SubmitRequest(script_path=script, project="root", queue="debug", num_nodes=1,
                                           wall_time_min=5, job_name=script.stem))
        # (The job ends by itself 8 s after it starts: nothing to cancel if a check fails.)
        wait_for(lambda: marks.exists() and marks.read_text().strip(), 30, "the job to start")
        wait_for(lambda: (s := slurm.get_statuses().get(jobid)) is not None and s.state is BatchJobState.running,
                 30, "squeue to list it running")
        polled = slurm.last_poll.start_times[jobid]
        history = wait_for(lambda: ended(slurm.get_history(jobid, script)), 60, "sacct to record the end")
        started, finished = (int(w) for w in marks.read_text().split())
        assert polled.tzinfo is not None and history.start_time.tzinfo is not None
        # Slurm stamps its StartTime when it launches the job, a moment before the script runs; its
        # EndTime a moment after the script's last line. Seconds apart, not the zone's hours.
        assert abs(polled.timestamp() - started) <= 5, (polled, dt.datetime.fromtimestamp(started, dt.timezone.utc))
        assert abs(history.start_time.timestamp() - started) <= 5
        assert abs(history.end_time.timestamp() - finished) <= 5, (history.end_time, finished)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
