"""A task ``task_list`` leaves out and ``GET /task/<id>`` answers 404 for.

Globus shows a task only to the identity that submitted it, and it answers 404 (not only 403) for
another identity's task. The backend took every such 404 for "gone": after a ``globus-login`` with
another identity while a task ran (the running agent picks a new login up at its next call), the
task's items went back to pending and their files were submitted a second time beside the task still
writing them. Now a 404 for a task this process submitted with an earlier login keeps it in flight
with one line saying why and what to run, and the agent's deadline ends it (its cancel is refused
too: each file fails one try, then is sent again). A task submitted with the login in use, or by an
earlier agent process (whose login cannot be told), is still gone on a 404.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.transfer import build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import REMOTE_EP, SITE_EP, mocked_responses  # noqa: F401
from transfer_test_utils import FakeAPI

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
CLIENT_ID = "33333333-3333-3333-3333-333333333333"
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
NOT_FOUND = {"code": "ClientError.NotFound", "message": "Task not found", "request_id": "r"}
T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def write_login(path: Path, refresh: str, access: str) -> None:
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": refresh, "access_token": access,
                       "expires_at_seconds": int(time.time()) + 170000})


def empty_task_list() -> None:
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [], "DATA_TYPE": "task_list", "length": 0, "limit": 1000, "offset": 0, "total": 0})


def posts() -> list[str]:
    return [urllib.parse.urlsplit(c.request.url).path for c in responses.calls if c.request.method == "POST"]


def file_backend() -> GlobusTransfer:
    """As the agent builds it: its client comes from the tokens file."""
    return build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})


def site(tmp_path: Path, backend: GlobusTransfer, **options):
    root = tmp_path / "site"
    (root / "data").mkdir(parents=True)
    api = FakeAPI([{"id": 1, "job_id": 7, "direction": "in", "location_alias": "aps", "remote_path": "/data/run 7/ä.h5",
                    "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}}],
                  [{"id": 7, "workdir": "job7", "state": "READY"}])
    module = TransfersModule(SimpleNamespace(site_path=str(root), data_path=str(root / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                              globus_endpoint_id=SITE_EP, **options), api)
    backend.site_path = str(root)
    module.backends["globus"] = backend
    clock = [T0]
    module.now = lambda: clock[0]
    return api, module, clock


def test_a_404_after_a_login_with_another_identity_does_not_send_the_files_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    tokens = tmp_path / "home" / "globus-tokens.json"
    write_login(tokens, "r-alice", "alice-access")
    api, module, clock = site(tmp_path, file_backend(), task_timeout_sec=600, retry_backoff_sec=30)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    module.run_cycle()
    assert (api.items[1]["state"], api.items[1]["task_id"]) == ("active", f"globus:{TASK_ID}")

    write_login(tokens, "r-bob", "bob-access")  # `balsam site globus-login` with another identity
    empty_task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}", status=404, json=NOT_FOUND)
    for cycle in range(1, 4):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
    item = api.items[1]
    # Still in flight on its task, its files not submitted a second time beside it.
    assert (item["state"], item["task_id"]) == ("active", f"globus:{TASK_ID}")
    assert posts() == ["/v0.10/transfer"]
    reason = item["transfer_info"]["reason"]
    assert reason.startswith(f"Globus does not show task {TASK_ID} to the logged-in identity (HTTP 404 "
                             "ClientError.NotFound; it was submitted with an earlier login")
    assert f"run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}` with the identity that submitted it" in reason
    assert "\n" not in reason

    # Its deadline ends it: the cancel is refused (404 too), each file fails one try, and only then
    # is it sent again (after its backoff).
    responses.add(responses.POST, f"{TRANSFER}/task/{TASK_ID}/cancel", status=404, json=NOT_FOUND)
    clock[0] = T0 + dt.timedelta(seconds=700)
    module.run_cycle()
    item = api.items[1]
    assert item["state"] == "pending" and item["task_id"] == ""
    assert "did not finish within 600 s" in item["transfer_info"]["error"]
    assert item["transfer_info"]["attempts"] == 1 and item["transfer_info"]["retry_after"] == "2032-05-01T12:12:10+00:00"
    assert posts() == ["/v0.10/transfer", f"/v0.10/task/{TASK_ID}/cancel"]


def test_a_404_of_a_task_submitted_with_the_login_in_use_is_still_gone(tmp_path: Path, monkeypatch, caplog) -> None:
    """Also when the tokens file was rewritten with the same login (refreshed access token)."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    tokens = tmp_path / "home" / "globus-tokens.json"
    write_login(tokens, "r-alice", "alice-access")
    api, module, clock = site(tmp_path, file_backend())
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    module.run_cycle()
    write_login(tokens, "r-alice", "alice-access-2")
    empty_task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}", status=404, json=NOT_FOUND)
    clock[0] = T0 + dt.timedelta(seconds=5)
    with caplog.at_level(logging.INFO, logger="balsam.site.modules.transfers"):
        module.run_cycle()
    assert api.items[1]["state"] == "pending"  # gone for Globus: copied again, as before
    assert f"is unknown to its backend (Globus does not know task {TASK_ID} (HTTP 404 ClientError.NotFound))" in caplog.text


def test_a_refresh_that_rotates_the_refresh_token_is_the_same_login(tmp_path: Path, monkeypatch, caplog) -> None:
    """Globus Auth may answer an access-token refresh with a new refresh token (the backend writes
    it to the tokens file). The login was told by a digest of the refresh token, so the task
    submitted before the refresh looked "submitted with an earlier login": a 404 for it, genuine,
    kept it in flight until task_timeout_sec with a reason naming another identity. Logins are told
    apart by an id of each client's login now, kept across a rotation."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    tokens = tmp_path / "home" / "globus-tokens.json"
    write_login(tokens, "r-alice", "alice-access")
    backend = file_backend()
    api, module, clock = site(tmp_path, backend, task_timeout_sec=600)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    client = backend.client()
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token", json={
        "access_token": "alice-access-2", "refresh_token": "r-alice-2", "expires_in": 172800,
        "resource_server": "transfer.api.globus.org", "token_type": "Bearer",
        "scope": "urn:globus:auth:scope:transfer.api.globus.org:all", "other_tokens": []})
    client.authorizer.handle_missing_authorization()  # as on a 401: refreshed at the next call
    empty_task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}", status=404, json=NOT_FOUND)
    clock[0] = T0 + dt.timedelta(seconds=5)
    with caplog.at_level(logging.INFO, logger="balsam.site.modules.transfers"):
        module.run_cycle()
    assert backend._login is not None and backend._login.refresh_token == "r-alice-2"
    assert '"r-alice-2"' in tokens.read_text()  # the rotated token saved
    assert backend.client() is client  # not rebuilt: the same login
    assert api.items[1]["state"] == "pending", api.items[1]  # gone for Globus: copied again
    assert f"(Globus does not know task {TASK_ID} (HTTP 404 ClientError.NotFound))" in caplog.text
    # A client built again from the same (rotated) login keeps its id; a new login gets another.
    login = backend._login
    backend._client, backend._login = None, None
    backend.client()
    assert backend._login is not login and backend._login.serial == login.serial
    write_login(tokens, "r-bob", "bob-access")
    backend.client()
    assert backend._login.serial != login.serial
