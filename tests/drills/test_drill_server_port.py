"""The drill server's readiness check accepts only its own process listening on its port.

The kill -9 drill starts the server again on the same port; were another server to hold it by then,
uvicorn would fail to bind a moment after starting, and a check that only asked the port for an
answer would point the drill (and its launchers) at that other server.
"""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from drill_harness import DrillServer  # noqa: E402


class _Answers200(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # every path, /auth/how included
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_start_refuses_a_port_another_server_holds(tmp_path: Path) -> None:
    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    server = DrillServer(tmp_path / "server", f"sqlite:///{tmp_path / 'drill.db'}")
    server.port = foreign.server_address[1]
    server.url = f"http://127.0.0.1:{server.port}"
    try:
        with pytest.raises(AssertionError, match="server exited"):
            server.start(timeout=60)
    finally:
        server.stop()
        foreign.shutdown()
        foreign.server_close()
