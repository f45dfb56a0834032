"""A launcher whose server cannot be reached (the login node's unix socket seen from a compute node,
a server that is down) says so in one line after its retries, not in a traceback."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher_helpers import closed_port, offline_site


def _run_launcher(tmp_path: Path, api_root: str) -> subprocess.CompletedProcess:
    # One retry: the retry budget is the client file's, as a launcher credential's would be.
    site, env = offline_site(tmp_path, api_root, retry_count=1)
    return subprocess.run([sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "1", "--site", str(site)],
                          env=env, capture_output=True, text=True, timeout=120)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert line.startswith(f"Error: the launcher on {socket.gethostname()} cannot reach the Balsam server at ")
    return line


def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    api_root = f"unix://{run}/balsam.sock"
    proc = _run_launcher(tmp_path, api_root)
    line = _error_line(proc)
    assert api_root in line and "compute nodes need a server they can reach" in line
    assert "docs/server.md#shared-deployment-on-postgresql" in line
    # The first failed attempt says what is retried and for how long, once.
    (warning,) = [ln for ln in proc.stderr.splitlines() if "retrying" in ln]
    assert warning.startswith("WARNING") and api_root in warning and "retrying up to 1 time over" in warning


def test_socket_directory_missing_on_this_host(tmp_path: Path) -> None:
    line = _error_line(_run_launcher(tmp_path, f"unix://{tmp_path}/nonexistent/balsam.sock"))
    assert f"{tmp_path}/nonexistent does not exist on this host" in line
    assert "local Balsam server is not running" not in line


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_address_gets_the_hint(tmp_path: Path, host: str) -> None:
    line = _error_line(_run_launcher(tmp_path, f"http://{host}:{closed_port()}"))
    assert "compute nodes need a server they can reach" in line


class _DatabaseDownHandler(http.server.BaseHTTPRequestHandler):
    """A server that answers every call 503 with Retry-After: its database is unreachable."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"detail": "The database is unavailable; retry shortly"}'
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_whose_database_stays_down_ends_the_launcher_in_one_line(tmp_path: Path) -> None:
    # The server answers, but 503 for the whole retry budget: the launcher's start-up ended in ~40
    # lines of traceback (APIError), where a server it cannot reach gets one line.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DatabaseDownHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api_root = f"http://127.0.0.1:{server.server_address[1]}"
        proc = _run_launcher(tmp_path, api_root)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert line.startswith(f"Error: the launcher on {socket.gethostname()} gave up on the Balsam server at {api_root}")
    assert "HTTP 503" in line and "The database is unavailable" in line
