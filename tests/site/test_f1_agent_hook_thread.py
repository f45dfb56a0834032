"""The agent's started/stopping plugin hooks run in a worker thread (so that a hung hook cannot
freeze the agent, see agent._call_bounded): a hook doing what only the main thread may
(``signal.signal``, a plugin that dumps its state on SIGUSR1) fails there. The ERROR line says
why and what to do instead, not only Python's "signal only works in main thread"."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import pluggy
import pytest

from balsam.plugins.manager import get_plugin_manager
from balsam.site.agent import call_agent_hook

hookimpl = pluggy.HookimplMarker("balsam")


class _DumpOnUsr1:
    def __init__(self) -> None:
        self.threads: list[str] = []

    @hookimpl
    def balsam_agent_started(self, site_config: Any, modules: Any) -> None:
        self.threads.append(threading.current_thread().name)
        signal.signal(signal.SIGUSR1, lambda *_: None)

    @hookimpl
    def balsam_agent_stopping(self, site_config: Any, reason: str) -> None:
        self.threads.append(threading.current_thread().name)


def test_a_hook_installing_a_signal_handler_is_told_why_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    pm = get_plugin_manager()
    plugin = _DumpOnUsr1()
    pm.add_plugin(plugin, name="f1-dump-on-usr1")
    old = signal.getsignal(signal.SIGUSR1)
    try:
        with caplog.at_level(logging.ERROR, logger="balsam.site.agent"):
            call_agent_hook("balsam_agent_started", site_config=None, modules=[])
            call_agent_hook("balsam_agent_stopping", site_config=None, reason="signal")
    finally:
        pm.pluggy_manager.unregister(plugin)
        signal.signal(signal.SIGUSR1, old)
    assert signal.getsignal(signal.SIGUSR1) is old
    # Documented (hookspecs, docs/plugins/hooks.md): a worker thread per call, not the main thread.
    assert len(plugin.threads) == 2 and all(name.startswith("agent-hook-f1-dump-on-usr1") for name in plugin.threads)
    errors = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR and "f1-dump-on-usr1" in r.getMessage()]
    assert len(errors) == 1
    assert "plugin f1-dump-on-usr1: its balsam_agent_started hook failed" in errors[0]
    assert "main thread" in errors[0]
    assert "agent hooks run in a worker thread, here 'agent-hook-f1-dump-on-usr1'" in errors[0]
    assert "install signal handlers when the plugin module is imported" in errors[0]
