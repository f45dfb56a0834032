"""Two jobs of one workdir staging a file in to the same name, from two Globus paths: the real
``transfers`` module on the live API, its Globus backend on globus-sdk's test client (globus-sdk's
registered responses; nothing reaches Globus).

Both files went in one Globus task. Globus skips the first job's file (its source is missing): the
skipped error names the destination, which both items write, so both failed their (only) try and
the second job FAILED though its file was delivered. Items with the same destination now go in
separate tasks, one after the other: the skipped file fails its own job alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set

from globus_test_utils import (SITE_EP, TASK_ID, TRANSFER, globus_module, globus_site,  # noqa: F401
                               mocked_responses, stage_in_app, succeeded_with)

pytestmark = pytest.mark.usefixtures("mocked_responses")

NAME = "frame.h5"
SECOND_TASK = "00000000-0000-0000-0000-00000000b0b2"


def answer_submissions(*task_ids: str) -> None:
    """Globus accepts the next submissions, each answered with the next of ``task_ids`` (globus-sdk's
    own submit_transfer answer, its task id replaced)."""
    body = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
    for task_id in task_ids:
        responses.add(responses.POST, f"{TRANSFER}/transfer", json={**body, "task_id": task_id})


def submissions() -> list[list[dict]]:
    """The items (``DATA``) of each transfer submitted so far."""
    return [json.loads(c.request.body)["DATA"] for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]


def test_live_a_skipped_file_fails_only_its_job_where_two_jobs_write_one_path(balsam_env, tmp_path: Path) -> None:
    from balsam.api import Job

    responses.add_passthru(balsam_env.url)
    client, _, site = globus_site(tmp_path, "/~/")
    fetch = stage_in_app(site, "Fetch", NAME)
    jobs = [Job("shared", fetch, transfers={"raw": f"aps:/data/run {n}/{NAME}"}) for n in range(2)]
    for job in jobs:
        job.save()
    module = globus_module(tmp_path, site, client, "/~/")
    answer_submissions(TASK_ID, SECOND_TASK)
    try:
        module.run_cycle()
        # Globus skips job 0's file, naming the destination both jobs write.
        succeeded_with(f"balsam stage-in (1 file)", [(f"/data/run 0/{NAME}", f"/~/data/shared/{NAME}")], SITE_EP,
                       files=1, files_transferred=0)
        module.run_cycle()
        states = [client.get(f"/jobs/{j.id}")["state"] for j in jobs]
        second = client.get("/transfers/", params={"job_id": jobs[1].id})["results"][0]
        assert states == ["FAILED", "READY"]
        assert second["state"] == "active" and second["task_id"] == f"globus:{SECOND_TASK}"
        assert not second["transfer_info"].get("attempts")
        # One file per task: job 0's, then job 1's once job 0's task had ended.
        assert [[d["source_path"] for d in data] for data in submissions()] == [
            [f"/data/run 0/{NAME}"], [f"/data/run 1/{NAME}"]]
    finally:
        module.close()
