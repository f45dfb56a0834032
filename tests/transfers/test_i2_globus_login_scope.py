"""The login asks Globus Auth for the data_access consents in the form Globus Transfer itself
requires them: its ConsentRequired names ``transfer...:all[*https://auth.globus.org/scopes/<id>/data_access]``,
the dependency *optional* (``*``: only a GCS v5 mapped collection uses data_access, see
globus-sdk's own ``_uses_data_access``; guest collections, Globus Connect Personal and high-assurance
collections do not). The login asked for it as required on every collection named."""

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

#: What Globus Transfer's ConsentRequired asks for (tests/transfers/test_globus.py's fixture).
REQUIRED = f"urn:globus:auth:scope:transfer.api.globus.org:all[*https://auth.globus.org/scopes/{REMOTE_EP}/data_access]"


def test_the_login_requests_data_access_as_globus_transfer_requires_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    exchange = get_response_set(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens).lookup("default")
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token", json={**exchange.json, "refresh_token": "RT"})
    result = CliRunner().invoke(globus_login, ["--client-id", "33333333-3333-3333-3333-333333333333",
                                               "-e", REMOTE_EP, "-e", SITE_EP], input="the-code\n")
    assert result.exit_code == 0, result.output
    authorize = result.output.split("https://auth.globus.org/v2/oauth2/authorize?", 1)[1].split()[0]
    (requested,) = [s for s in ScopeParser.parse(urllib.parse.parse_qs(authorize)["scope"][0])
                    if s.scope_string == "urn:globus:auth:scope:transfer.api.globus.org:all"]
    deps = {d.scope_string: d.optional for d in requested.dependencies}
    assert deps == {f"https://auth.globus.org/scopes/{c}/data_access": True for c in (REMOTE_EP, SITE_EP)}
    (required,) = ScopeParser.parse(REQUIRED)
    assert set(required.dependencies) <= set(requested.dependencies)


@pytest.mark.parametrize("args, problem", [
    (["--client-id", "33333333-3333-3333-3333-333333333333", "-e", "aps"],
     "'aps' is not a collection UUID (the id of a globus://<collection-id> location, not its alias)"),
    (["--client-id", "my-app", "-e", REMOTE_EP], "'my-app' is not the UUID of a native app registered at app.globus.org"),
])
def test_an_id_that_is_no_uuid_is_refused_before_the_login_link(tmp_path: Path, monkeypatch, args, problem) -> None:
    """`-e aps` (the location's alias) went into the login link: Globus Auth then showed an error page
    about the scope https://auth.globus.org/scopes/aps/data_access, which the user never wrote."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(globus_login, args, input="the-code\n")
    assert result.exit_code == 2, result.output
    assert "oauth2/authorize" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.endswith(problem), line
    assert not responses.calls
