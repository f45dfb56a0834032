"""`balsam server status` gives the server's uptime across a daylight saving change.

It subtracted naive local times: for a server started before the fall-back, an hour less (a server
up a few seconds read ``-1 day, 23:59:57``). A real embedded server in a private BALSAM_HOME; a POSIX
TZ rule puts the fall-back between its start and the `status` run (no faketime).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BALSAM = [str(Path(sys.executable).with_name("balsam"))]
UTC = dt.timezone.utc


def run(args, env, timeout=90):
    return subprocess.run(BALSAM + args, env=env, capture_output=True, text=True, timeout=timeout)


def _fall_back_at(when: float) -> str:
    """UTC-6 standard, UTC-5 daylight time, daylight time ending at ``when`` (its local daylight time)."""
    local = dt.datetime.fromtimestamp(when, UTC) - dt.timedelta(hours=5)
    day = local.timetuple().tm_yday - 1
    return f"XST6XDT5,{(day + 180) % 365}/02:00:00,{day}/{local:%H:%M:%S}"


@pytest.fixture
def home_env(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, BALSAM_HOME=str(home))
    for key in ("BALSAM_CLIENT_PATH", "BALSAM_DATABASE_URL", "BALSAM_AUTH_SECRET_KEY"):
        env.pop(key, None)
    yield env, home
    if (home / "server" / "server.pid").exists():
        run(["server", "stop"], env)


def test_server_status_uptime_across_the_fall_back(home_env) -> None:
    env, home = home_env
    started = run(["server", "start", "--port", "0"], env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((home / "server" / "server.pid").read_text().split()[0])
    since = psutil.Process(pid).create_time()
    while time.time() < since + 3:  # the fall-back strictly between the server's start and now
        time.sleep(0.2)
    status = run(["server", "status"], dict(env, TZ=_fall_back_at(since + 1.5)))
    after = time.time()
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(line for line in status.stdout.splitlines() if line.strip().startswith("uptime:"))
    assert "day" not in line, line  # before: "-1 day, 23:00:05" for a server up 5 s
    hours, minutes, seconds = (int(part) for part in line.split()[-1].split(":"))
    up = hours * 3600 + minutes * 60 + seconds
    assert 3 <= up <= after - since + 1, line
