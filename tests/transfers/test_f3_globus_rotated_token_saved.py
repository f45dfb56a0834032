"""A refresh token Globus rotated while the tokens file could not be written (a full file system)
was never written afterwards: the backend took the file, which still held the token before the
rotation, for "a newer login" at every later refresh, so the file kept a superseded refresh token
(what a restarted agent reads). The file's token is compared with the one last saved there."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set, load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferError, TransferFile, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import LOCATION, SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
TRANSFER = "https://transfer.api.globus.org/v0.10"
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]


def refresh_answer(access_token: str, refresh_token: str) -> dict:
    return {"access_token": access_token, "refresh_token": refresh_token, "expires_in": 172800,
            "scope": "urn:globus:auth:scope:transfer.api.globus.org:all", "token_type": "Bearer",
            "resource_server": "transfer.api.globus.org", "other_tokens": []}


def refresh_tokens_sent() -> list[str]:
    return [str(c.request.body) for c in responses.calls if c.request.url.startswith(TOKEN_URL)]


def full_disk_rotation(tmp_path: Path, monkeypatch) -> tuple[GlobusTransfer, Path, Path]:
    """A backend whose first refresh rotated r1 to r2 while the file could not be written."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": "33333333-3333-3333-3333-333333333333", "refresh_token": "r1",
                       "access_token": "AT1", "expires_at_seconds": int(time.time()) - 60})
    blocker = tmp_path / "home" / f".globus-tokens.json.{os.getpid()}.tmp"
    blocker.mkdir()  # save_tokens's temporary file cannot be made, as on a full file system
    responses.add(responses.POST, TOKEN_URL, json=refresh_answer("AT2", "r2"))
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP})
    assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert json.loads(path.read_text())["refresh_token"] == "r1"
    return backend, path, blocker


def test_a_rotated_refresh_token_is_saved_at_the_next_refresh_once_the_file_can_be_written(
        tmp_path: Path, monkeypatch) -> None:
    backend, path, blocker = full_disk_rotation(tmp_path, monkeypatch)
    shutil.rmtree(blocker)  # space again
    responses.replace(responses.POST, TOKEN_URL, json=refresh_answer("AT3", "r3"))
    backend._client.authorizer.expires_at = int(time.time()) - 60  # the access token expired again
    assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert "refresh_token=r2" in refresh_tokens_sent()[-1]
    saved = json.loads(path.read_text())
    assert (saved["refresh_token"], saved["access_token"]) == ("r3", "AT3")


def test_a_client_built_again_after_a_failed_save_uses_the_rotated_refresh_token(tmp_path: Path, monkeypatch) -> None:
    """After a consent error the client is dropped and built again from the file, which still holds
    r1 (its save failed): the same login, used with its token as rotated (r2), not the superseded one."""
    backend, path, blocker = full_disk_rotation(tmp_path, monkeypatch)
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=403, json={
        "code": "ConsentRequired", "message": "Missing required data_access consent", "request_id": "x",
        "required_scopes": ["urn:globus:auth:scope:transfer.api.globus.org:all"
                            f"[*https://auth.globus.org/scopes/{SITE_EP}/data_access]"]})
    with pytest.raises(TransferError, match="consent"):
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))])
    assert backend._client is None
    shutil.rmtree(blocker)
    responses.replace(responses.POST, TOKEN_URL, json=refresh_answer("AT3", "r3"))
    responses.replace(responses.POST, f"{TRANSFER}/transfer",
                      json=get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json)
    # The file's access token (AT1) has expired: the client built again refreshes with r2.
    assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert "refresh_token=r2" in refresh_tokens_sent()[-1]
    assert json.loads(path.read_text())["refresh_token"] == "r3"
