"""The site agent: module threads, a third-party module plugin, hooks, pid file, SIGTERM, API outages."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from balsam.site.agent import Agent, agent_running, pid_file_path, read_pid_file
from site_test_utils import FAST_SETTINGS, wait_for

HEARTBEAT = {"heartbeat_file": {"period": 0.2, "filename": "heartbeat.txt", "fail_on_cycles": [2]}}


def _require_test_plugin() -> None:
    from balsam.plugins.manager import get_plugin_manager

    if "heartbeat_file" not in get_plugin_manager().list_drivers("agent_module"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e",
             str(Path(__file__).parents[1] / "fixtures" / "balsam-test-agent-module")],
            check=True, timeout=300,
        )
        from balsam.plugins.manager import reset_plugin_manager

        reset_plugin_manager()
    assert "heartbeat_file" in get_plugin_manager().list_drivers("agent_module")


@pytest.mark.slow
def test_third_party_module_runs_in_the_daemon_and_stops_cleanly(make_site, agent_daemon) -> None:
    """A module from another distribution (entry point balsam.agent_modules) is enabled by its settings
    section; an exception in one of its cycles is logged and the agent carries on; SIGTERM stops it."""
    from balsam.site.site_ops import stop_agent

    _require_test_plugin()
    site = make_site(overrides=HEARTBEAT)
    site_path = Path(site.site_path)
    pid = agent_daemon(site)
    assert read_pid_file(site_path) == (socket.gethostname(), pid)
    heartbeat = site_path / "heartbeat.txt"
    wait_for(lambda: heartbeat.exists() and heartbeat.read_text().count("cycle") >= 4, timeout=30,
             what="4 heartbeat cycles")
    lines = heartbeat.read_text().splitlines()
    assert lines[0].startswith("cycle 1 ") and lines[1].startswith("cycle 3 ")  # cycle 2 raised
    assert f"pid {pid} site {site.site_id}" in lines[0]

    stop_agent(site_path, timeout=30)
    assert not pid_file_path(site_path).exists()
    assert heartbeat.read_text().splitlines()[-1] == "closed"  # close() ran
    log = "\n".join(p.read_text() for p in (site_path / "log").glob("agent_*.log"))
    assert "heartbeat cycle 2 failed on purpose" in log
    assert "cycle failed (the agent carries on)" in log
    assert "received SIGTERM: stopping" in log and "agent stopped" in log


def test_hook_balsam_agent_started(make_site, client) -> None:
    from balsam.plugins.hookspecs import hookimpl
    from balsam.plugins.manager import get_plugin_manager

    _require_test_plugin()
    calls = []

    class Watcher:
        @hookimpl
        def balsam_agent_started(self, site_config, modules):
            calls.append((site_config.site_path, sorted(m.name for m in modules)))

    get_plugin_manager().add_plugin(Watcher(), name="test-agent-started")
    site = make_site(overrides={**HEARTBEAT, "file_cleaner": None})
    agent = Agent(site, client=client)
    agent.start()
    try:
        assert calls == [(site.site_path, ["heartbeat_file", "processing", "scheduler", "transfers"])]
    finally:
        agent.shutdown("signal")


def test_hook_balsam_agent_stopping(make_site, client) -> None:
    from balsam.plugins.hookspecs import hookimpl
    from balsam.plugins.manager import get_plugin_manager

    _require_test_plugin()
    calls = []

    class Watcher:
        @hookimpl
        def balsam_agent_stopping(self, site_config, reason):
            # called before the modules' clean-up: the heartbeat module has not written "closed" yet
            heartbeat = Path(site_config.site_path) / "heartbeat.txt"
            calls.append((reason, heartbeat.exists() and "closed" in heartbeat.read_text()))

        @hookimpl
        def balsam_agent_started(self, site_config, modules):
            raise RuntimeError("a broken plugin must not stop the agent")

    get_plugin_manager().add_plugin(Watcher(), name="test-agent-stopping")
    site = make_site(overrides={**HEARTBEAT, "file_cleaner": None, "scheduler": None, "processing": None})
    agent = Agent(site, client=client)
    agent.start()
    wait_for(lambda: agent.cycles.get("heartbeat_file", 0) >= 2, timeout=20, what="heartbeat cycles")
    agent.shutdown("token-expiry")
    assert calls == [("token-expiry", False)]
    assert (Path(site.site_path) / "heartbeat.txt").read_text().splitlines()[-1] == "closed"


def test_pid_file_guards_against_a_second_agent(make_site) -> None:
    site = make_site()
    site_path = Path(site.site_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        import psutil

        # As an agent writes it: host, pid and the process's start time (a live "agent").
        started = psutil.Process(sleeper.pid).create_time()
        pid_file_path(site_path).write_text(f"{socket.gethostname()}\n{sleeper.pid}\n{started:.3f}\n")
        assert agent_running(site_path) == (socket.gethostname(), sleeper.pid)
        proc = subprocess.run([sys.executable, "-m", "balsam.site", str(site_path)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1
        assert f"already running on {socket.gethostname()} [pid {sleeper.pid}]" in proc.stderr
        # the CLI refuses too, with the same reason
        proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "start",
                               str(site_path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "already running" in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    assert agent_running(site_path) is None  # a dead pid is a stale file, not a running agent


def _register(url: str) -> str:
    import uuid

    import httpx

    name, password = f"outage-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    httpx.post(f"{url}/auth/password/register", json={"username": name, "password": password}).raise_for_status()
    resp = httpx.post(f"{url}/auth/password/login", data={"username": name, "password": password})
    resp.raise_for_status()
    return resp.json()["access_token"]


def test_api_outage_is_retried_with_backoff(_live_server_obj, tmp_path, caplog) -> None:
    """The API goes away under a running agent: its modules back off (1, 2, 4 s ...) and resume
    when the server is back, without losing the agent."""
    LiveServer = type(_live_server_obj)  # the shared fixtures' uvicorn wrapper; this test needs its own server

    from balsam.client import RESTClient
    from balsam.config import SiteConfig
    from balsam.site.modules.queue_maintainer import QueueMaintainerSettings
    from balsam.site.modules.queue_maintainer import QueueMaintainerModule
    from balsam.site.site_ops import init_site

    workdir = tmp_path / "outage-server"
    workdir.mkdir()
    server = LiveServer(f"sqlite:///{workdir / 'balsam.db'}", workdir)
    server.start()
    try:
        token = _register(server.url)
        client = RESTClient(server.url, token, retry_count=0)
        init_site(tmp_path / "outage-site", "outage-site", "default", client, settings_overrides=FAST_SETTINGS)
        site = SiteConfig(tmp_path / "outage-site")
        module = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=1, num_queued_jobs=1), client)
        server.stop()

        caplog.set_level(logging.INFO, logger="balsam.site")
        agent = Agent(site, client=client, modules=[module])
        agent.start()
        def delays() -> list[str]:
            return [r.getMessage().rsplit("next try in ", 1)[1] for r in caplog.records if "next try in" in r.getMessage()]

        # The log lines, not the error count: the count goes up just before its line is written.
        wait_for(lambda: len(delays()) >= 3, timeout=30, what="3 failed cycles logged")
        assert agent.threads[0].is_alive()
        assert delays()[:3] == ["1 s", "2 s", "4 s"]

        restarted = LiveServer(server.database_url, workdir)
        restarted.port, restarted.url = server.port, server.url
        restarted.start()
        server = restarted
        wait_for(lambda: client.get("/batch-jobs/", params={"site_id": site.site_id})["count"] == 1, timeout=30,
                 what="the module to work again")
        assert any("API reachable again" in r.getMessage() for r in caplog.records)
        agent.shutdown("signal")
    finally:
        server.stop()


def test_the_login_deadline_follows_the_login_file(make_site, client, balsam_env) -> None:
    """Before: the agent computed its deadline from the first token once and stopped then, even
    after a fresh `balsam login`; with a refresh credential there is no deadline at all."""
    import datetime as dt

    import yaml

    site = make_site(overrides={"file_cleaner": None, "scheduler": None, "processing": None})
    agent = Agent(site, client=client)
    path = balsam_env.client_path
    stored = yaml.safe_load(path.read_text())

    def write(**changes):
        path.write_text(yaml.safe_dump({**stored, **changes}))

    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    write(token_expiry=soon.isoformat())
    first = agent._token_deadline()
    assert first is not None and abs(first - (soon.timestamp() - 120)) < 5
    later = soon + dt.timedelta(days=2)
    write(token_expiry=later.isoformat())  # a fresh `balsam login`
    assert abs(agent._token_deadline() - (later.timestamp() - 120)) < 5
    write(token_expiry=soon.isoformat(), refresh_token="bsr1.1.secret")
    assert agent._token_deadline() is None


def test_a_refused_credential_stops_the_agent(make_site, client) -> None:
    site = make_site(overrides={"file_cleaner": None, "processing": None})
    agent = Agent(site, client=client)
    agent.start()
    try:
        wait_for(lambda: agent.cycles.get("scheduler", 0) >= 1, timeout=30, what="a scheduler cycle")
        client.post("/auth/logout")  # revokes the agent's login
        agent.wait(timeout=30)
        assert agent.stop_reason == "credential-refused" and "revoked" in agent.credential_refused
    finally:
        agent.shutdown()


def test_an_agent_whose_site_is_deleted_stops_with_one_error(make_site, client, caplog) -> None:
    """`balsam site rm --force` (or a reset database) while the agent runs: every cycle would log HTTP
    404 forever; the agent checks its record at once after a 404 and stops with one line."""
    site = make_site(overrides={"file_cleaner": None, "processing": None})
    caplog.set_level(logging.INFO, logger="balsam.site")
    agent = Agent(site, client=client)
    agent.start()
    try:
        wait_for(lambda: agent.cycles.get("scheduler", 0) >= 1, timeout=30, what="a scheduler cycle")
        assert not agent.site_deleted()
        client.delete(f"/sites/{site.site_id}")
        agent.wait(timeout=30)
        assert agent.stop_reason == "site-deleted"
        stopped = [r for r in caplog.records if "is no longer on the server" in r.getMessage()]
        assert len(stopped) == 1 and stopped[0].levelno == logging.ERROR
        assert f"site {site.site_id} (" in stopped[0].getMessage()
    finally:
        agent.shutdown()


class _ExitingModule:
    """Built lazily (AgentModule is abstract): a module whose first cycle calls sys.exit."""

    @staticmethod
    def make(site, raising: type) -> object:
        from balsam.site.module import AgentModule

        class Exiting(AgentModule):
            section = "exiting"
            default_period = 0.05

            def __init__(self) -> None:
                super().__init__(site, None, None)
                self.calls = 0

            def run_cycle(self):
                self.calls += 1
                if self.calls == 1:
                    if raising is SystemExit:
                        sys.exit(3)  # as a plugin or driver might
                    raise raising()
                return None

        return Exiting()


def test_a_module_calling_sys_exit_is_logged_and_keeps_running(make_site, client, caplog) -> None:
    site = make_site(overrides={"file_cleaner": None, "scheduler": None, "processing": None})
    module = _ExitingModule.make(site, SystemExit)
    caplog.set_level(logging.INFO, logger="balsam.site")
    agent = Agent(site, client=client, modules=[module])
    agent.start()
    try:
        wait_for(lambda: agent.cycles.get("exiting", 0) >= 2, timeout=30, what="2 more cycles after sys.exit")
        assert agent.threads[0].is_alive() and agent.errors["exiting"] == 1
        assert any("exiting: cycle raised SystemExit (the agent carries on): 3" in r.getMessage()
                   for r in caplog.records)
    finally:
        agent.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_agent_logs_a_module_thread_that_died(make_site, client, caplog) -> None:
    site = make_site(overrides={"file_cleaner": None, "scheduler": None, "processing": None})
    module = _ExitingModule.make(site, KeyboardInterrupt)  # the one exception the loop lets through
    agent = Agent(site, client=client, modules=[module])
    agent.start()
    try:
        agent.threads[0].join(10)
        agent.wait(timeout=2.5)
        died = [r for r in caplog.records if "thread died" in r.getMessage()]
        assert len(died) == 1 and died[0].levelno == logging.ERROR and "agent-exiting" in died[0].getMessage()
    finally:
        agent.shutdown()
