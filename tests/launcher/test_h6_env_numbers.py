"""Launcher settings from the environment that float() takes but that are no setting: nan, inf and
(for the safety margin) negatives are ignored with a warning, as a value that is no number was.

- ``BALSAM_LAUNCHER_MARGIN_SEC=nan``: every acquire failed ("cannot convert float NaN to
  integer"), so the launcher ran nothing and ended idle, and the stop's grace was nan; a negative
  margin ran the jobs past the allocation's end, where the batch system kills them unreported.
- ``BALSAM_LAUNCHER_TICK_SEC=nan`` gave a heartbeat every 0.1 s (``max(0.1, nan)`` is 0.1), and
  ``inf`` none at all: the server expired the Session of a launcher still running its jobs.
"""

from __future__ import annotations

import logging
import math

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-30"])
def test_a_margin_that_is_no_margin_is_ignored(raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from balsam.launcher.job_mode import Countdown

    monkeypatch.setenv("BALSAM_LAUNCHER_MARGIN_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        countdown = Countdown(10, start_time=1000.0)
    assert countdown.margin_sec == 60.0 and countdown.deadline == 1000.0 + 600 - 60  # 10 % of 600 s
    assert math.isfinite(countdown.grace_sec)
    assert f"environment variable BALSAM_LAUNCHER_MARGIN_SEC={raw!r} is not a number from 0 " in caplog.text


def test_a_margin_of_zero_or_more_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.launcher.job_mode import Countdown

    for raw, margin in [("0", 0.0), ("7.5", 7.5)]:
        monkeypatch.setenv("BALSAM_LAUNCHER_MARGIN_SEC", raw)
        assert Countdown(10).margin_sec == margin


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_a_tick_period_that_is_not_finite_is_ignored(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from balsam.client.lease import DEFAULT_TICK_SEC, tick_period_from_env

    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert tick_period_from_env() == DEFAULT_TICK_SEC
    assert f"environment variable BALSAM_LAUNCHER_TICK_SEC={raw!r} is not a number from 0 to 86400 " in caplog.text
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", "2")
    assert tick_period_from_env() == 2.0


@pytest.mark.slow
@pytest.mark.mpi
def test_a_launcher_with_a_nan_margin_runs_its_jobs(new_site) -> None:
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Hello(ApplicationDefinition):
        site = name
        command_template = "echo hello"

    Hello.sync()
    ids = make_runnable([Hello.submit(workdir="hello", save=False)])
    proc = start_launcher(path, "mpi", 1, env={"BALSAM_LAUNCHER_MARGIN_SEC": "nan"})
    assert finish(proc) == 0
    assert str(wait_for_states(ids, {"RUN_DONE", "PREPROCESSED"}, timeout=30)[ids[0]].state) == "RUN_DONE"
