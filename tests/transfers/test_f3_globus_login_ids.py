"""``balsam site globus-login`` takes a collection or client id however ``uuid.UUID`` reads it
(``{...}``, ``urn:uuid:...``, capitals, no hyphens) and put it into the consent scope as typed: a
scope no collection has. It now goes in as Globus writes it, once, also when settings.yml names the
same collection another way. A bad ``$BALSAM_GLOBUS_CLIENT_ID`` was reported as an invalid
``--client-id``, an option the user never typed: the error names the variable."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import globus_sdk
import pytest
import responses
from click.testing import CliRunner
from globus_sdk.scopes import ScopeParser
from globus_sdk.testing import get_response_set

from balsam_transfer_globus.hooks import globus_login
from globus_test_utils import REMOTE_EP, SITE_EP, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

CLIENT_ID = "33333333-3333-3333-3333-333333333333"
COLLECTION = "aa6c5a3e-1111-2222-3333-444455556666"


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.delenv("BALSAM_GLOBUS_CLIENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)


def login(args: list[str]) -> tuple[set[str], str]:
    """(the data_access scopes the login link asks for, the client id it names)."""
    exchange = get_response_set(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens).lookup("default")
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token", json={**exchange.json, "refresh_token": "RT"})
    result = CliRunner().invoke(globus_login, args, input="the-code\n")
    assert result.exit_code == 0, result.output
    query = urllib.parse.parse_qs(result.output.split("https://auth.globus.org/v2/oauth2/authorize?", 1)[1].split()[0])
    (transfer,) = [s for s in ScopeParser.parse(query["scope"][0])
                   if s.scope_string == "urn:globus:auth:scope:transfer.api.globus.org:all"]
    deps = [d.scope_string for d in transfer.dependencies]
    assert len(deps) == len(set(deps)), deps
    return set(deps), query["client_id"][0]


@pytest.mark.parametrize("typed", [f"{{{COLLECTION}}}", f"urn:uuid:{COLLECTION}", COLLECTION.upper(),
                                   COLLECTION.replace("-", "")])
def test_an_id_spelled_another_way_goes_into_the_scope_as_globus_writes_it(typed: str) -> None:
    deps, client_id = login(["--client-id", CLIENT_ID.replace("-", ""), "-e", typed, "-e", COLLECTION])
    assert deps == {f"https://auth.globus.org/scopes/{COLLECTION}/data_access"}
    assert client_id == CLIENT_ID


def test_a_collection_of_settings_yml_spelled_another_way_is_asked_once(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text(
        "transfers:\n"
        f"  transfer_locations: {{aps: 'globus://{COLLECTION.upper()}'}}\n"
        f"  globus_endpoint_id: {SITE_EP}\n"
        "  backend_options:\n"
        "    globus:\n"
        f"      client_id: {CLIENT_ID}\n")
    monkeypatch.chdir(site)
    deps, _ = login(["-e", COLLECTION])
    assert deps == {f"https://auth.globus.org/scopes/{c}/data_access" for c in (COLLECTION, SITE_EP)}


def test_a_bad_client_id_from_the_environment_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_GLOBUS_CLIENT_ID", "my-app")
    result = CliRunner().invoke(globus_login, ["-e", REMOTE_EP], input="the-code\n")
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line == ("Error: Invalid value for $BALSAM_GLOBUS_CLIENT_ID (environment): 'my-app' is not the UUID of "
                    "a native app registered at app.globus.org")
    assert not responses.calls
