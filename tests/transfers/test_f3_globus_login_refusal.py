"""Only Globus Auth's own refusal of the login is remembered (and answered without a call until the
tokens file changes): a 400/401 whose OAuth ``error`` is ``invalid_grant``, ``invalid_client`` or
``unauthorized_client``. Any 4xx from the token endpoint was: a proxy's 403 page, a 408, a 404
during maintenance locked the agent out of Globus until someone logged in again, though Globus
Auth answered again at the next call. And a remembered refusal is asked again after
LOGIN_REFUSED_RECHECK_SEC even when the file did not change."""

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
from globus_test_utils import LOCATION, SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
#: docs/transfers.md: a refused login is asked again every 15 minutes (LOGIN_REFUSED_RECHECK_SEC).
RECHECK_SEC = 15 * 60
CLIENT_ID = "33333333-3333-3333-3333-333333333333"


def auth_calls() -> int:
    return sum(1 for c in responses.calls if c.request.url.startswith(TOKEN_URL))


def expired_login(tmp_path: Path, monkeypatch) -> GlobusTransfer:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    save_tokens(tmp_path / "home" / "globus-tokens.json", {
        "client_id": CLIENT_ID, "refresh_token": "RT", "access_token": "AT", "expires_at_seconds": int(time.time()) - 10})
    return build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})


@pytest.mark.parametrize("status, kwargs", [
    (408, {"body": "<html>Request Timeout</html>", "content_type": "text/html"}),
    (403, {"body": "<html>Forbidden by proxy</html>", "content_type": "text/html"}),
    (404, {"body": "<html>maintenance</html>", "content_type": "text/html"}),
    (400, {"json": {"error": "invalid_request"}}),
])
def test_a_4xx_that_is_no_refusal_of_the_login_is_asked_again_at_the_next_call(tmp_path: Path, monkeypatch,
                                                                             status, kwargs) -> None:
    backend = expired_login(tmp_path, monkeypatch)
    files = [TransferFile("/a", str(tmp_path / "a"))]
    blip = responses.add(responses.POST, TOKEN_URL, status=status, **kwargs)
    with pytest.raises(TransferError) as err:
        backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert err.value.retryable
    responses.remove(blip)  # the token endpoint answers again
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens)  # the refresh's answer
    load_response(globus_sdk.TransferClient.submit_transfer)
    assert backend.submit(LOCATION, TransferDirection.stage_in, files) == TASK_ID
    assert auth_calls() == 2


@pytest.mark.parametrize("status, error", [(400, "invalid_grant"), (401, "invalid_client"),
                                           (400, "unauthorized_client")])
def test_a_refused_login_is_asked_again_after_the_recheck_time_though_the_file_is_unchanged(
        tmp_path: Path, monkeypatch, status, error) -> None:
    backend = expired_login(tmp_path, monkeypatch)
    now = [1000.0]
    backend.clock = lambda: now[0]
    files = [TransferFile("/a", str(tmp_path / "a"))]
    refused = responses.add(responses.POST, TOKEN_URL, status=status, json={"error": error})
    for _ in range(3):
        with pytest.raises(TransferError, match="Globus credentials expired or were revoked"):
            backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert auth_calls() == 1  # remembered: not sent again
    now[0] += RECHECK_SEC - 1
    with pytest.raises(TransferError, match="Globus credentials expired or were revoked"):
        backend.poll(["t1"])
    assert auth_calls() == 1
    # The login was restored (or the refusal was Globus Auth's mistake): asked again, and used.
    now[0] += 1
    responses.remove(refused)
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens)
    load_response(globus_sdk.TransferClient.submit_transfer)
    assert backend.submit(LOCATION, TransferDirection.stage_in, files) == TASK_ID
    assert auth_calls() == 2
