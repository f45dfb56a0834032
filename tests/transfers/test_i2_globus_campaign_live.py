"""The Globus backend in the real transfers module against the live balsam API: two jobs staging in
files whose names hold spaces and non-ASCII letters, in one Globus task, the site's collection
seeing the site under the home directory (``globus_endpoint_site_path: /~/gsite``). Globus skips one
file, naming it by its resolved home path: only that job fails, its event naming the Globus reason;
the other job is STAGED_IN. (The skipped error matched no item: both jobs failed.)"""

from __future__ import annotations

import json
from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set, load_response

from globus_test_utils import REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from test_i2_globus_skipped_home_paths import home_listing

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
NAME = "scan 17 – µ.h5"


def test_one_skipped_file_fails_only_its_job_with_the_globus_reason(balsam_env, tmp_path: Path) -> None:
    responses.add_passthru(balsam_env.url)
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    site_path = tmp_path / "gsite"
    init_site(site_path, "gsite", "default", client, settings_overrides={"transfers": {
        "transfer_locations": {"aps": f"globus://{REMOTE_EP}"}, "globus_endpoint_id": SITE_EP,
        "globus_endpoint_site_path": "/~/gsite"}})
    site = SiteConfig(site_path)
    site_id = site.site_id

    class Fetch(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"raw": {"required": True, "direction": "in", "local_path": NAME}}

    Fetch.sync()
    jobs = Job.objects.bulk_create([Job(f"run {n}/ü", Fetch, transfers={"raw": f"aps:/data/run {n}/{NAME}"})
                                    for n in range(2)])
    options = TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP,
                               globus_endpoint_site_path="/~/gsite", max_attempts=1)
    module = TransfersModule(site, options, client)
    module.backends["globus"] = make_backend(tmp_path, endpoint_site_path="/~/gsite")
    module.backends["globus"].site_path = str(site_path)

    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()
    (submit,) = [c for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]
    sent = [d["destination_path"] for d in json.loads(submit.request.body)["DATA"]]
    assert sorted(sent) == [f"/~/gsite/data/run {n}/ü/{NAME}" for n in range(2)]

    # Globus skipped job 1's file, reporting the home it resolved (the site collection's, read with an ls).
    home_listing(SITE_EP, "/home/me/")
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [{**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "label": "balsam stage-in (2 files)",
                  "files": 2, "files_transferred": 1, "subtasks_skipped_errors": 1,
                  "source_endpoint_id": REMOTE_EP, "destination_endpoint_id": SITE_EP}],
        "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND",
                  "error_details": "globus_xio: System error in open: No such file or directory",
                  "source_path": f"/data/run 1/{NAME}", "destination_path": f"/home/me/gsite/data/run 1/ü/{NAME}",
                  "is_directory": False, "is_symlink": False, "error_time": "2026-11-30T18:00:00+00:00"}]})
    module.run_cycle()
    assert client.get(f"/jobs/{jobs[0].id}")["state"] == "STAGED_IN"
    assert client.get(f"/jobs/{jobs[1].id}")["state"] == "FAILED"
    events = client.get("/events/", params={"job_id": [jobs[1].id], "to_state": "FAILED"})["results"]
    (message,) = [e["data"]["message"] for e in events]
    assert message == (f"Transfer failed: stage-in of aps:/data/run 1/{NAME} to {NAME}: FILE_NOT_FOUND: "
                       "globus_xio: System error in open: No such file or directory")
