"""The site agent's signal handler and its module loop's waits.

- SIGTERM arriving while the main thread held stop_event's Condition lock (inside
  ``stop_event.wait()`` in ``Agent.wait``) deadlocked the agent: the handler called
  ``stop_event.set()``, which needs that same non-reentrant lock (`balsam site stop` gave up after
  45 s). The handler now takes no lock; a helper thread stops the agent.
- A module period of NaN made the module loop spin; one past the platform's time_t ended its
  thread (OverflowError). The loop now waits a usable time and warns once.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import threading
from typing import Any, Optional

import balsam.site.agent as agent_module
from balsam.site.agent import Agent
from balsam.site.module import AgentModule

#: Run in a subprocess: a deadlock there must not hang the test run (the subprocess timeout ends it).
_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, threading
    from types import SimpleNamespace
    from balsam.site.agent import Agent

    agent = Agent(SimpleNamespace(site_path="/nonexistent", site_id=1), client=object(), modules=[])
    agent._install_signal_handlers()
    with agent.stop_event._cond:  # what Event.wait() holds between two bytecodes
        os.kill(os.getpid(), signal.SIGTERM)
        x = 1  # the handler runs at this bytecode boundary
    # The helper thread sets the event once the lock is free; Agent.wait() would see it.
    assert agent.stop_event.wait(30), "stop not requested"
    print("stopped:", agent.stop_reason, signal.Signals(agent.signal_received).name)
    """
)


def test_sigterm_while_the_stop_event_lock_is_held_stops_the_agent() -> None:
    try:
        proc = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the agent deadlocked in its SIGTERM handler") from None
    assert proc.returncode == 0, proc.stderr
    assert "stopped: signal SIGTERM" in proc.stdout


class _OneCycle(AgentModule):
    """Returns ``delay`` from each cycle; the test stops the agent from the second cycle on."""

    section = "one_cycle"

    def __init__(self, agent_ref: list, delay: float) -> None:
        super().__init__(None, None, None)
        self.agent_ref = agent_ref
        self.delay = delay
        self.calls = 0

    def run_cycle(self) -> Optional[float]:
        self.calls += 1
        if self.calls >= 2:
            self.agent_ref[0].request_stop("test")
        return self.delay


def _run_loop(delay: float, caplog: Any) -> tuple[_OneCycle, list[float]]:
    from types import SimpleNamespace

    ref: list = []
    module = _OneCycle(ref, delay)
    agent = Agent(SimpleNamespace(site_path="/nonexistent", site_id=1), client=object(), modules=[module])
    ref.append(agent)
    waits: list[float] = []
    real_wait = agent.stop_event.wait

    def recording_wait(timeout: Optional[float] = None) -> bool:
        waits.append(timeout)
        agent.request_stop("test")  # one wait is enough to see its length
        return real_wait(0)

    agent.stop_event.wait = recording_wait  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="balsam.site.agent"):
        thread = threading.Thread(target=agent._module_loop, args=(module,))
        thread.start()
        thread.join(30)
    assert not thread.is_alive()
    return module, waits


def test_nan_delay_waits_the_default_period_with_one_warning(caplog: Any) -> None:
    module, waits = _run_loop(math.nan, caplog)
    assert waits == [AgentModule.default_period]
    assert [r for r in caplog.records if "cannot wait nan s" in r.getMessage()]


def test_huge_delay_waits_at_most_a_year(caplog: Any) -> None:
    module, waits = _run_loop(1e20, caplog)
    assert waits == [agent_module.MAX_CYCLE_DELAY_SEC]
    assert [r for r in caplog.records if "cannot wait 1e+20 s" in r.getMessage()]


#: Three agents run one after the other in one process (an embedding program, or tests): each
#: run() left its signal thread and two pipe descriptors behind, and its handlers installed.
_RUNS_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, tempfile, threading
    from types import SimpleNamespace
    from balsam.site.agent import Agent
    from balsam.site.module import AgentModule

    class StopAtOnce(AgentModule):
        section = "stop_at_once"
        def __init__(self, ref):
            super().__init__(None, None, None)
            self.ref = ref
        def run_cycle(self):
            self.ref[0].request_stop("test")
            return 0.01

    def own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    hup_before = signal.getsignal(signal.SIGHUP)  # SIG_DFL, or SIG_IGN under nohup
    site = tempfile.mkdtemp()
    fds = []
    for _ in range(3):
        ref = []
        agent = Agent(SimpleNamespace(site_path=site, site_id=1), client=object(), modules=[StopAtOnce(ref)])
        ref.append(agent)
        assert agent.run() == 0
        fds.append(len(os.listdir("/proc/self/fd")))
    for _ in range(100):
        if not [t for t in threading.enumerate() if t.name == "agent-signals"]:
            break
        threading.Event().wait(0.05)
    print("threads:", len([t for t in threading.enumerate() if t.name == "agent-signals"]))
    print("fds:", fds)
    print("sigterm is ours:", signal.getsignal(signal.SIGTERM) is own)
    print("sighup as before:", signal.getsignal(signal.SIGHUP) is hup_before)
    """
)


def test_run_puts_its_signal_handlers_back_and_closes_its_pipe() -> None:
    proc = subprocess.run([sys.executable, "-c", _RUNS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert lines["threads"] == "0"
    fds = eval(lines["fds"])  # noqa: S307 - our own script's list of three numbers
    assert fds[0] == fds[1] == fds[2], fds
    assert lines["sigterm is ours"] == "True"
    assert lines["sighup as before"] == "True"
