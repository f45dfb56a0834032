"""Globus refuses a submission whose paths an earlier task of the same user still writes: HTTP 409
``Conflict``, "A transfer with identical paths has not yet completed". It happens to the agent's own
retry of a task it cancelled at ``task_timeout_sec`` that Globus is still stopping (it cancels
asynchronously past 10 s: "CancelAccepted", the usual answer for a task hung on an unresponsive
endpoint), or beside a task started outside balsam. It was taken for a refusal of the files: each
such submission failed a try of every file of the batch, and with the default 3 tries a hung task's
files failed their jobs within minutes of its deadline, "Globus refused the request (HTTP 409 ...)".
Now the batch waits, journaled with its submission id, and is sent again until Globus takes it.
The fake is globus-sdk's testing fixtures (``responses``) with the real service's answer.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from globus_test_utils import REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from transfer_test_utils import FakeAPI

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
TASK_ID = OK_SUBMIT["task_id"]
TOKEN = get_response_set(globus_sdk.TransferClient.get_submission_id).lookup("default").metadata["submission_id"]
CONFLICT = {"code": "Conflict", "message": "A transfer with identical paths has not yet completed",
            "request_id": "00gB7AnM3", "resource": "/v0.10/transfer"}
T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def test_a_batch_whose_paths_an_earlier_task_still_writes_waits_without_using_a_try(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    api = FakeAPI([{"id": 1, "job_id": 1, "direction": "in", "location_alias": "aps", "remote_path": "/data/1.h5",
                    "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "",
                    "transfer_info": {}}], [{"id": 1, "workdir": "job1", "state": "READY"}])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                              globus_endpoint_id=SITE_EP, max_attempts=1), api)
    module.backends["globus"] = make_backend(tmp_path)
    module.backends["globus"].site_path = str(site)
    clock = [T0]
    module.now = lambda: clock[0]
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=409, json=CONFLICT)

    module.run_cycle()
    item = api.items[1]
    assert item["state"] == "pending" and not item["transfer_info"].get("attempts")
    reason = item["transfer_info"]["reason"]
    assert "identical paths has not yet completed" in reason and "sent again once it ends" in reason
    assert api.jobs[1]["state"] == "READY"

    responses.replace(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    posts = [c.request for c in responses.calls if c.request.method == "POST"]
    assert [json.loads(r.body)["submission_id"] for r in posts] == [TOKEN, TOKEN]  # the same batch, its own id
    assert (api.items[1]["state"], api.items[1]["task_id"]) == ("active", f"globus:{TASK_ID}")


def test_a_hung_task_cancelled_slowly_does_not_fail_its_job_on_the_retries(balsam_env, tmp_path: Path) -> None:
    """The campaign on the live API: a task hangs past task_timeout_sec; Globus accepts its cancel
    but is still stopping it ("CancelAccepted"); the file fails the deadline's try and, at each retry,
    Globus answers 409 for its paths. The job stays (one try used), and the file goes once the old
    task has stopped."""
    from globus_test_utils import stage_in_site

    responses.add_passthru(balsam_env.url)
    client, site_path, site, job, item = stage_in_site(tmp_path, "conflict-site")
    module = TransfersModule(site, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                    globus_endpoint_id=SITE_EP, task_timeout_sec=60), client)
    module.backends["globus"] = make_backend(tmp_path)
    clock = [T0]
    module.now = lambda: clock[0]

    def row() -> dict:
        return client.get("/transfers/", params={"job_id": [job.id]})["results"][0]

    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert row()["task_id"] == f"globus:{TASK_ID}"
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [{**base, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK", "is_paused": False,
                  "label": "balsam stage-in (1 file)"}],
        "DATA_TYPE": "task_list", "length": 1, "limit": 1, "offset": 0, "total": 1})
    cancel = responses.add(responses.POST, f"{TRANSFER}/task/{TASK_ID}/cancel", json={
        "DATA_TYPE": "result", "code": "CancelAccepted", "message": "The cancel request has been accepted",
        "request_id": "r", "resource": f"/task/{TASK_ID}/cancel"})
    clock[0] = T0 + dt.timedelta(seconds=120)
    module.run_cycle()  # past the deadline: cancelled, the file fails its first try
    assert cancel.call_count == 1
    after = row()
    assert after["state"] == "pending" and after["transfer_info"]["attempts"] == 1

    responses.replace(responses.POST, f"{TRANSFER}/transfer", status=409, json=CONFLICT)
    for minutes in (5, 10, 20):  # every retry past its backoff (30 s, 60 s): still being stopped
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        module.run_cycle()
    after = row()
    assert after["state"] == "pending" and after["transfer_info"]["attempts"] == 1
    assert "identical paths has not yet completed" in after["transfer_info"]["reason"]
    assert client.get(f"/jobs/{job.id}")["state"] != "FAILED"

    responses.replace(responses.POST, f"{TRANSFER}/transfer",
                      json={**OK_SUBMIT, "task_id": "33333333-3333-3333-3333-333333333333"})
    clock[0] = T0 + dt.timedelta(minutes=25)
    module.run_cycle()
    assert (row()["state"], row()["task_id"]) == ("active", "globus:33333333-3333-3333-3333-333333333333")
