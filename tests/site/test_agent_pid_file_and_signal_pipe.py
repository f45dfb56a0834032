"""Agent.run()'s end: the pid file is removed while the agent's own signal handlers are still
installed (before: after they were put back, so a SIGTERM in between ended the process with its
default action and left the pid file behind); and the signal thread closes its pipe's read end
when reading it fails (before: only when it read end-of-file)."""

from __future__ import annotations

import errno
import os
import signal
from types import SimpleNamespace

import pytest

from balsam.site import agent as agent_module
from balsam.site.agent import Agent
from balsam.site.module import AgentModule


class StopAtOnce(AgentModule):
    section = "stop_at_once"

    def __init__(self, ref: list) -> None:
        super().__init__(None, None, None)
        self.ref = ref

    def run_cycle(self) -> float:
        self.ref[0].request_stop("test")
        return 0.01


def test_the_pid_file_is_removed_before_the_handlers_are_put_back(tmp_path, monkeypatch) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[bool] = []
    real = agent_module.remove_pid_file

    def recording(site_path):
        seen.append(signal.getsignal(signal.SIGTERM) is not before)  # the agent's handler still in place
        real(site_path)

    monkeypatch.setattr(agent_module, "remove_pid_file", recording)
    ref: list = []
    agent = Agent(SimpleNamespace(site_path=str(tmp_path), site_id=1), client=object(), modules=[StopAtOnce(ref)])
    ref.append(agent)
    assert agent.run() == 0
    assert seen == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_pid_file_is_written_once_the_handlers_are_in_place(tmp_path, monkeypatch) -> None:
    """`balsam site stop` signals the pid it reads in the pid file at once: a SIGTERM before the
    handlers met the default action (the agent ended with no shutdown, its pid file left), a SIGHUP
    under nohup was ignored (CI: the agent ran on and its test timed out)."""
    before = signal.getsignal(signal.SIGTERM)
    seen: list[bool] = []
    real = agent_module.write_pid_file

    def recording(site_path):
        seen.append(signal.getsignal(signal.SIGTERM) is not before)
        real(site_path)

    monkeypatch.setattr(agent_module, "write_pid_file", recording)
    ref: list = []
    agent = Agent(SimpleNamespace(site_path=str(tmp_path), site_id=1), client=object(), modules=[StopAtOnce(ref)])
    ref.append(agent)
    assert agent.run() == 0
    assert seen == [True]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("code, closed", [(errno.EIO, True), (errno.EBADF, False)])
def test_a_failed_read_of_the_signal_pipe_closes_it(tmp_path, monkeypatch, code: int, closed: bool) -> None:
    read_fd, write_fd = os.pipe()
    try:
        agent = Agent(SimpleNamespace(site_path=str(tmp_path), site_id=1), client=object(), modules=[])

        def failing(fd: int, n: int) -> bytes:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(agent_module.os, "read", failing)
        agent._serve_signals(read_fd)
        monkeypatch.undo()
        try:
            os.fstat(read_fd)
            is_closed = False
        except OSError:
            is_closed = True
        assert is_closed == closed  # EBADF: the number may be another file's, so it is left alone
    finally:
        os.close(write_fd)
        if not closed:
            os.close(read_fd)
