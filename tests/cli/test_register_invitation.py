"""An invitation code never rides on a command line (`balsam register`, `balsam server user invite`).

Every user of a login node reads every process's command line (/proc/<pid>/cmdline is mode 0444):
while ``balsam register ... --invitation CODE`` waited at its password prompt, another user could
take the code and register the account first with a password of their own. These tests run the
real ``balsam`` CLI in subprocesses against a real uvicorn server.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

BALSAM = str(Path(sys.executable).parent / "balsam")
PASSWORD = "correct horse battery"
CODE = re.compile(r"bsi1\.\S+")


@pytest.fixture(scope="module")
def invitation_server(live_server_factory):
    """A server where registering needs an invitation."""
    return live_server_factory("sqlite", env={"BALSAM_AUTH_REGISTRATION": "invitation"})


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(BALSAM_HOME=str(tmp_path / "home"), **extra)
    return env


def _invite(server, username: str) -> str:
    from balsam.server.admin import Admin

    with Admin(server.database_url) as admin:
        code, _expires = admin.invite(username, 3600)
    return code


def _logs_in(url: str, username: str) -> bool:
    resp = httpx.post(f"{url}/auth/password/login", data={"username": username, "password": PASSWORD}, timeout=60)
    return resp.status_code == 200


def _read_until(fd: int, proc: subprocess.Popen, wanted: "tuple[str, ...]", seen: list[str]) -> str:
    """Read the terminal until one of ``wanted`` shows (returns it) or the command exits ("")."""
    while True:
        text = "".join(seen)
        for w in wanted:
            if w in text:
                seen.clear()
                seen.append(text.split(w, 1)[1])
                return w
        ready, _, _ = select.select([fd], [], [], 120)  # a guard against a hang, not a timed assertion
        if not ready:
            raise AssertionError(f"no prompt from balsam register after 120 s; it printed: {text!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the command exited and closed its terminal
            chunk = b""
        if not chunk:
            proc.wait(timeout=60)
            return ""
        seen.append(chunk.decode(errors="replace"))


def test_invite_prints_no_command_line_with_the_code(tmp_path):
    """Before: `balsam server user invite carol` printed `balsam register ... --invitation bsi1...`."""
    env = _env(tmp_path, BALSAM_DATABASE_URL=f"sqlite:///{tmp_path / 'shared.db'}")
    assert subprocess.run([BALSAM, "server", "migrate"], env=env, capture_output=True, text=True).returncode == 0
    out = subprocess.run([BALSAM, "server", "user", "invite", "carol"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (code,) = set(CODE.findall(out.stdout))
    commands = [line for line in out.stdout.splitlines() if "balsam register" in line]
    assert commands, out.stdout
    assert not [line for line in commands if code in line], out.stdout
    assert "Invitation code" in out.stdout and "--invitation-stdin" in out.stdout


def test_register_asks_for_the_invitation_at_a_hidden_prompt(invitation_server, tmp_path):
    """Before: `balsam register -a URL -u carol` went straight to the password prompt: the only way
    to give the code was --invitation CODE, readable by all in /proc/<pid>/cmdline meanwhile."""
    username = f"inv-{uuid.uuid4().hex[:8]}"
    code = _invite(invitation_server, username)
    master, slave = pty.openpty()
    proc = subprocess.Popen([BALSAM, "register", "-a", invitation_server.url, "-u", username],
                            stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path), close_fds=True)
    os.close(slave)
    seen: list[str] = []
    try:
        first = _read_until(master, proc, ("Invitation code", "Balsam password"), seen)
        assert first == "Invitation code", f"first prompt: {first!r}"
        # What any other user of the machine sees of this waiting command: no code.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert "bsi1." not in cmdline and code not in cmdline
        os.write(master, f"{code}\n".encode())
        assert _read_until(master, proc, ("Balsam password",), seen) == "Balsam password"
        assert code not in "".join(seen), "the code was echoed"
        os.write(master, f"{PASSWORD}\n".encode())
        assert _read_until(master, proc, ("Repeat for confirmation",), seen)
        os.write(master, f"{PASSWORD}\n".encode())
        assert _read_until(master, proc, ("Registration success!",), seen) == "Registration success!"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert _logs_in(invitation_server.url, username)


@pytest.mark.parametrize("how", ["stdin", "environment"])
def test_scripts_give_the_invitation_off_the_command_line(invitation_server, tmp_path, how):
    """Before: no --invitation-stdin (usage error) and $BALSAM_INVITATION ignored (403)."""
    username = f"inv-{uuid.uuid4().hex[:8]}"
    code = _invite(invitation_server, username)
    args = [BALSAM, "register", "-a", invitation_server.url, "-u", username, "--password-stdin"]
    if how == "stdin":
        run = subprocess.run(args + ["--invitation-stdin"], input=f"{code}\n{PASSWORD}\n", env=_env(tmp_path),
                             capture_output=True, text=True)
    else:
        run = subprocess.run(args, input=f"{PASSWORD}\n", env=_env(tmp_path, BALSAM_INVITATION=code),
                             capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Registration success!" in run.stdout and "Warning" not in run.stderr
    assert _logs_in(invitation_server.url, username)


def test_invitation_on_the_command_line_still_works_with_a_warning(invitation_server, tmp_path):
    """Before: accepted silently."""
    username = f"inv-{uuid.uuid4().hex[:8]}"
    code = _invite(invitation_server, username)
    run = subprocess.run([BALSAM, "register", "-a", invitation_server.url, "-u", username, "--password-stdin",
                          "--invitation", code], input=f"{PASSWORD}\n", env=_env(tmp_path),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Warning: --invitation puts the code on the command line" in run.stderr
    assert code not in run.stderr
    assert _logs_in(invitation_server.url, username)


def test_register_without_an_invitation_at_a_script_asks_nothing_more(live_server, tmp_path):
    """Open registration from a script (no terminal): no invitation prompt eats the password line."""
    username = f"open-{uuid.uuid4().hex[:8]}"
    run = subprocess.run([BALSAM, "register", "-a", live_server, "-u", username, "--password-stdin"],
                         input=f"{PASSWORD}\n", env=_env(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _logs_in(live_server, username)
