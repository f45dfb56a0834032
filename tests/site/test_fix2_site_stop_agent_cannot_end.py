"""`balsam queue term --id N; balsam site stop` with a real agent whose scheduler status poll fails
(the local scheduler's state directory replaced by a file): the agent cannot end the BatchJob, and
`site stop` waited its whole timeout (45 s) before it stopped the agent. It now does not wait for a
BatchJob the agent records it cannot end (its status_info error), says so, and stops the agent."""

from __future__ import annotations

import os
import random
from pathlib import Path

import psutil

from site_test_utils import assert_site_stop_says_it_cannot_end, batch_job, create_batch_job, wait_for



def test_site_stop_does_not_wait_for_a_batch_job_the_agent_cannot_end(make_site, agent_daemon, client):
    mark = f"{random.randint(100000, 999999)}.125"
    site = make_site()
    Path(site.job_template_path).write_text(f"#!/bin/bash\nexec sleep {mark}\n")
    agent_daemon(site)
    state_dir = Path(os.environ["BALSAM_HOME"]) / "local-scheduler"
    kept = state_dir.with_name("local-scheduler.kept")
    try:
        bj = create_batch_job(client, site.site_id)["id"]
        wait_for(lambda: batch_job(client, bj)["state"] == "running", timeout=60, what="the BatchJob to run")
        state_dir.rename(kept)
        state_dir.write_text("not a directory\n")  # every status poll fails from now on
        # The agent records the outage on its running BatchJob after 3 failed polls (1 s apart); the
        # user then ends it. (A BatchJob marked before that gets no such record: the wait then lasts
        # its two sync periods + 5 s.)
        wait_for(lambda: str((batch_job(client, bj)["status_info"] or {}).get("scheduler_status_error", "")).startswith(
            "scheduler status unavailable"), timeout=60, what="the agent to record the outage")
        client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])  # `balsam queue term --id`
        assert_site_stop_says_it_cannot_end(site.site_path, bj, "scheduler status unavailable")
    finally:
        if kept.exists():
            state_dir.unlink(missing_ok=True)
            kept.rename(state_dir)  # the teardown then ends the BatchJob's job
    # The teardown (agent_daemon) ends the job through the scheduler module; its process goes.
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == ["sleep", mark]:
            process.kill()
