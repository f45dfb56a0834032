"""``balsam server start --host ::1``: the TCP url is ``http://[::1]:PORT``. Before: it was
built as ``http://::1:PORT`` and httpx.InvalidURL escaped as a traceback before the server
started. Real ``balsam`` processes, a real embedded server, a private BALSAM_HOME."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

BALSAM = [str(Path(sys.executable).with_name("balsam"))]


def free_port_v6() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


def run(args, env, timeout=90):
    return subprocess.run(BALSAM + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home_env(tmp_path):
    try:
        free_port_v6()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    home = tmp_path / "home"
    env = dict(os.environ, BALSAM_HOME=str(home))
    for key in ("BALSAM_CLIENT_PATH", "BALSAM_DATABASE_URL", "BALSAM_AUTH_SECRET_KEY"):
        env.pop(key, None)
    yield env
    run(["server", "stop"], env)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "balsam.server.embedded" in cmdline and any(str(home) in arg for arg in cmdline):
            proc.kill()


def test_start_on_the_ipv6_loopback_brackets_its_url(home_env):
    port = free_port_v6()
    started = run(["server", "start", "--host", "::1", "--port", str(port)], home_env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "Traceback" not in started.stderr and f"http://[::1]:{port}" in started.stdout, started.stdout
    info = json.loads((Path(home_env["BALSAM_HOME"]) / "server" / "server.json").read_text())
    assert info["url"] == f"http://[::1]:{port}"
    assert httpx.get(info["url"] + "/", timeout=10).status_code == 200  # Host [::1]: a loopback name
    status = run(["server", "status"], home_env)
    assert status.returncode == 0 and f"http://[::1]:{port}" in status.stdout, status.stdout
