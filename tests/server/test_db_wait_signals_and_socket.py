"""A review's findings on the start-up wait for a database (balsam.server.app): a local PostgreSQL
reached by its Unix socket, stopped or restarting, was refused for good (exit 3 stops a --workers
service) rather than waited for; a stop sent during the first try went unheeded through the waits
after it; a second signal while the stop was reported escaped as a raw exception. Real driver
errors, real signals to this process (with a recording handler in place, as uvicorn's)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from balsam.server import app as server_app
from balsam.server.app import _create_app_waiting, _database_problem, _HeedStopWhileWaiting, _Stopped


def _connect_error(url: str) -> sa.exc.DBAPIError:
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    pytest.fail(f"connected to {url}")


def test_a_local_server_whose_socket_is_gone_is_waited_for(tmp_path: Path) -> None:
    exc = _connect_error(f"postgresql+psycopg2://balsam@/balsam?host={tmp_path}")
    assert "No such file or directory" in str(exc.orig), str(exc.orig)
    assert _database_problem(exc) == "transient", str(exc.orig).splitlines()[0]


@pytest.fixture
def recording_handlers() -> Iterator[list[int]]:
    """SIGINT/SIGTERM handlers that only record, as uvicorn's capture_signals does."""
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _f: seen.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_a_stop_during_the_first_try_ends_the_wait_at_once(monkeypatch: pytest.MonkeyPatch,
                                                           recording_handlers: list[int]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = _connect_error(f"postgresql+psycopg2://balsam@127.0.0.1:{port}/balsam")
    assert _database_problem(refused) == "transient"
    tries: list[int] = []

    def first_try_gets_the_stop(settings: Any = None) -> Any:
        tries.append(1)
        if len(tries) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the operator's Ctrl-C, while the try runs
        raise refused

    monkeypatch.setattr(server_app, "create_app", first_try_gets_the_stop)
    monkeypatch.setattr(server_app, "DATABASE_WAIT_SEC", 3.0)
    heed = _HeedStopWhileWaiting()
    try:
        with pytest.raises(_Stopped):  # before: the waits went on, then exit 4 (SystemExit)
            _create_app_waiting(None, "postgresql://balsam@db/balsam", heed)  # type: ignore[arg-type]
    finally:
        for sig, handler in heed._previous.items():
            signal.signal(sig, handler)
    assert tries == [1] and heed.received == [signal.SIGINT]
    assert recording_handlers == []  # ours noted it (handed to uvicorn's on exit)


def test_a_second_signal_while_the_stop_is_reported_is_only_noted(recording_handlers: list[int]) -> None:
    heed = _HeedStopWhileWaiting()
    heed.listen()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            heed.sleep(30)
        except _Stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one (systemd to the cgroup, a second Ctrl-C)
            signal.getsignal(signal.SIGTERM)  # a bytecode or two for the handler to run here
        timer.join()
        assert heed.received == [signal.SIGTERM, signal.SIGTERM]
    finally:
        for sig, handler in heed._previous.items():
            signal.signal(sig, handler)
