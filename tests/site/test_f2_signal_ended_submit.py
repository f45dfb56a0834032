"""A qsub that a signal ended after it queued the job, with the scheduler module, the real PBS driver
and the fake PBS of tests/fixtures (real processes), against the real API.

The PBS driver read the dead qsub (rc < 0) as a permanent refusal: the module dropped the
``.submitting`` marker, revoked the launcher credential and made the BatchJob submit_failed (refused
for good) while its job was queued, unknown to balsam, to start and burn the allocation. The
outcome is now unknown: the next cycle asks the scheduler for the job and tracks it; no second job.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from pathlib import Path

from balsam.scheduler import REFUSED_FOR_GOOD
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.fakebatch import fake_batch_env
from balsam_scheduler_pbs import PBSScheduler
from site_test_utils import batch_job, create_batch_job

FAKE_PBS = Path(__file__).resolve().parents[1] / "fixtures" / "fake_pbs"


def test_a_qsub_ended_by_a_signal_after_queueing_is_adopted_not_failed(make_site, client, tmp_path, monkeypatch):
    for key, value in fake_batch_env(FAKE_PBS, tmp_path / "server").items():
        monkeypatch.setenv(key, value)
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    # A site's wrapper whose qsub queues the job, then is killed (the OOM killer, a watchdog) before the id is printed.
    (wrap / "qsub").write_text(f'#!/bin/sh\n"{FAKE_PBS}/qsub" "$@" > /dev/null\nkill -KILL $$\n')
    (wrap / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    site = make_site(overrides={"scheduler": {"name": "pbs", "allowed_projects": ["proj"],
                                              "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 30,
                                                                           "max_queued_jobs": 5}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nexec sleep 300\n")
    pbs = PBSScheduler(user=getpass.getuser())
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=pbs)
    try:
        bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
        module.run_cycle()
        record = batch_job(client, bj)
        assert record["state"] == "pending_submission", record
        assert "was ended by signal SIGKILL (9) before it answered: its outcome is unknown" in record["status_info"]["error"]
        assert REFUSED_FOR_GOOD not in record["status_info"]
        assert list(Path(site.site_path).rglob("*.submitting")), "the unknown outcome's marker was dropped"

        module.run_cycle()
        record = batch_job(client, bj)
        fake_jobs = json.loads((tmp_path / "server" / "state.json").read_text())["jobs"]
        assert len(fake_jobs) == 1, fake_jobs  # found, not submitted again
        assert record["state"] in ("queued", "running"), record
        assert str(record["scheduler_id"]) in fake_jobs, (record, fake_jobs)
    finally:
        subprocess.run('for j in $(qselect); do qdel "$j"; done', shell=True, capture_output=True, timeout=60)
