"""The Globus backend in the real transfers module against the live balsam API: two jobs staging in
files whose names hold spaces and non-ASCII letters, in one Globus task, the site's collection
seeing the site under the home directory (``globus_endpoint_site_path: /~/gsite``). Globus skips one
file, naming it by its resolved home path: only that job fails, its event naming the Globus reason;
the other job is STAGED_IN. (The skipped error matched no item: both jobs failed.)"""

from __future__ import annotations

from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from globus_test_utils import (SITE_EP, globus_module, globus_site, mocked_responses,  # noqa: F401
                               stage_in_app, submitted, succeeded_with)
from test_i2_globus_skipped_home_paths import home_listing

pytestmark = pytest.mark.usefixtures("mocked_responses")

NAME = "scan 17 – µ.h5"


def test_one_skipped_file_fails_only_its_job_with_the_globus_reason(balsam_env, tmp_path: Path) -> None:
    responses.add_passthru(balsam_env.url)
    from balsam.api import Job

    client, site_path, site = globus_site(tmp_path, "/~/gsite")
    Fetch = stage_in_app(site, "Fetch", NAME)
    jobs = Job.objects.bulk_create([Job(f"run {n}/ü", Fetch, transfers={"raw": f"aps:/data/run {n}/{NAME}"})
                                    for n in range(2)])
    module = globus_module(tmp_path, site, client, "/~/gsite")

    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()
    sent = [d["destination_path"] for d in submitted()]
    assert sorted(sent) == [f"/~/gsite/data/run {n}/ü/{NAME}" for n in range(2)]

    # Globus skipped job 1's file, reporting the home it resolved (the site collection's, read with an ls).
    home_listing(SITE_EP, "/home/me/")
    succeeded_with("balsam stage-in (2 files)", [(f"/data/run 1/{NAME}", f"/home/me/gsite/data/run 1/ü/{NAME}")],
                   SITE_EP, "globus_xio: System error in open: No such file or directory", files=2, files_transferred=1)
    module.run_cycle()
    assert client.get(f"/jobs/{jobs[0].id}")["state"] == "STAGED_IN"
    assert client.get(f"/jobs/{jobs[1].id}")["state"] == "FAILED"
    events = client.get("/events/", params={"job_id": [jobs[1].id], "to_state": "FAILED"})["results"]
    (message,) = [e["data"]["message"] for e in events]
    assert message == (f"Transfer failed: stage-in of aps:/data/run 1/{NAME} to {NAME}: FILE_NOT_FOUND: "
                       "globus_xio: System error in open: No such file or directory")
