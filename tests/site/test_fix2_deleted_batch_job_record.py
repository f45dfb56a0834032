"""What `balsam demo` reads to tell a BatchJob that `balsam queue term` ended from one whose launcher
ended on its own (:func:`balsam.demo._deleted`), as a real agent on the local scheduler (the demo's)
records it: once finished, the first says it was deleted for good (the ``pending_deletion`` state
lasted a sync period or two, and the demo, not looking then, replaced the BatchJob)."""

from __future__ import annotations

import random
from pathlib import Path

import psutil

from balsam.demo import _deleted
from site_test_utils import batch_job, create_batch_job, wait_for


def test_a_deleted_batch_job_says_so_once_finished_and_one_that_ended_on_its_own_does_not(
        make_site, agent_daemon, client, tmp_path):
    mark = f"{random.randint(100000, 999999)}.75"
    done = tmp_path / "end-at-once"
    site = make_site()
    Path(site.job_template_path).write_text(f"#!/bin/bash\n[ -e {done} ] && exit 0\nexec sleep {mark}\n")
    agent_daemon(site)
    try:
        termed = create_batch_job(client, site.site_id)["id"]
        wait_for(lambda: batch_job(client, termed)["state"] == "running", timeout=60, what="the BatchJob to run")
        client.patch("/batch-jobs/", json=[{"id": termed, "state": "pending_deletion"}])  # `balsam queue term`
        wait_for(lambda: batch_job(client, termed)["state"] == "finished", timeout=60, what="the deletion")
        assert _deleted(batch_job(client, termed)), batch_job(client, termed)

        done.touch()
        ended = create_batch_job(client, site.site_id)["id"]
        wait_for(lambda: batch_job(client, ended)["state"] == "finished", timeout=60, what="the job to end")
        assert not _deleted(batch_job(client, ended)), batch_job(client, ended)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] == ["sleep", mark]:
                process.kill()
