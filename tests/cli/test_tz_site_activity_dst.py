"""Whether a site's agent is active, read by the real ``balsam`` CLI in a zone whose daylight saving
changes between the agent's last refresh and the command (the server runs in Europe/Berlin).

The CLI compared naive local times: ``datetime.now() - site.last_refresh`` ignores the hour a
daylight saving change adds or takes, and ``datetime.now() - 2 min`` drops the ``fold`` of the hour
the fall-back repeats. Without faketime, a POSIX TZ rule puts the change a few seconds before the
command, on the real clock, so the server's own ``last_refresh`` is on either side of it.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from cli_test_utils import fresh_api_state  # noqa: F401 (autouse)

BALSAM = str(Path(sys.executable).parent / "balsam")
UTC = dt.timezone.utc


def _zone_changing_at(when: dt.datetime, spring_forward: bool) -> str:
    """A POSIX TZ (UTC-6 standard, UTC-5 daylight time) whose daylight saving starts (or ends) at
    ``when``: the rule's day (zero-based, Feb 29 counted) and time are local, standard time for the
    start and daylight time for the end; the other change is half a year away."""
    local = when.astimezone(UTC) - dt.timedelta(hours=6 if spring_forward else 5)
    day = local.timetuple().tm_yday - 1
    change = f"{day}/{local:%H:%M:%S}"
    other = f"{(day + 180) % 365}/02:00:00"
    return f"XST6XDT5,{change},{other}" if spring_forward else f"XST6XDT5,{other},{change}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def berlin_server(request: pytest.FixtureRequest, live_server_factory: Any, register: Any, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Any:
    """A server of its own in Europe/Berlin, and a user of it for the API and the CLI (a client
    file as tests/conftest.py's ``make_balsam_env`` writes it)."""
    server = live_server_factory(database=request.param, env={"TZ": "Europe/Berlin"})
    username, _password, _user_id, token, expiry = register(server.url)
    home = tmp_path / "balsam-home"
    home.mkdir()
    client_path = home / "client.yml"
    client_path.write_text(yaml.safe_dump({"api_root": server.url, "client_class": "balsam.client.RESTClient",
                                           "token": token, "token_expiry": expiry.isoformat(), "username": username,
                                           "connect_timeout": 6.2, "read_timeout": 120.0, "retry_count": 3}))
    client_path.chmod(0o600)
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(client_path))
    return server


def _site_with_a_job(tmp_path: Path, label: str) -> Any:
    from balsam.api import ApplicationDefinition, Site

    name = f"{label}-{uuid.uuid4().hex[:6]}"
    (tmp_path / name / "data").mkdir(parents=True)
    site = Site.objects.create(name=name, path=str(tmp_path / name), allowed_projects=["proj"],
                               allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}})

    hello = type("Hello", (ApplicationDefinition,), {"site": name, "command_template": "echo hello"})
    hello.sync()
    hello.submit(workdir=f"{label}/1")
    return site


def _refreshed(server: Any, site: Any, when: dt.datetime) -> None:
    """The site's last_refresh set to ``when`` in the server's database, as an agent that stopped
    then left it (the API sets it to the server's now on every update)."""
    from balsam.server.tables import sites

    engine = sa.create_engine(server.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(sites).where(sites.c.id == site.id).values(last_refresh=when))
    finally:
        engine.dispose()


def _cli(zone: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TZ": zone}
    env.pop("BALSAM_SITE_PATH", None)
    return subprocess.run([BALSAM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def _submit(zone: str, cwd: Path, site: Any) -> subprocess.CompletedProcess:
    return _cli(zone, cwd, "queue", "submit", "-n", "1", "-t", "30", "-q", "debug", "-A", "proj", "-j", "mpi",
                "--site", site.name)


def test_an_agent_silent_for_30_minutes_across_the_fall_back_is_not_active(berlin_server: Any,
                                                                         tmp_path: Path) -> None:
    """The fall-back 5 s ago: an agent that stopped 30 minutes ago (at 01:xx daylight time) read -30
    minutes silent (no warning at ``queue submit``), and ``datetime.now() - 2 min`` (fold 0: daylight
    time) selected the sites refreshed in the last 62 minutes for ``job ls``."""
    dead = _site_with_a_job(tmp_path, "dead")
    fresh = _site_with_a_job(tmp_path, "fresh")
    now = dt.datetime.now(UTC)
    _refreshed(berlin_server, dead, now - dt.timedelta(minutes=30))
    zone = _zone_changing_at(now - dt.timedelta(seconds=5), spring_forward=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    listed = _cli(zone, elsewhere, "job", "ls")
    assert listed.returncode == 0, listed.stderr
    assert "fresh/1" in listed.stdout
    assert "dead/1" not in listed.stdout, listed.stdout

    submitted = _submit(zone, elsewhere, dead)
    assert submitted.returncode == 0, submitted.stderr
    assert f"no site agent has reported for site {dead.name} since" in submitted.stderr, submitted.stderr
    assert "no site agent has reported" not in _submit(zone, elsewhere, fresh).stderr


def test_an_agent_refreshed_just_before_the_spring_forward_is_active(berlin_server: Any, tmp_path: Path) -> None:
    """Refreshed, then the clocks jump an hour: the naive difference read an hour of silence and
    ``queue submit`` warned that no agent had reported."""
    site = _site_with_a_job(tmp_path, "fresh")
    site.name = site.name  # an update: last_refresh is the server's now
    site.save()
    zone = _zone_changing_at(dt.datetime.now(UTC) + dt.timedelta(seconds=2), spring_forward=True)
    time.sleep(3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    submitted = _submit(zone, elsewhere, site)
    assert submitted.returncode == 0, submitted.stderr
    assert "no site agent has reported" not in submitted.stderr, submitted.stderr
    listed = _cli(zone, elsewhere, "job", "ls")
    assert listed.returncode == 0 and "fresh/1" in listed.stdout, listed.stdout + listed.stderr


def test_activity_is_real_time_across_either_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """America/Chicago, 2026: the helpers the CLI's commands use, at chosen instants."""
    from balsam._api.model import to_aware_utc, to_local_naive
    from balsam.cli._site_selector import active_since, is_active, silent_for

    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    try:
        def local(*args: int) -> dt.datetime:
            return to_local_naive(dt.datetime(*args, tzinfo=UTC))

        site = type("S", (), {"last_refresh": local(2026, 11, 1, 6, 50)})()  # 01:50 CDT
        now = local(2026, 11, 1, 7, 40)  # 01:40 CST, 50 minutes later
        assert silent_for(site.last_refresh, now) == dt.timedelta(minutes=50)
        assert not is_active(site, now)
        assert to_aware_utc(active_since(now)) == dt.datetime(2026, 11, 1, 7, 38, tzinfo=UTC)
        site.last_refresh = local(2026, 3, 8, 7, 59, 30)  # 01:59:30 CST
        now = local(2026, 3, 8, 8, 0, 30)  # 03:00:30 CDT, a minute later
        assert silent_for(site.last_refresh, now) == dt.timedelta(minutes=1) and is_active(site, now)
        assert silent_for(None, now) is None and not is_active(type("S", (), {"last_refresh": None})(), now)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
