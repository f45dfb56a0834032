"""Two directories of one site (a copy made with ``cp -r`` or rsync to another file system, or a
plain ``mv``), against a real server and real agents.

The flock and pid file keep a second agent out of the same directory only: the agent of a copy ran
beside the first one, each staging files, running hooks and starting launchers in its own ``data/``
(a job's inputs staged in one, its run in the other). Now an agent refuses to start while another
directory of its site, the one the site record names, has a live agent; and an agent started in a
directory the record does not name (a plain ``mv``) makes the record's path its own, so that
``balsam site ls`` and ``--site`` path fragments find the site where it is."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from balsam.config import SiteConfig
from balsam.site.site_ops import SiteError


def test_a_copy_of_a_site_whose_agent_runs_is_refused_in_one_line(make_site, client, agent_daemon) -> None:
    site = make_site(overrides={"scheduler": None, "file_cleaner": None})
    original = Path(site.site_path)
    copy = original.with_name(original.name + "-copy")
    shutil.copytree(original, copy)
    agent_daemon(site)
    with pytest.raises(SiteError) as refused:
        agent_daemon(SiteConfig(copy))
    message = str(refused.value)
    assert f"site {site.site_id} is also in {original}, where its agent runs on" in message, message
    assert f"`balsam site stop {original}`" in message and "\n" not in message
    assert client.get(f"/sites/{site.site_id}")["path"] == str(original)


def test_an_agent_started_where_a_site_was_moved_to_updates_its_path(make_site, client, agent_daemon) -> None:
    site = make_site(overrides={"scheduler": None, "file_cleaner": None, "processing": None})
    old, site_id = Path(site.site_path), site.site_id
    new = old.with_name(old.name + "-moved")
    os.rename(old, new)
    agent_daemon(SiteConfig(new))
    assert client.get(f"/sites/{site_id}")["path"] == str(new)
    log = "".join(p.read_text() for p in (new / "log").glob("agent_*.log"))
    assert f"the site record's path was {old} (gone or not this site's); it is now {new}" in log, log[-2000:]
