"""The agent and its plugins over a long life: a plugin's broken agent hook does not keep the other
plugins' hooks from running (and is named in one line), two plugins claiming the name of an
enabled agent module are named in the agent's log, and an edit of settings.yml while the agent
runs is noticed in its log (it applies only at the next start)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from balsam.plugins.hookspecs import hookimpl
from balsam.plugins.manager import get_plugin_manager, reset_plugin_manager
from balsam.plugins.report import CONFLICT, PluginRecord
from balsam.site import agent as agent_mod
from balsam.site.agent import Agent
from balsam.site.module import AgentModule
from site_test_utils import wait_for


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Any:
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def _site(tmp_path: Path) -> SimpleNamespace:
    (tmp_path / "settings.yml").write_text("logging:\n  level: INFO\n")
    return SimpleNamespace(site_path=tmp_path, site_id=1, settings_path=tmp_path / "settings.yml")


class _Good:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def balsam_agent_started(self, site_config: Any, modules: Any) -> None:
        self.calls.append("started")

    @hookimpl
    def balsam_agent_stopping(self, site_config: Any, reason: str) -> None:
        self.calls.append(f"stopping:{reason}")


class _Broken:
    @hookimpl
    def balsam_agent_started(self, site_config: Any, modules: Any) -> None:
        raise RuntimeError("broken started hook")

    @hookimpl
    def balsam_agent_stopping(self, site_config: Any, reason: str) -> None:
        raise RuntimeError("broken stopping hook")


def test_a_broken_agent_hook_does_not_skip_the_other_plugins_hooks(tmp_path: Path, caplog: Any) -> None:
    """pluggy stops calling a hook's implementations at the first that raises: a plugin whose
    balsam_agent_started raised kept every plugin called after it from ever seeing the agent start
    (and its balsam_agent_stopping from releasing what it held at the stop)."""
    good = _Good()
    pm = get_plugin_manager()
    pm.add_plugin(good, name="h5-good")
    pm.add_plugin(_Broken(), name="h5-broken")  # registered last: pluggy calls it first
    agent = Agent(_site(tmp_path), client=SimpleNamespace(), modules=[])
    with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
        agent.start()
        agent.shutdown("signal")
    assert good.calls == ["started", "stopping:signal"]
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().splitlines()[0] for r in failures] == [
        r.getMessage() for r in failures
    ], "one line each, no traceback"
    messages = [r.getMessage() for r in failures]
    assert len(messages) == 2
    assert "h5-broken" in messages[0] and "balsam_agent_started" in messages[0]
    assert "RuntimeError: broken started hook" in messages[0]
    assert "h5-broken" in messages[1] and "balsam_agent_stopping" in messages[1]
    assert all(r.exc_info is None for r in failures)


def _distribution(where: Path, name: str, entry_points: str) -> None:
    info = where / f"{name.replace('-', '_')}-1.0.dist-info"  # as a wheel names it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


MODULES = '''
from balsam.site.module import AgentModule


class First(AgentModule):
    def run_cycle(self):
        return None


class Second(AgentModule):
    def run_cycle(self):
        return None
'''


def test_two_plugins_claiming_an_enabled_module_name_are_named_in_the_agent_log(
        tmp_path: Path, caplog: Any, monkeypatch: Any) -> None:
    """Which of two distributions' `h5twin` agent module the `h5twin:` section ran depended on the
    order of a metadata scan, and the agent's log said nothing of the other: only `balsam plugins
    ls` showed the conflict."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "h5_twin_modules.py").write_text(MODULES)
    _distribution(plugins, "h5-twin-one", "[balsam.agent_modules]\nh5twin = h5_twin_modules:First\n")
    _distribution(plugins, "h5-twin-two", "[balsam.agent_modules]\nh5twin = h5_twin_modules:Second\n")
    monkeypatch.syspath_prepend(str(plugins))
    reset_plugin_manager()
    site = _site(tmp_path)
    site.settings = SimpleNamespace(sections={"h5twin": {}})
    agent = Agent(site, client=SimpleNamespace())
    with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
        modules = agent.build_modules()
    assert [m.name for m in modules] == ["h5twin"]
    used = type(modules[0]).__name__
    unused = {"First": "Second", "Second": "First"}[used]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "h5twin" in warnings[0] and f"h5_twin_modules:{used}" in warnings[0]
    assert f"h5_twin_modules:{unused}" in warnings[0] and "h5-twin-" in warnings[0]


def test_an_edit_of_settings_yml_while_the_agent_runs_is_logged_once(tmp_path: Path, caplog: Any) -> None:
    """The agent reads settings.yml at its start only (docs/settings.md): an edit made while it runs
    did nothing, with nothing in its log to say so, and a file broken meanwhile was found only at the
    next start (a reboot weeks later)."""
    site = _site(tmp_path)
    agent = Agent(site, client=SimpleNamespace(), modules=[])
    agent.start()
    try:
        with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
            assert agent.check_settings_file() is None  # unchanged
            os.utime(site.settings_path, ns=(2, 2))
            assert agent.check_settings_file() is None  # touched: the same text
            site.settings_path.write_text("logging:\n  level: DEBUG\n")
            os.utime(site.settings_path, ns=(1, 1))  # a new stamp even within the clock's resolution
            changed = agent.check_settings_file()
            assert agent.check_settings_file() is None  # each change once
            site.settings_path.write_text("logging:\n  levle: DEBUG\n")
            broken = agent.check_settings_file()
    finally:
        agent.shutdown("signal")
    assert changed is not None and broken is not None
    assert str(site.settings_path) in changed and "keeps the settings it started with" in changed
    assert "balsam site sync" in changed
    assert "would not start again" in broken and "logging.levle: unknown key" in broken
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [changed, broken]


def test_a_section_of_a_module_that_balsam_plugins_leaves_out_says_so(tmp_path: Path, monkeypatch: Any) -> None:
    """An installed agent module that BALSAM_PLUGINS (or BALSAM_DISABLE_PLUGIN_AUTOLOAD) leaves out
    was refused as if it were missing: "install the distribution that provides it", which is
    installed."""
    from balsam.config.settings import SettingsError, loads_settings

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "h5_twin_modules.py").write_text(MODULES)
    _distribution(plugins, "h5-left-out", "[balsam.agent_modules]\nh5leftout = h5_twin_modules:First\n")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("BALSAM_PLUGINS", "slurm")
    reset_plugin_manager()
    with pytest.raises(SettingsError) as caught:
        loads_settings("h5leftout: {}\n", source="settings.yml")
    message = str(caught.value)
    assert message.startswith("settings.yml:1 h5leftout: ")
    assert "install the distribution" not in message
    assert "h5-left-out" in message and "BALSAM_PLUGINS=slurm" in message


def test_a_hook_plugin_that_cannot_be_imported_is_named_in_the_agent_log(
        tmp_path: Path, caplog: Any, monkeypatch: Any) -> None:
    """A hook plugin whose import raised was shown by `balsam plugins ls` only: the agent ran on
    without its hooks (balsam_agent_started, balsam_job_template_context...) and its log said
    nothing."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "h5_broken_hooks.py").write_text('raise ImportError("h5 hook module cannot be imported")\n')
    _distribution(plugins, "h5-broken-hooks", "[balsam.plugins]\nh5brokenhooks = h5_broken_hooks\n")
    monkeypatch.syspath_prepend(str(plugins))
    reset_plugin_manager()
    agent = Agent(_site(tmp_path), client=SimpleNamespace(), modules=[])
    with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
        agent.start()
        agent.shutdown("signal")
    named = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and "h5brokenhooks" in r.getMessage()]
    assert len(named) == 1, named
    assert "h5-broken-hooks" in named[0] and "ImportError: h5 hook module cannot be imported" in named[0]


OUTAGE_CYCLES = 200
STEP_SEC = 10.0  # fake seconds per cycle: 200 cycles are 33 fake minutes


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Unreachable(AgentModule):
    """Fails its first OUTAGE_CYCLES cycles as a module does while the server is down: the
    client's retry warning, then the error; then succeeds."""

    section = "unreachable"
    default_period = 0.01

    def __init__(self, site: Any, clock: _Clock) -> None:
        super().__init__(site, None, None)
        self.clock = clock
        self.calls = 0

    def run_cycle(self) -> None:
        self.calls += 1
        self.clock.now += STEP_SEC
        if self.calls <= OUTAGE_CYCLES:
            logging.getLogger("balsam.client.rest").warning("GET /jobs/: ConnectError; retrying in 0.5 s",
                                                            extra={"attempt": 1, "retries": 2})
            raise ConnectionError("server unreachable after 3 attempts")
        return None


def test_a_long_api_outage_is_logged_rarely_and_its_end_once(tmp_path: Path, caplog: Any, monkeypatch: Any) -> None:
    """At the 60 s backoff ceiling each module wrote its "API unavailable" line every minute, and the
    client two retry warnings before it: a server down for a day wrote some 4,000 lines per module."""
    monkeypatch.setattr(agent_mod, "MAX_BACKOFF_SEC", 0.001)  # the ceiling at once, and no real waits
    clock = _Clock()
    module = _Unreachable(_site(tmp_path), clock)
    agent = Agent(_site(tmp_path), client=SimpleNamespace(), modules=[module])
    agent.clock = clock
    caplog.set_level(logging.INFO)
    # The agent's own logger too: a test run before this one in the same process may have left it
    # at WARNING, and its INFO "reachable again" line was then dropped (seen in a full run).
    caplog.set_level(logging.INFO, logger="balsam.site.agent")
    agent.start()
    try:
        wait_for(lambda: agent.cycles.get("unreachable", 0) >= 2, timeout=120, what="the outage to end")
    finally:
        agent.shutdown("signal")
    messages = [r.getMessage() for r in caplog.records]
    outage = [m for m in messages if "API unavailable" in m]
    # The first try, then one line per REPEATED_ERROR_LOG_SEC (300 fake s) of the 2,000 fake s.
    assert 2 <= len(outage) <= 1 + OUTAGE_CYCLES * STEP_SEC / agent_mod.REPEATED_ERROR_LOG_SEC
    assert "still unavailable after" in outage[-1]
    retries = [m for m in messages if "retrying in" in m]
    assert retries == ["GET /jobs/: ConnectError; retrying in 0.5 s"]  # the first try's; later ones left out
    recovered = [m for m in messages if "API reachable again" in m]
    assert len(recovered) == 1 and f"after {OUTAGE_CYCLES} failed tries" in recovered[0]


class _Hanging:
    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def balsam_agent_started(self, site_config: Any, modules: Any) -> None:
        self.release.wait()  # a hook stuck on a network mount

    @hookimpl
    def balsam_agent_stopping(self, site_config: Any, reason: str) -> None:
        self.release.wait()


class _Counting(AgentModule):
    section = "counting"
    default_period = 0.01

    def run_cycle(self) -> None:
        return None


def test_a_hung_agent_hook_does_not_keep_the_agent_from_starting_or_stopping(
        tmp_path: Path, caplog: Any, monkeypatch: Any) -> None:
    """A plugin's balsam_agent_started that never returned kept the agent from ever running its
    modules (its pid file written, `balsam site start` said it started, the log said nothing), and
    a hung balsam_agent_stopping kept it from stopping."""
    monkeypatch.setattr(agent_mod, "AGENT_HOOK_TIMEOUT_SEC", 0.2, raising=False)
    good, hanging = _Good(), _Hanging()
    pm = get_plugin_manager()
    pm.add_plugin(good, name="h5-good")
    pm.add_plugin(hanging, name="h5-hanging")  # called first
    module = _Counting(_site(tmp_path), None, None)
    agent = Agent(_site(tmp_path), client=SimpleNamespace(), modules=[module])
    caplog.set_level(logging.INFO, logger="balsam.site.agent")
    life = threading.Thread(target=lambda: (agent.start(), wait_for(lambda: agent.cycles.get("counting", 0) >= 1,
                                                                    timeout=60, what="a module cycle"),
                                            agent.shutdown("signal")), daemon=True)
    try:
        life.start()
        life.join(120)  # a bound for the hang of the code before the fix, not a timing
        finished = not life.is_alive()
    finally:
        hanging.release.set()
    assert finished, "the agent hung in a plugin's hook"
    assert good.calls == ["started", "stopping:signal"]
    hung = [r.getMessage() for r in caplog.records if "has not returned" in r.getMessage()]
    assert len(hung) == 2 and all("h5-hanging" in m for m in hung)
    assert "balsam_agent_started" in hung[0] and "balsam_agent_stopping" in hung[1]


class _OddDelay(AgentModule):
    """Returns a mapping from its first cycle (a plugin's bug), then None (its period)."""

    section = "odd"

    def __init__(self, site: Any) -> None:
        super().__init__(site, None, None)
        self.calls = 0

    def run_cycle(self) -> Any:
        self.calls += 1
        return {"next": 5} if self.calls == 1 else None


def test_a_cycle_returning_a_non_number_does_not_end_the_module(tmp_path: Path, caplog: Any,
                                                                monkeypatch: Any) -> None:
    """`math.isfinite({...})` raised outside the cycle's handler: the module's thread died and its
    work stopped for good ("the module's thread died; restart the agent")."""
    monkeypatch.setattr(AgentModule, "default_period", 0.01)  # the wait used instead of an unusable one
    module = _OddDelay(_site(tmp_path))
    agent = Agent(_site(tmp_path), client=SimpleNamespace(), modules=[module])
    caplog.set_level(logging.INFO, logger="balsam.site.agent")
    agent.start()
    try:
        wait_for(lambda: module.calls >= 3 or not agent.threads[0].is_alive(), timeout=60, what="three cycles")
        alive = agent.threads[0].is_alive()
    finally:
        agent.shutdown("signal")
    assert alive and module.calls >= 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "odd: cannot wait {'next': 5} s before the next cycle" in warnings[0]
