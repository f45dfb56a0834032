"""``balsam site globus-login`` run in a site writes the tokens file the site's agent reads
(``transfers.backend_options.globus.tokens_file``), and the agent's login command names that file.
HTTP goes to globus-sdk's registered testing responses only (``responses``), as in
tests/transfers/test_globus.py."""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from pathlib import Path

import globus_sdk
import globus_sdk.transport
import pytest
import responses
from click.testing import CliRunner
from globus_sdk.testing import get_last_request, get_response_set, load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferError, TransferFile, TransferLocation, build_backend
from balsam_transfer_globus.auth import login_command, save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from balsam_transfer_globus.hooks import globus_login

SITE_EP = "11111111-1111-1111-1111-111111111111"
REMOTE_EP = "22222222-2222-2222-2222-222222222222"
CLIENT_ID = "33333333-3333-3333-3333-333333333333"
LOCATION = TransferLocation.parse("aps", f"globus://{REMOTE_EP}")


@pytest.fixture(autouse=True)
def mocked_responses():
    responses.start()
    yield
    responses.stop()
    responses.reset()


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.delenv("BALSAM_GLOBUS_CLIENT_ID", raising=False)


def make_site(tmp_path: Path, tokens_file: str = "tokens/globus.json") -> Path:
    """A site directory (marker + settings.yml) whose Globus options set tokens_file and client_id."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text(
        "transfers:\n"
        f"  transfer_locations: {{aps: 'globus://{REMOTE_EP}'}}\n"
        f"  globus_endpoint_id: {SITE_EP}\n"
        "  backend_options:\n"
        "    globus:\n"
        f"      client_id: {CLIENT_ID}\n"
        f"      tokens_file: {tokens_file}\n"
    )
    return site


def register_code_exchange() -> None:
    exchange = get_response_set(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens).lookup("default")
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token",
                  json={**exchange.json, "refresh_token": "the-refresh-token"})


def test_login_in_a_site_writes_the_configured_tokens_file(tmp_path: Path, monkeypatch) -> None:
    site = make_site(tmp_path)
    monkeypatch.chdir(site / "data")  # anywhere inside the site: found as `balsam site` commands find it
    register_code_exchange()
    result = CliRunner().invoke(globus_login, [], input="the-code\n")  # no options: all from settings.yml
    assert result.exit_code == 0, result.output
    path = site / "tokens" / "globus.json"  # relative to the site directory, not the cwd
    assert f"tokens saved to {path}" in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["refresh_token"] == "the-refresh-token" and saved["client_id"] == CLIENT_ID
    assert saved["collections"] == sorted([SITE_EP, REMOTE_EP])
    assert not (tmp_path / "home" / "globus-tokens.json").exists()
    assert urllib.parse.parse_qs(get_last_request().body)["code"] == ["the-code"]

    # The agent's backend, built as the transfers module builds it, reads that same file.
    monkeypatch.chdir(tmp_path)
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "tokens_file": "tokens/globus.json",
                                                       "http_retries": 0}, site_path=str(site))
    assert backend.tokens_path() == path
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens)  # a refresh, if it happens
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(site / "data" / "a"))])
    assert get_last_request().url.endswith("/v0.10/transfer")
    assert get_last_request().headers["Authorization"].startswith("Bearer ")


def test_the_command_line_wins_over_the_site_settings(tmp_path: Path, monkeypatch) -> None:
    site = make_site(tmp_path)
    monkeypatch.chdir(site)
    register_code_exchange()
    result = CliRunner().invoke(globus_login, ["--tokens-file", "mine.json", "--client-id", "44444444-4444-4444-4444-444444444444"],
                                input="the-code\n")
    assert result.exit_code == 0, result.output
    saved = json.loads((site / "mine.json").read_text())  # relative to the cwd, as any command-line path
    assert saved["client_id"] == "44444444-4444-4444-4444-444444444444"
    assert not (site / "tokens" / "globus.json").exists()
    assert f"this site's agent reads {site / 'tokens' / 'globus.json'}" in result.output


def test_the_agent_names_the_configured_tokens_file_in_the_login_command(tmp_path: Path, monkeypatch) -> None:
    site = make_site(tmp_path)
    monkeypatch.chdir(tmp_path)
    configured = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "tokens_file": "tokens/globus.json"},
                               site_path=str(site))
    files = [TransferFile("/a", str(site / "data" / "a"))]
    expected = f"balsam site globus-login -e {SITE_EP} -e {REMOTE_EP} --tokens-file {site / 'tokens' / 'globus.json'}"
    with pytest.raises(TransferError) as err:
        configured.submit(LOCATION, TransferDirection.stage_in, files)
    assert str(err.value) == f"not logged in to Globus ({site / 'tokens' / 'globus.json'} missing): run `{expected}`"
    assert err.value.retryable

    # Expired credentials in the configured file: the same command.
    save_tokens(site / "tokens" / "globus.json", {"client_id": CLIENT_ID, "refresh_token": "secret-refresh",
                                                  "access_token": "stale", "expires_at_seconds": 1})
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens, case="invalid_grant")
    configured = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "tokens_file": "tokens/globus.json",
                                                          "http_retries": 0}, site_path=str(site))
    with pytest.raises(TransferError) as err:
        configured.submit(LOCATION, TransferDirection.stage_in, files)
    assert str(err.value) == f"Globus credentials expired or were revoked: run `{expected}`"

    # The default file (unset, or set to the default path): no --tokens-file.
    for options in ({}, {"tokens_file": str(tmp_path / "home" / "globus-tokens.json")}):
        default = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, **options}, site_path=str(site))
        with pytest.raises(TransferError) as err:
            default.submit(LOCATION, TransferDirection.stage_in, files)
        assert f"run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}`" in str(err.value)
        assert "--tokens-file" not in str(err.value)


def test_consent_required_names_the_configured_tokens_file(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    responses.add(responses.POST, "https://transfer.api.globus.org/v0.10/transfer", status=403, json={
        "code": "ConsentRequired", "message": "Missing required data_access consent", "request_id": "abc",
        "resource": "/v0.10/transfer",
        "required_scopes": [f"urn:globus:auth:scope:transfer.api.globus.org:all[*https://auth.globus.org/scopes/{REMOTE_EP}/data_access]"],
    })
    load_response(globus_sdk.TransferClient.get_submission_id)
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("test-token"),
                                       retry_config=globus_sdk.transport.RetryConfig(max_retries=0))
    backend = GlobusTransfer({"endpoint_id": SITE_EP, "tokens_file": "tokens/globus.json"}, site_path=str(site),
                             transfer_client=client)
    with pytest.raises(TransferError) as err:
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(site / "data" / "a"))])
    assert str(err.value) == ("Globus needs your consent to reach these collections: run `balsam site globus-login "
                              f"-e {SITE_EP} -e {REMOTE_EP} --tokens-file {site / 'tokens' / 'globus.json'}`")


def test_login_command_quotes_the_path_and_omits_the_default(tmp_path: Path) -> None:
    assert login_command([SITE_EP], tmp_path / "my tokens.json") == (
        f"balsam site globus-login -e {SITE_EP} --tokens-file '{tmp_path / 'my tokens.json'}'")
    assert login_command([], tmp_path / "home" / "globus-tokens.json") == "balsam site globus-login"
    assert login_command([SITE_EP]) == f"balsam site globus-login -e {SITE_EP}"
