"""The ``agent_daemon`` fixture's teardown tries every site it started: one whose teardown fails
(here the server is gone: the client's calls fail) aborted the loop, leaving the next sites'
agents running into the next tests, and $BALSAM_SITE_PATH set. Each site is now torn down
whatever became of the others, the variable dropped in any case, and the first error raised after."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from balsam.site.agent import agent_running
from balsam.site.site_ops import stop_agent


def _agent_daemon_fixture(request):
    """The generator function of this directory's ``agent_daemon`` fixture (to drive its teardown)."""
    here = str(Path(__file__).with_name("conftest.py"))
    for plugin in request.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == here:
            return inspect.unwrap(plugin.agent_daemon)
    raise LookupError(f"{here} is not loaded")


def test_one_failing_site_leaves_no_other_agent_running(make_site, client, request, monkeypatch):
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    sites = [make_site(), make_site()]
    fixture = _agent_daemon_fixture(request)(client)
    start = next(fixture)
    try:
        for site in sites:
            start(site)

        def gone(*_args, **_kwargs):
            raise ConnectionError("server gone (the test's client)")

        monkeypatch.setattr(client, "get", gone)
        monkeypatch.setattr(client, "patch", gone)
        with pytest.raises(ConnectionError, match="server gone"):
            next(fixture)  # the teardown
        assert [agent_running(Path(site.site_path)) for site in sites] == [None, None]
        assert "BALSAM_SITE_PATH" not in os.environ
    finally:
        for site in sites:
            stop_agent(Path(site.site_path), timeout=30, force=True)
