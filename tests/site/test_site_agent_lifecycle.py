"""The agent's life cycle: simultaneous starts (lock), SIGHUP, hung modules, a pid file of another host,
`site sync` with the agent elsewhere, settings pushed once the API answers."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from click.testing import CliRunner

from balsam.site.agent import Agent, pid_file_path, read_pid_file
from balsam.site.module import AgentModule
from site_test_utils import wait_for

NO_MODULES = {"file_cleaner": None, "processing": None, "scheduler": None, "transfers": None}


# -- two agents starting at the same moment --------------------------------------------------------


def _start_at_once(site_path: str, go: Any, done: Any, results: Any) -> None:
    from balsam.site.agent import AgentError, write_pid_file

    go.wait(timeout=30)
    try:
        write_pid_file(Path(site_path))
        outcome = "ok"
    except AgentError:
        outcome = "refused"
    except Exception as exc:  # e.g. FileNotFoundError from a shared temp name
        outcome = f"crash:{type(exc).__name__}"
    results.put(outcome)
    done.wait(timeout=30)  # the winner holds its lock and pid file until every contender has tried


def test_agents_started_at_the_same_moment_one_runs(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    contenders, rounds = 4, 4
    for _ in range(rounds):
        pid_file_path(tmp_path).unlink(missing_ok=True)
        go, done, results = ctx.Barrier(contenders), ctx.Barrier(contenders), ctx.Queue()
        procs = [ctx.Process(target=_start_at_once, args=(str(tmp_path), go, done, results)) for _ in range(contenders)]
        for proc in procs:
            proc.start()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join(60)
        assert outcomes == ["ok"] + ["refused"] * (contenders - 1)
    assert not list(tmp_path.glob("*.tmp"))


# -- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_stops_a_foreground_agent_cleanly(make_site: Any, tmp_path: Path) -> None:
    """Closing the terminal of `python -m balsam.site . --log-to-stderr`: the agent shuts down (its log
    buffer written, pid file removed) instead of dying."""
    site = make_site(overrides={**NO_MODULES, "logging": {"buffer_num_records": 1000}})
    site_path = Path(site.site_path)
    with open(tmp_path / "console.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "balsam.site", str(site_path), "--log-to-stderr"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: read_pid_file(site_path) == (socket.gethostname(), proc.pid), timeout=60, what="the pid file")
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "\n".join(p.read_text() for p in (site_path / "log").glob("agent_*.log"))
    assert "received SIGHUP: stopping" in log and "agent stopped" in log
    assert not pid_file_path(site_path).exists()


# -- a hung module -----------------------------------------------------------------------------------


class _Hang(AgentModule):
    section = "hang"
    default_period = 0.2
    release = threading.Event()

    def run_cycle(self) -> Optional[float]:
        self.release.wait()  # e.g. an NFS stat or a socket without a timeout
        return None


class _Ok(AgentModule):
    section = "ok"
    default_period = 0.2

    def run_cycle(self) -> Optional[float]:
        return None


def test_a_hung_module_is_reported_once_with_its_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import balsam.site.agent as agent_mod

    monkeypatch.setattr(agent_mod, "HUNG_CYCLE_MIN_SEC", 0.5)
    monkeypatch.setattr(agent_mod, "HUNG_CYCLE_PERIODS", 1.0)
    monkeypatch.setattr(agent_mod, "ALIVE_NOTE_SEC", 0.0)
    monkeypatch.setattr(Agent, "_token_deadline", lambda self: None)
    caplog.set_level(logging.INFO, logger="balsam.site")
    config = SimpleNamespace(site_path=tmp_path, site_id=1)
    _Hang.release = threading.Event()
    agent = Agent(config, client=object(), modules=[_Hang(config, None, None), _Ok(config, None, None)])
    agent.start()

    def hung_errors() -> list:
        return [r for r in caplog.records if r.levelno == logging.ERROR and "looks hung" in r.getMessage()]

    try:
        for _ in range(60):  # bounded: each wait() runs at least one check of the threads
            agent.wait(timeout=1.0)
            if hung_errors() and any("hung: hang" in r.getMessage() for r in caplog.records):
                break
        agent._check_threads()
        agent._check_threads()
        errors = hung_errors()
        assert len(errors) == 1  # once per hung cycle, not every check
        message = errors[0].getMessage()
        assert message.startswith("hang: a cycle has run for") and "in run_cycle" in message and "self.release.wait()" in message
        alive = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent alive")]
        assert any("hung: hang (cycle running for" in line for line in alive)
        assert not any("ok" in line.split("hung:")[-1] for line in alive if "hung:" in line)
    finally:
        _Hang.release.set()
        agent.shutdown("signal", join_timeout=10)


# -- settings pushed once the API answers ----------------------------------------------------------


def test_settings_push_is_retried_after_the_first_successful_cycle(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Agent, "_token_deadline", lambda self: None)
    puts: list = []

    class Client:
        def put(self, url: str, json: Any = None) -> dict:
            puts.append(url)
            if len(puts) == 1:
                raise ConnectionError("server down at the agent's start")
            return {}

    config = SimpleNamespace(site_path=tmp_path, site_id=7, settings=SimpleNamespace())
    agent = Agent(config, client=Client(), modules=[_Ok(config, None, None)])
    assert agent.push_settings() is False and agent.settings_push_pending
    agent.start()
    try:
        for _ in range(30):
            agent.wait(timeout=1.0)
            if not agent.settings_push_pending:
                break
        assert puts == ["/sites/7", "/sites/7"] and not agent.settings_push_pending
    finally:
        agent.shutdown("signal", join_timeout=10)


# -- a pid file naming another host --------------------------------------------------------------


def _cli(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args))


def _foreign_pid_file(site_path: Path) -> Path:
    path = pid_file_path(site_path)
    path.write_text("retired-login-node-7\n4242\n1700000000.000\n")
    return path


def test_a_pid_file_of_another_host_with_a_silent_site(make_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A login node retired with the agent's pid file on the shared file system: start/stop/rm/mv used
    to point at each other for good. The site record, not refreshed for longer than the limit, says
    that agent is dead; --force drops the file."""
    from balsam.site import site_ops
    from balsam.site.site_ops import stop_agent

    site = make_site(overrides=NO_MODULES)
    site_path = Path(site.site_path)
    pid_file = _foreign_pid_file(site_path)
    monkeypatch.setattr(site_ops, "STALE_MIN_SEC", 0.0)  # any age is "silent for too long"
    monkeypatch.setattr(site_ops, "STALE_REFRESH_PERIODS", 0)
    for args, retry in ((["site", "start", str(site_path)], "start"), (["site", "stop", str(site_path)], "stop"),
                        (["site", "rm", "-y", str(site_path)], "stop"),
                        (["site", "mv", str(site_path), str(site_path) + "-moved"], "stop")):
        result = _cli(*args)
        assert result.exit_code == 1, result.output
        error = result.output.strip().splitlines()[-1]
        assert error.startswith("Error: the pid file ") and str(pid_file) in error and "retired-login-node-7" in error
        assert "looks dead" in error and f"`balsam site {retry} --force` drops the pid file" in error
    assert site_path.is_dir() and pid_file.exists()
    try:
        result = _cli("site", "start", "--force", str(site_path))
        assert result.exit_code == 0, result.output
        assert f"Removed the pid file {pid_file} of the site agent on retired-login-node-7" in result.output
        host, pid = read_pid_file(site_path)
        assert host == socket.gethostname() and f"Started Balsam site agent [pid {pid}]" in result.output
    finally:
        stop_agent(site_path, timeout=30, force=True)


