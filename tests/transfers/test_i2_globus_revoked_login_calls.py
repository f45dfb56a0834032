"""A revoked (or expired) refresh token: Globus Auth refuses it, and the agent asked Auth again at
every call, with the same token from the same unchanged tokens file: a poll and a submission per
5 s cycle, ~1,400 refused refreshes an hour for as long as nobody logs in (and a Globus Auth rate
limit then replaced "run `balsam site globus-login`" by "Globus Auth unavailable (HTTP 429)").
Until the tokens file changes (a new `globus-login`), the backend answers the same one-line error
without a call; the items wait (retryable), and the new login is used at the next call."""

from __future__ import annotations

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
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
CLIENT_ID = "33333333-3333-3333-3333-333333333333"


def auth_calls() -> int:
    return sum(1 for c in responses.calls if c.request.url.startswith(TOKEN_URL))


def test_a_revoked_refresh_token_is_not_sent_to_globus_auth_again_until_a_new_login(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "RT-revoked", "access_token": "AT",
                       "expires_at_seconds": int(time.time()) - 10})
    refused = responses.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP})
    backend.use_locations([LOCATION])
    files = [TransferFile("/a", str(tmp_path / "a"))]
    errors = []
    for _cycle in range(5):
        for call in (lambda: backend.poll(["t1"]), lambda: backend.submit(LOCATION, TransferDirection.stage_in, files)):
            with pytest.raises(TransferError) as err:
                call()
            assert err.value.retryable  # the items wait, their jobs do not fail
            errors.append(str(err.value))
    assert auth_calls() == 1
    assert set(errors) == {f"Globus credentials expired or were revoked: run `balsam site globus-login -e {SITE_EP} "
                           f"-e {REMOTE_EP}`"}

    # The user logs in again: the next call uses the new login.
    responses.remove(refused)
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "RT-new", "access_token": "AT-new",
                       "expires_at_seconds": int(time.time()) + 3600})
    load_response(globus_sdk.TransferClient.submit_transfer)
    assert backend.submit(LOCATION, TransferDirection.stage_in, files) == TASK_ID
    assert responses.calls[-1].request.headers["Authorization"] == "Bearer AT-new"


def test_globus_auth_down_is_still_asked_again_at_the_next_call(tmp_path: Path, monkeypatch) -> None:
    """Only a refusal of the login is remembered: an outage (5xx) says nothing of the token."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    save_tokens(tmp_path / "home" / "globus-tokens.json", {
        "client_id": CLIENT_ID, "refresh_token": "RT", "access_token": "AT", "expires_at_seconds": int(time.time()) - 10})
    responses.add(responses.POST, TOKEN_URL, status=503, json={"error": "unavailable"})
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    for _ in range(3):
        with pytest.raises(TransferError, match="Globus Auth unavailable"):
            backend.poll(["t1"])
    assert auth_calls() == 3
