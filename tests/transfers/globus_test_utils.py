"""What the Globus plugin's test modules share: the collections, globus-sdk's recommended response
mocking (every HTTP request goes to registered responses only), a backend on a test client, and a
real site and transfers module on the live API with that backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set, load_response
from globus_sdk.transport import RetryConfig

from balsam.transfer import TransferLocation
from balsam_transfer_globus.backend import GlobusTransfer

SITE_EP = "11111111-1111-1111-1111-111111111111"
REMOTE_EP = "22222222-2222-2222-2222-222222222222"
LOCATION = TransferLocation.parse("aps", f"globus://{REMOTE_EP}")
TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]


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


def globus_site(tmp_path: Path, endpoint_site_path: str,
                locations: Optional[dict[str, str]] = None) -> tuple[Any, Path, Any]:
    """A real site ``gsite`` on the live API (the caller's ``balsam_env``, let through with
    ``responses.add_passthru``) whose collection SITE_EP sees it at ``endpoint_site_path``, with the
    Globus location ``aps`` on REMOTE_EP (or the transfer_locations ``locations``):
    ``(client, site_path, site)``."""
    from balsam._api.model import reset_default_client
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    site_path = tmp_path / "gsite"
    init_site(site_path, "gsite", "default", client, settings_overrides={"transfers": {
        "transfer_locations": locations or {"aps": f"globus://{REMOTE_EP}"}, "globus_endpoint_id": SITE_EP,
        "globus_endpoint_site_path": endpoint_site_path}})
    return client, site_path, SiteConfig(site_path)


def stage_in_app(site: Any, name: str, local_path: str, recursive: bool = False) -> Any:
    """An app ``name`` of ``site``, synced, whose jobs stage their ``raw`` input in to ``local_path``."""
    from balsam.api import ApplicationDefinition

    raw = {"required": True, "direction": "in", "local_path": local_path, **({"recursive": True} if recursive else {})}
    app = type(name, (ApplicationDefinition,), {"site": site.site_id, "command_template": "true",
                                                 "transfers": {"raw": raw}})
    app.sync()
    return app


def outer_and_inner_jobs(site: Any) -> tuple[Any, Any]:
    """Two saved jobs of ``site``: ``j1`` (workdir ``camp``) staging the directory ``aps:/data/tree``
    in to ``inputs``, and ``j2``, whose workdir ``camp/inputs/sub`` lies inside it, staging
    ``aps:/data/other/x.h5`` in to ``x.h5``."""
    from balsam.api import Job

    tree = stage_in_app(site, "Tree", "inputs", recursive=True)
    one = stage_in_app(site, "One", "x.h5")
    j1 = Job("camp", tree, transfers={"raw": "aps:/data/tree"})
    j1.save()
    j2 = Job("camp/inputs/sub", one, transfers={"raw": "aps:/data/other/x.h5"})
    j2.save()
    return j1, j2


def globus_module(tmp_path: Path, site: Any, client: Any, endpoint_site_path: str,
                  locations: Optional[dict[str, str]] = None) -> Any:
    """The agent's transfers module for ``globus_site``'s site (given the same ``locations``), one
    try per item, its Globus backend on globus-sdk's test client (what it asks Globus goes to the
    registered responses)."""
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    options = TransfersOptions(transfer_locations=locations or {"aps": f"globus://{REMOTE_EP}"},
                               globus_endpoint_id=SITE_EP,
                               globus_endpoint_site_path=endpoint_site_path, max_attempts=1)
    module = TransfersModule(site, options, client)
    module.backends["globus"] = make_backend(tmp_path, endpoint_site_path=endpoint_site_path)
    module.backends["globus"].site_path = str(site.site_path)
    return module


def submitted() -> list[dict]:
    """The items (``DATA``) of the one transfer submitted so far."""
    (submit,) = [c for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]
    return json.loads(submit.request.body)["DATA"]


def succeeded_with(label: str, skipped: list[tuple[str, str]], dest_ep: str, details: str = "No such file",
                   **task: Any) -> None:
    """TASK_ID SUCCEEDED (its document also holding ``task``) with the files ``skipped``:
    [(source_path, destination_path)], each FILE_NOT_FOUND with ``details``."""
    doc = {**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "label": label, **task,
           "subtasks_skipped_errors": len(skipped),
           "source_endpoint_id": REMOTE_EP if dest_ep == SITE_EP else SITE_EP, "destination_endpoint_id": dest_ep}
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": details,
                  "source_path": src, "destination_path": dest, "is_directory": False, "is_symlink": False,
                  "error_time": "2026-11-30T18:00:00+00:00"} for src, dest in skipped]})
