"""A refreshed access token that cannot be written back to the tokens file (its file system full,
over quota, read-only) failed the request that refreshed it: the submission (or the poll) failed
with ``globus: OSError: ...``, a line naming no fix, although the new token was good. The request
goes on with the token in memory and the failure to save it is logged once as a warning."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import globus_sdk
import pytest
from globus_sdk.testing import get_last_request, get_response_set, load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferFile, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import LOCATION, SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]


def test_a_refreshed_token_that_cannot_be_saved_does_not_fail_the_request(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": "33333333-3333-3333-3333-333333333333", "refresh_token": "r1",
                       "access_token": "old", "expires_at_seconds": int(time.time()) - 60})
    # The temporary file save_tokens writes cannot be created (as a full or read-only file system
    # refuses it; a directory in its place, as the tests run as root).
    (tmp_path / "home" / f".globus-tokens.json.{os.getpid()}.tmp").mkdir()
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens)  # the refresh answer
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP})
    with caplog.at_level(logging.WARNING, logger="balsam_transfer_globus.backend"):
        assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert get_last_request().headers["Authorization"] == "Bearer transfer_access_token"
    assert json.loads(path.read_text())["access_token"] == "old"  # not written, and not damaged
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(path) in warning and "IsADirectoryError" in warning and "\n" not in warning
    assert "transfer_access_token" not in caplog.text  # a token value is never logged
