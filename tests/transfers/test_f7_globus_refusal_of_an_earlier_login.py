"""A refused refresh is filed under the login whose request it was. A request that took the client
of a login before a new `globus-login` was picked up (another thread, the new login's client built
meanwhile) and whose refresh Globus Auth then refused was filed under the *current* login: the new,
valid login was answered "credentials revoked" without a call until its file changed again, and its
client dropped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import responses

from balsam.transfer import TransferError, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
CLIENT_ID = "33333333-3333-3333-3333-333333333333"


def test_the_refusal_of_an_earlier_logins_refresh_does_not_lock_out_the_new_login(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "OLD", "access_token": "AT",
                       "expires_at_seconds": int(time.time()) - 10})
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    old_client = backend.client()  # a request takes the client of the login in the file
    time.sleep(0.01)
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "NEW", "access_token": "AT2",
                       "expires_at_seconds": int(time.time()) + 3600})
    new_client = backend.client()  # another thread: the new login is picked up
    assert new_client is not old_client
    responses.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
    with pytest.raises(Exception) as refused:
        old_client.get_submission_id()  # the first request's refresh, of OLD, is refused
    error = backend._error(refused.value)
    assert "run `balsam site globus-login" in str(error)
    # The new login is neither locked out nor dropped.
    assert backend.client() is new_client
    calls = len(responses.calls)
    assert backend.new_submission_token()  # the fixture's submission id, asked with the new login
    assert len(responses.calls) == calls + 1


def test_the_refusal_of_the_current_logins_refresh_is_still_remembered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "OLD", "access_token": "AT",
                       "expires_at_seconds": int(time.time()) - 10})
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    responses.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
    with pytest.raises(TransferError, match="revoked"):
        backend.new_submission_token()
    calls = len(responses.calls)
    with pytest.raises(TransferError, match="revoked"):
        backend.client()
    assert len(responses.calls) == calls  # answered without a call
