"""A site's ``#!/bin/sh`` wrapper around qsub that does not ``exec`` it: qsub queues the job, then is
ended by a signal (the OOM killer, a watchdog) before it prints the id. The wrapper itself is not
signalled: it exits 128+9 = 137 with no output (bash adds a ``Killed`` line). With the scheduler
module, the real PBS and Cobalt drivers and the fake PBS and Cobalt of tests/fixtures (real
processes), against the real API.

The drivers read that exit status as qsub's own refusal: the module dropped the ``.submitting``
marker, revoked the launcher credential and made the BatchJob submit_failed (refused for good)
while its job waited in the queue, unknown to balsam. It is now an unknown outcome: the next cycle
asks the scheduler for the job and tracks it; no second job. (A negative returncode, the command
itself ended by a signal, is tests/site/test_f2_signal_ended_submit.py.)
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from pathlib import Path

import pytest

from balsam.scheduler import REFUSED_FOR_GOOD
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.fakebatch import fake_batch_env
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from site_test_utils import batch_job, create_batch_job

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DRIVERS = {"pbs": (PBSScheduler, "fake_pbs"), "cobalt": (CobaltScheduler, "fake_cobalt")}


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_a_wrappers_qsub_killed_after_queueing_is_adopted_not_failed(make_site, client, tmp_path, monkeypatch, name,
                                                                      shell):
    driver, fixture = DRIVERS[name]
    fake = FIXTURES / fixture
    server = tmp_path / "server"
    for key, value in fake_batch_env(fake, server).items():
        monkeypatch.setenv(key, value)
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    # The inner shell stands for qsub: it queues the job (the fake qsub), then dies of SIGKILL.
    (wrap / "qsub").write_text(f'#!{shell}\nsh -c \'"{fake}/qsub" "$@" > /dev/null; kill -KILL $$\' qsub "$@"\n')
    (wrap / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    site = make_site(overrides={"scheduler": {"name": name, "allowed_projects": ["proj"],
                                              "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 30,
                                                                           "max_queued_jobs": 5}}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nexec sleep 300\n")
    scheduler = driver(user=getpass.getuser())
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)
    try:
        bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
        module.run_cycle()
        record = batch_job(client, bj)
        assert record["state"] == "pending_submission", record
        assert ("exited with status 137, a shell's word for a command ended by signal SIGKILL (9), with no "
                "answer of the scheduler: its outcome is unknown") in record["status_info"]["error"]
        assert REFUSED_FOR_GOOD not in record["status_info"]
        assert list(Path(site.site_path).rglob("*.submitting")), "the unknown outcome's marker was dropped"

        module.run_cycle()
        record = batch_job(client, bj)
        fake_jobs = json.loads((server / "state.json").read_text())["jobs"]
        assert len(fake_jobs) == 1, fake_jobs  # found, not submitted again
        assert record["state"] in ("queued", "running"), record
        assert str(record["scheduler_id"]) in fake_jobs, (record, fake_jobs)
    finally:
        state = server / "state.json"
        for job_id in json.loads(state.read_text())["jobs"] if state.exists() else []:
            subprocess.run([str(fake / "qdel"), str(job_id)], capture_output=True, timeout=60)
