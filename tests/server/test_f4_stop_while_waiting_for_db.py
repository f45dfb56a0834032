"""A server waiting at start for an unreachable database (up to 60 s, trying again) is stopped by
SIGTERM or Ctrl-C at once, with one line. uvicorn's handlers, under which the app factory runs,
only noted the signal for after the start: a stop of such a server (or of a --workers service
whose workers wait) hung until the wait ended. Real ``python -m balsam.server`` (uvicorn and its
supervisor), a PostgreSQL port nothing listens on. The 20 s bound only keeps a hung server from
holding the test: the wait it ends is 60 s."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from test_f2_worker_start_during_db_outage import WAITING, _free_port, _serve

STOPPED = "balsam server: stopped ("
#: Far below the 60 s the server would wait for the database.
STOP_BOUND_SEC = 20


def _unreachable() -> str:
    return f"postgresql://balsam:hunter2-secret@127.0.0.1:{_free_port()}/balsam"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_server_waiting_for_its_database_stops_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    server = _serve(_unreachable(), tmp_path, "--log-level", "warning")
    try:
        assert server.next_line(WAITING), server.tail()
        os.killpg(server.proc.pid, sig)  # as a Ctrl-C reaches the terminal's process group
        try:
            server.proc.wait(timeout=STOP_BOUND_SEC)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still waiting for the database {STOP_BOUND_SEC} s after {sig.name}:\n{server.tail()}")
        while server.next_line(""):
            pass
    finally:
        server.stop()
    assert server.proc.returncode != 0
    assert server.lines[-1].startswith(f"{STOPPED}{sig.name}) while waiting for the database "
                                       "postgresql://balsam:***@127.0.0.1:"), server.tail()
    assert "Traceback" not in server.tail() and "hunter2-secret" not in server.tail(), server.tail()


def test_a_service_whose_workers_wait_for_the_database_stops_on_sigterm(tmp_path: Path) -> None:
    server = _serve(_unreachable(), tmp_path, "--workers", "2", "--log-level", "warning")
    try:
        assert server.next_line(WAITING) and server.next_line(WAITING), server.tail()
        server.proc.send_signal(signal.SIGTERM)  # the supervisor: it stops its workers
        try:
            server.proc.wait(timeout=STOP_BOUND_SEC)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still waiting for the database {STOP_BOUND_SEC} s after SIGTERM:\n{server.tail()}")
        while server.next_line(""):
            pass
    finally:
        server.stop()
    assert any(line.startswith(f"{STOPPED}SIGTERM)") for line in server.lines), server.tail()
    assert "Traceback" not in server.tail(), server.tail()
