"""The idle launcher's note on runnable jobs longer than it offered named the wall time less the
margin (``(wall - margin) // 60``), while its first acquire sent ``remaining_min()``, already short
of the seconds since the launcher started: at whole minutes (every whole ``-t`` of 20 or more with
the 120 s margin) the note claimed one minute more than any acquire offered, so a job asking
``-t`` minus 2 minutes was never leased and nothing said why. Unit, and real launchers in both modes."""

from __future__ import annotations

import time

import pytest

from balsam.launcher.job_mode import Countdown, longest_offered_min, too_long_note
from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states


def test_the_note_names_what_the_first_acquire_offered() -> None:
    countdown = Countdown(30, start_time=time.time() - 0.5)  # half a second after the launcher started
    # Before any acquire of this process (serial mode's launcher: its master acquires): the most an
    # acquire made after the start can have offered.
    assert longest_offered_min(countdown) == 27
    offered = countdown.remaining_min()  # what an acquire sends
    assert offered == 27 and longest_offered_min(countdown) == offered
    assert too_long_note([{"wall_time_min": 28}], False, longest_offered_min(countdown), 30) is not None


def test_the_largest_acquire_counts_not_a_later_reading() -> None:
    countdown = Countdown(30, start_time=time.time() - 0.5, margin_sec=90.0)  # 28.5 min left: 28
    first = countdown.remaining_min()
    countdown.deadline -= 600  # ten minutes later (a too-late check reads the time left again)
    assert countdown.remaining_min() == first - 10
    assert longest_offered_min(countdown) == first == 28


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_a_job_asking_the_boundary_minute_is_named(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Short(ApplicationDefinition):
        site = name
        command_template = "true"

    Short.sync()
    # -t 30: 1,800 s less the 120 s margin = 28 min exactly; the first acquire offers 27.
    ids = make_runnable([Short.submit(workdir="fits", save=False),
                         Short.submit(workdir="edge", wall_time_min=28, save=False)])
    console = path / "log" / "console.txt"
    proc = start_launcher(path, mode, 30, output=console)
    assert finish(proc) == 0
    jobs = wait_for_states(ids, {"RUN_DONE", "PREPROCESSED"}, timeout=30)
    assert [str(jobs[i].state) for i in ids] == ["RUN_DONE", "PREPROCESSED"]
    text = "".join(f.read_text(errors="replace") for f in sorted((path / "log").rglob("*")) if f.is_file())
    assert "1 runnable job asks for more wall time (28 min) than this launcher offered (27 min:" in text, text[-3000:]