def test_a_pid_file_of_another_host_with_a_live_site_is_kept(make_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshed within the limit: that agent talks to the server; --force does not override it."""
    from balsam.site import site_ops

    site = make_site(overrides=NO_MODULES)
    site_path = Path(site.site_path)
    pid_file = _foreign_pid_file(site_path)
    monkeypatch.setattr(site_ops, "STALE_MIN_SEC", 1e9)
    for command in ("start", "stop"):
        result = _cli("site", command, "--force", str(site_path))
        assert result.exit_code == 1, result.output
        error = result.output.strip().splitlines()[-1]
        assert error.startswith("Error: the site agent runs on retired-login-node-7 [pid 4242]")
        assert str(pid_file) in error and "--force drops it only once the site has been silent" in error
    assert pid_file.exists()


def test_sync_says_an_agent_on_another_host_was_not_restarted(make_site: Any) -> None:
    site = make_site(overrides=NO_MODULES)
    site_path = Path(site.site_path)
    _foreign_pid_file(site_path)
    result = _cli("site", "sync", str(site_path))
    assert result.exit_code == 0, result.output
    assert ("The site agent runs on retired-login-node-7 [pid 4242] and was not restarted: agent settings apply at "
            f"its start; on retired-login-node-7 run `balsam site stop {site_path}`") in result.output
