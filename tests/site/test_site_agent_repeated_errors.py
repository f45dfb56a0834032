"""A module whose cycle keeps failing with the same error: the agent logged a full traceback every
period (a persistent failure at a 1 s period: ~86,000 tracebacks a day). Now the error is logged in
full the first time, then once every ``REPEATED_ERROR_LOG_SEC`` with the number of repeats
meanwhile, and one line says when the module recovers. The agent's clock is a fake one, moved by
the module's cycles: no test here waits for the interval."""

from __future__ import annotations

import logging
from typing import Any

from balsam.site import agent as agent_module
from balsam.site.agent import Agent
from site_test_utils import wait_for

STEP_SEC = 10.0  # fake seconds per cycle


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _flaky_module(site: Any, clock: _Clock, failing: set[int], errors: dict[int, Exception]) -> Any:
    from balsam.site.module import AgentModule

    class Flaky(AgentModule):
        section = "flaky"
        default_period = 0.001

        def __init__(self) -> None:
            super().__init__(site, None, None)
            self.calls = 0

        def run_cycle(self):
            self.calls += 1
            clock.now += STEP_SEC
            if self.calls in failing:
                raise errors.get(self.calls) or RuntimeError("disk full: /scratch/site/data")
            return None

    return Flaky()


def test_the_same_error_is_logged_in_full_once_then_summed_up_and_the_recovery_noted(make_site, client, caplog) -> None:
    site = make_site(overrides={"file_cleaner": None, "scheduler": None, "processing": None})
    clock = _Clock()
    # Cycles 1-100 fail (1,000 fake seconds), then one with another error between two of the same;
    # 101-102 succeed; 103 fails as before (new since the recovery: in full again); then all succeed.
    failing = set(range(1, 101)) | {103}
    errors = {50: ValueError("another one")}
    module = _flaky_module(site, clock, failing, errors)
    caplog.set_level(logging.INFO, logger="balsam.site.agent")
    agent = Agent(site, client=client, modules=[module])
    agent.clock = clock
    agent.start()
    try:
        wait_for(lambda: module.calls >= 106, timeout=60, what="106 cycles of the module")
    finally:
        agent.shutdown("signal")
    lines = [r for r in caplog.records if r.name == "balsam.site.agent" and "flaky: cycle" in r.getMessage()
             and "done; next in" not in r.getMessage()]
    full = [r for r in lines if r.exc_info]
    summed = [r.getMessage() for r in lines if not r.exc_info and r.levelno == logging.ERROR]
    recovered = [r.getMessage() for r in lines if "succeeded again" in r.getMessage()]
    assert agent.errors["flaky"] == 101
    assert len(full) == 3, f"{len(full)} tracebacks"
    # In full: the first "disk full", the one ValueError, and "disk full" again after the recovery.
    assert [r.getMessage() for r in full] == [
        "flaky: cycle failed (the agent carries on): disk full: /scratch/site/data",
        "flaky: cycle failed (the agent carries on): another one",
        "flaky: cycle failed (the agent carries on): disk full: /scratch/site/data",
    ]
    # 98 repeats of "disk full" 10 s apart from t=10 s: one line per 300 s (at 310, 610 and 910 s),
    # each with the repeats since the last (the ValueError at 500 s is not one of them).
    assert agent_module.REPEATED_ERROR_LOG_SEC == 300.0
    assert len(summed) == 3, summed
    assert summed[0] == ("flaky: cycle failed again (the agent carries on): RuntimeError: disk full: "
                         "/scratch/site/data; repeated 30 times in the last 5 min (31 times since 5 min ago)")
    assert "repeated 29 times in the last 5 min (60 times since 10 min ago)" in summed[1]
    assert "repeated 30 times in the last 5 min (90 times since 15 min ago)" in summed[2]
    assert recovered == [
        "flaky: cycle succeeded again after 100 failures in a row over 17 min (2 different errors)",
        "flaky: cycle succeeded again after 1 failure in a row over 0 min",
    ]
    assert len(lines) == 3 + 3 + 2  # instead of 101 tracebacks
