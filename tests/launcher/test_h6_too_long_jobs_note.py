"""A launcher that goes idle while runnable jobs ask for more wall time than it offers says so.

A job's ``wall_time_min`` is an acquire filter: a launcher leases only jobs that fit the whole
minutes it has left. One whose ``wall_time_min`` is more than a launcher ever offers (its ``-t``
less the safety margin) is never leased by it; the launcher went idle saying only "0 started", and
the job waited, PREPROCESSED, with nothing anywhere saying why. Now an idle end reads the runnable
jobs once (the request serial mode already made for its multi-rank note, in mpi mode too) and logs
a WARNING naming how many and how long, also in the BatchJob's ``status_info["launcher"]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states


def test_the_note_counts_the_jobs_longer_than_offered() -> None:
    from balsam.launcher.job_mode import Countdown, longest_offered_min, too_long_note

    assert longest_offered_min(Countdown(1)) == 0  # 60 s less a 6 s margin
    assert longest_offered_min(Countdown(58)) == 55  # 3,480 s less the 120 s cap is 56 min whole: an acquire after the start sends 55
    rows = [{"wall_time_min": 0}, {"wall_time_min": 56}, {"wall_time_min": 57}, {"wall_time_min": 90}]
    note = too_long_note(rows, False, 56, 58)
    assert note is not None and note.startswith("2 runnable jobs ask for more wall time (up to 90 min) than this "
                                                "launcher offered (56 min: -t 58 less its safety margin)"), note
    assert too_long_note(rows[:3], True, 56, 58).startswith("at least 1 runnable job asks for more wall time (57 min)")
    assert too_long_note(rows[:2], False, 56, 58) is None


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_an_idle_launcher_names_the_jobs_too_long_for_it(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Short(ApplicationDefinition):
        site = name
        command_template = "true"

    Short.sync()
    ids = make_runnable([Short.submit(workdir="fits", save=False),
                         Short.submit(workdir="long", wall_time_min=5, save=False)])
    console = path / "log" / "console.txt"
    proc = start_launcher(path, mode, 1, output=console)
    assert finish(proc) == 0
    jobs = wait_for_states(ids, {"RUN_DONE", "PREPROCESSED"}, timeout=30)
    assert [str(jobs[i].state) for i in ids] == ["RUN_DONE", "PREPROCESSED"]
    text = console.read_text()
    assert ("1 runnable job asks for more wall time (5 min) than this launcher offered (0 min: -t 1 less its safety "
            "margin) and was never leased here") in text, text[-3000:]
