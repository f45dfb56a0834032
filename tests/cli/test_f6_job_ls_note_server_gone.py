"""`balsam job ls` whose AWAITING_PARENTS note cannot be read (the server went away right after the
table: a restart, a deploy), against a real server that is stopped at that moment.

Before: the note's request, sent after the whole table was on stdout, spent the client's retries
(4 attempts, with their backoff) and then made `job ls` exit with status 1, although the listing it
exists for was complete. Now the note is tried once and says in one line that it could not read the
parents; the exit status stays 0."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture
def own_server(live_server_factory: Any) -> Any:
    """A server of this test's own, which it stops (the shared one serves other tests)."""
    return live_server_factory("sqlite")


@pytest.fixture
def live_server(own_server: Any) -> str:
    """``balsam_env``'s server: this test's own."""
    return own_server.url


def test_job_ls_exits_0_when_the_note_cannot_be_read(own_server: Any, balsam_env: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.client import RESTClient

    campaign = make_campaign(balsam_env.url, balsam_env.token, n_jobs=2)
    api = httpx.Client(base_url=balsam_env.url, headers=balsam_env.headers(), timeout=60)
    resp = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": "kid",
                                     "parent_ids": [campaign["failed"]]}])
    assert resp.status_code == 201, resp.text
    kid = resp.json()[0]["id"]
    api.close()

    real = RESTClient._send
    after_table: list[str] = []

    def server_goes_away(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        params = kwargs.get("params") or {}
        if path == "/jobs/" and "state__ne" in params:  # the note's request, after the table
            after_table.append(path)
            own_server.stop()
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "_send", server_goes_away)
    out = balsam("job", "ls", "-s", "AWAITING_PARENTS")  # the parent is not in the table: it is read
    assert after_table, "the note did not read the parents"
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[1].split()[:2] == [str(kid), campaign["site"]["name"]], out.stdout
    note = out.stderr.strip()
    assert note.count("\n") == 0, note
    assert note.startswith("1 of these jobs waits for their parents (AWAITING_PARENTS): 1 for parents outside this "
                           "listing (could not read their parents: GET "), note
    assert "server unreachable after 1 attempt:" in note, note  # tried once, not the client's retries
