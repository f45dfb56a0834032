"""A short CLI command against a server that is down fails after a few retries, not minutes."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_interactive_command_gives_up_after_a_few_attempts(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "client.yml").write_text(
        yaml.safe_dump({"api_root": f"http://127.0.0.1:{_closed_port()}", "token": "t", "username": "u", "retry_count": 10})
    )
    env = {"BALSAM_HOME": str(home), "BALSAM_CLIENT_PATH": str(home / "client.yml"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "balsam"), "job", "ls"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: GET http://127.0.0.1:")
    assert "server unreachable after 4 attempts" in last
    assert "is it running? `balsam server status`" in last


@pytest.mark.parametrize("command, expected_cap", [("launcher", None), ("demo", None), ("job", 3), ("queue", 3)])
def test_only_short_commands_cap_retries(command, expected_cap):
    import balsam.client.rest as rest
    from balsam.cli import main

    rest.cap_retries_for_interactive_use(None)
    try:
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert rest._interactive_retry_cap == expected_cap
    finally:
        rest.cap_retries_for_interactive_use(None)
