"""A launcher whose API server is gone still shuts down promptly (the lease expires server-side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture
def doomed_server_env(live_server_factory: Any, register: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A user on a server of its own (this test stops it), with the default client retry budget."""
    from balsam._api.model import reset_default_client
    from balsam.client.rest import cap_retries_for_interactive_use

    cap_retries_for_interactive_use(None)  # as in a launcher process, which never caps
    server = live_server_factory()
    username, _password, _user_id, token, expiry = register(server.url)
    client_path = tmp_path / "home" / "client.yml"
    client_path.parent.mkdir()
    client_path.write_text(yaml.safe_dump(
        {"api_root": server.url, "token": token, "token_expiry": expiry.isoformat(), "username": username, "retry_count": 10}
    ))
    monkeypatch.setenv("BALSAM_HOME", str(client_path.parent))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(client_path))

    reset_default_client()
    yield server
    reset_default_client()


def test_session_delete_at_shutdown_gives_up_quickly_when_the_api_is_gone(doomed_server_env: Any, tmp_path: Path):
    from balsam._api.model import get_default_client
    from balsam.client.lease import SHUTDOWN_RETRY_COUNT
    from balsam.launcher._api import open_lease

    client = get_default_client()
    assert client.retry_count == 10
    site = client.post("/sites/", json={"name": "doomed", "path": str(tmp_path / "doomed")})
    source = open_lease(site["id"], None, tick_period=3600)
    session_id = source.session_id
    doomed_server_env.stop()

    source.close()

    assert client.request_counts[f"DELETE /sessions/{session_id}"] == SHUTDOWN_RETRY_COUNT + 1
    assert client.retry_count == 10  # the full budget is back for anything else in the process
