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
    from balsam.launcher.service_calls import open_lease

    client = get_default_client()
    assert client.retry_count == 10
    site = client.post("/sites/", json={"name": "doomed", "path": str(tmp_path / "doomed")})
    source = open_lease(site["id"], None, tick_period=3600)
    session_id = source.session_id
    doomed_server_env.stop()

    source.close()

    assert client.request_counts[f"DELETE /sessions/{session_id}"] == SHUTDOWN_RETRY_COUNT + 1
    assert client.retry_count == 10  # the full budget is back for anything else in the process


@pytest.mark.parametrize("reaper", [True, False], ids=["reaper thread", "polled"])
def test_process_pool_stop_kills_the_whole_process_group_after_the_grace(reaper: bool, tmp_path: Path) -> None:
    """The in-process pool ends a task as its spawner does: SIGTERM to its process group, SIGKILL
    to the group after the grace even where the leader is gone (children that ignore or handle the
    SIGTERM used to keep running), and an early end of the wait only once every group is empty."""
    import os
    import sys
    import threading
    import time

    from balsam.launcher.runner import ProcessPool

    def running(pid: int) -> bool:  # a zombie (dead, not yet reaped by its new parent) is not running
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def pid_in(path: Path) -> int:
        deadline = time.monotonic() + 20
        while not (path.exists() and path.read_text().strip()):
            assert time.monotonic() < deadline, f"{path} not written"
            time.sleep(0.02)
        return int(path.read_text())

    commands = [
        "(trap '' TERM; exec sleep 300) & echo $! > child.pid; wait",
        f"{sys.executable} -c 'import os, signal, time; signal.signal(signal.SIGTERM, lambda *a: None); "
        "open(\"child.pid\", \"w\").write(str(os.getpid())); time.sleep(300)'; echo after",
    ]
    pool = ProcessPool(5, wake=threading.Event() if reaper else None)
    workdirs = []
    for job_id, cmd in enumerate(commands, 1):
        workdirs.append(tmp_path / str(job_id))
        workdirs[-1].mkdir()
        pool.start(job_id, cmd, workdirs[-1], dict(os.environ))
    children = [pid_in(w / "child.pid") for w in workdirs]
    time.sleep(0.2)
    started = time.monotonic()
    victims, finished = pool.terminate_all(1.0)
    assert time.monotonic() - started >= 1.0
    assert sorted(victims) == [1, 2] and finished == []
    time.sleep(0.1)
    assert [pid for pid in children if running(pid)] == []

    # A task that goes with its SIGTERM: no wait for the grace.
    pool = ProcessPool(5, wake=threading.Event() if reaper else None)
    (tmp_path / "quick").mkdir()
    pool.start(3, "sleep 30", tmp_path / "quick", dict(os.environ))
    time.sleep(0.1)
    started = time.monotonic()
    assert pool.terminate_all(5.0) == ([3], [])
    assert time.monotonic() - started < 4.0
