"""One user, two sites: jobs left for an agent that is not running say so under `balsam job ls`.

The real server, two real site directories, site A's real agent (it stages its job in and refreshes
its record), site B's agent stopped 10 minutes ago (its record's ``last_refresh`` set back in the
server's database, as such an agent leaves it: the API sets it to the server's time on every
update), the real ``balsam`` command. B's READY job, whose stage-in only B's agent makes, showed
``READY  in 0/1`` for ever with nothing under the table saying what it waited for.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from site_test_utils import wait_for

BALSAM = str(Path(sys.executable).parent / "balsam")


def _stager(site_id: int, name: str) -> Any:
    from balsam.api import ApplicationDefinition

    app = type(name, (ApplicationDefinition,), {
        "site": site_id, "command_template": "cat input.txt",
        "transfers": {"input": {"required": True, "direction": "in", "local_path": "input.txt"}},
    })
    app.sync()
    return app


def _silent_since(database_url: str, site_id: int, minutes: int) -> dt.datetime:
    from balsam.server.tables import sites

    when = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0) - dt.timedelta(minutes=minutes)
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(sites).where(sites.c.id == site_id).values(last_refresh=when))
    finally:
        engine.dispose()
    return when


def _job_ls(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BALSAM_SITE_PATH", None)  # outside both sites: --site chooses
    return subprocess.run([BALSAM, "job", "ls", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_jobs_waiting_for_a_stopped_agent_of_another_site_say_so(make_site, agent_daemon, client, tmp_path,
                                                               _live_server_obj) -> None:
    from balsam.api import Job

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("data\n")
    locations = {"transfers": {"transfer_locations": {"shared": "local://"}, "service_period": 1}}
    site_a = make_site("polaris", overrides=locations)
    site_b = make_site("perlmutter", overrides=locations)
    at_a = Job("sim/1", _stager(site_a.site_id, "Sim"), transfers={"input": f"shared:{shared}/in.txt"})
    at_a.save()
    at_b = [Job(f"ana/{i}", _stager(site_b.site_id, "Ana"), transfers={"input": f"shared:{shared}/in.txt"})
            for i in range(2)]
    Job.objects.bulk_create(at_b)
    agent_daemon(site_a)
    wait_for(lambda: client.get(f"/jobs/{at_a.id}")["state"] not in ("READY", "STAGED_IN"), timeout=120,
             what="site A's agent to stage its job in and preprocess it")
    _silent_since(_live_server_obj.database_url, site_b.site_id, minutes=10)

    both = _job_ls(tmp_path, "--site", "all")
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("READY") == 2  # B's two jobs; A's moved on
    notes = [line for line in both.stderr.splitlines() if "wait for the agent of site" in line]
    assert notes == [
        f"2 of these jobs (2 READY) wait for the agent of site perlmutter, which has not reported since "
        f"{_local_minute(client, site_b.site_id)}: start it (`balsam site start {site_b.site_path}`); "
        "`balsam site status` there says why it stopped."
    ], both.stderr
    only_a = _job_ls(tmp_path, "--site", "polaris")
    assert only_a.returncode == 0 and "agent of site" not in only_a.stderr, only_a.stderr


def _local_minute(client: Any, site_id: int) -> str:
    """The site's last_refresh as the Python API gives it (what the note prints), to the minute."""
    from balsam.api import Site

    return f"{Site.objects.get(id=site_id).last_refresh:%Y-%m-%d %H:%M}"
