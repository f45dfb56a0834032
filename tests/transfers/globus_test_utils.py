"""What the Globus plugin's test modules share: the collections, globus-sdk's recommended response
mocking (every HTTP request goes to registered responses only), and a backend on a test client."""

from __future__ import annotations

from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response
from globus_sdk.transport import RetryConfig

from balsam.transfer import TransferLocation
from balsam_transfer_globus.backend import GlobusTransfer

SITE_EP = "11111111-1111-1111-1111-111111111111"
REMOTE_EP = "22222222-2222-2222-2222-222222222222"
LOCATION = TransferLocation.parse("aps", f"globus://{REMOTE_EP}")


@pytest.fixture
def mocked_responses():
    """Use with ``pytestmark = pytest.mark.usefixtures("mocked_responses")``."""
    responses.start()
    # TransferClient.submit_transfer asks for a submission id first.
    load_response(globus_sdk.TransferClient.get_submission_id)
    yield
    responses.stop()
    responses.reset()


def make_backend(tmp_path: Path, **options) -> GlobusTransfer:
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("test-token"),
                                       retry_config=RetryConfig(max_retries=0))
    backend = GlobusTransfer({"endpoint_id": SITE_EP, **options}, site_path=str(tmp_path / "site"),
                             transfer_client=client)
    backend._entry_point_name = "globus"
    return backend


def stage_in_site(tmp_path: Path, name: str, workdir: str = "t/0", **transfers):
    """A real site (on the test's API) with a Globus location ``aps`` (and the other ``transfers``
    settings given) and one job in ``workdir`` staging ``aps:/data/raw.h5`` in:
    ``(client, site_path, site, job, item)``, its transfer item as the API has it."""
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    site_path = tmp_path / name
    init_site(site_path, name, "default", client,
              settings_overrides={"transfers": {"transfer_locations": {"aps": f"globus://{REMOTE_EP}"}, **transfers}})
    site = SiteConfig(site_path)
    site_id = site.site_id

    class Fetch(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"raw": {"required": True, "direction": "in", "local_path": "raw.h5"}}

    Fetch.sync()
    (job,) = Job.objects.bulk_create([Job(workdir, Fetch, transfers={"raw": "aps:/data/raw.h5"})])
    item = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    return client, site_path, site, job, item
