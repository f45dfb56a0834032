"""Commands run in a copy of a site directory (``cp -a``/``rsync -a`` made while its agent ran)
while the directory the site record names has a live agent; and that agent once the record names
another directory of its site. Against a real server; the original's live agent is this process,
recorded in its pid file as an agent records itself (no daemon is needed to be alive).

The copy's pid file names its original's agent, so it is no agent of the copy (38643ab): `site rm
COPY` then deleted the record of the site that agent ran, with all its jobs, and `site mv COPY NEW`
pointed the record at NEW, where `site start NEW` ran a second agent of the site.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import psutil
from click.testing import CliRunner

from balsam.site.agent import SITE_DIR_FIELD, pid_file_path

NO_MODULES = {"scheduler": None, "file_cleaner": None, "processing": None}


def _cli(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args))


def _error(result: Any) -> str:
    return result.output.strip().splitlines()[-1]


def _record_agent(site_path: Path, host: str, pid: int, start: float) -> None:
    """The pid file an agent of ``site_path`` writes."""
    pid_file_path(site_path).write_text(f"{host}\n{pid}\n{start:.3f}\n{SITE_DIR_FIELD}{os.stat(site_path).st_ino}\n")


def _site_with_copy(make_site: Any, host: str, pid: int, start: float) -> tuple[Any, Path, Path]:
    site = make_site(overrides=NO_MODULES)
    original = Path(site.site_path)
    _record_agent(original, host, pid, start)
    copy = original.with_name(original.name + "-copy")
    shutil.copytree(original, copy)  # with the pid file
    return site, original, copy


def test_rm_mv_sync_in_a_copy_are_refused_while_the_originals_agent_runs(make_site, client) -> None:
    from balsam.api import ApplicationDefinition, Job

    me = psutil.Process()
    site, original, copy = _site_with_copy(make_site, socket.gethostname(), me.pid, me.create_time())
    sid = site.site_id

    class App(ApplicationDefinition):
        site = sid
        command_template = "true"

    App.sync()
    Job.objects.bulk_create([Job(f"w/{i}", App) for i in range(2)])
    runs = f"site {sid} is also in {original}, where its agent runs on {socket.gethostname()} [pid {me.pid}]: "

    removed = _cli("site", "rm", "-y", str(copy))
    assert removed.exit_code == 1 and _error(removed).startswith(f"Error: {runs}`balsam site rm` here"), removed.output
    assert "remove the directory itself (`rm -r`)" in _error(removed)
    moved = _cli("site", "mv", str(copy), str(copy.with_name("moved")))
    assert moved.exit_code == 1 and _error(moved).startswith(f"Error: {runs}`balsam site mv` here"), moved.output
    synced = _cli("site", "sync", str(copy))
    assert synced.exit_code == 1 and _error(synced).startswith(f"Error: {runs}`balsam site sync` here"), synced.output
    assert client.get(f"/sites/{sid}")["path"] == str(original)
    assert len(Job.objects.filter(site_id=sid)) == 2 and copy.is_dir() and not copy.with_name("moved").exists()

    pid_file_path(original).unlink()  # that agent stopped: the copy is a site directory like any other
    assert _cli("site", "sync", str(copy)).exit_code == 0


def test_a_copy_of_a_site_whose_agent_ran_on_another_host_is_judged_by_the_last_refresh(make_site, client,
                                                                                        monkeypatch) -> None:
    import balsam.site.site_ops as ops

    site, original, copy = _site_with_copy(make_site, "login-node-9", 4242, 1700000000.0)
    refused = _cli("site", "mv", str(copy), str(copy.with_name("moved")))
    assert refused.exit_code == 1 and "login-node-9 [pid 4242]" in _error(refused), refused.output
    assert "(the site was refreshed" in _error(refused)  # by `site init`, just now: that agent may live

    monkeypatch.setattr(ops, "STALE_MIN_SEC", 0.0)  # any age of the record is silence
    monkeypatch.setattr(ops, "STALE_REFRESH_PERIODS", 0)
    refused = _cli("site", "rm", "-y", str(copy))
    assert refused.exit_code == 1 and "that agent looks dead" in _error(refused), refused.output
    assert f"`balsam site stop --force {original}` drops its pid file" in _error(refused)
    assert _cli("site", "stop", "--force", str(original)).exit_code == 0
    moved = _cli("site", "mv", str(copy), str(copy.with_name("moved")))
    assert moved.exit_code == 0, moved.output
    assert client.get(f"/sites/{site.site_id}")["path"] == str(copy.with_name("moved"))


def test_an_agent_stops_once_the_site_record_names_another_directory_of_its_site(make_site, client,
                                                                                 caplog) -> None:
    """`balsam site start --force COPY` while the original's agent on another host looked dead (cut
    off, not gone): the copy's agent takes the record's path; the original's ran on beside it, each
    running the site's jobs in its own data/. It now sees the record at its site check and stops."""
    from balsam.config import SiteConfig
    from balsam.site.agent import Agent

    site = make_site(overrides=NO_MODULES)
    original = Path(site.site_path)
    copy = original.with_name(original.name + "-copy")
    shutil.copytree(original, copy)
    # A copy's agent that never claimed the record (the API was down at its start): nothing was
    # taken from it.
    never_claimed = Agent(SiteConfig(copy), client=client, modules=[])
    assert not never_claimed.site_deleted() and never_claimed.check_site_taken() is None

    agent = Agent(site, client=client, modules=[])
    assert agent.push_settings()  # as at its start, after its claim: the record names its directory
    caplog.set_level(logging.INFO, logger="balsam.site")
    try:
        # Not a directory of this site: no sign of another agent of it (a plain `mv` of the record's
        # directory, a path this host does not see).
        client.put(f"/sites/{site.site_id}", json={"path": str(original.with_name("elsewhere"))})
        assert not agent.site_deleted() and agent.check_site_taken() is None

        client.put(f"/sites/{site.site_id}", json={"path": str(copy)})  # what the copy's agent claims
        agent._site_check_due = True
        agent.wait(timeout=10)
        assert agent.stop_reason == "site-taken"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and f"record now names {copy}, another directory of this site" in errors[0].getMessage()
    finally:
        agent.shutdown(join_timeout=1)
