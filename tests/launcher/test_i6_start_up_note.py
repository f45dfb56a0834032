"""A launcher says, once, at its first job start, how long after its process started that was and
how much CPU it had spent by then (``balsam.launcher.runner.start_up_note``).

Why: the issue's figure "launcher start -> first RUNNING" measured 0.36-0.48 s end to end on a 2-CPU
VM shared with other work, while the launcher had spent 0.20-0.24 s of CPU by then: the rest was
waiting for a CPU. The line puts the two side by side in the launcher's own log, and
``benchmarks/launcher_throughput.py`` prints it beside its first-RUNNING figure (it finds the line
by its start, ``first job started``).

Before: no such line (``start_up_note`` and ``process_age_sec`` did not exist). Real uvicorn
server, real ``python -m balsam.launcher`` processes, real MPICH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable

NOTE = re.compile(r"first job started (?P<age>[0-9.]+) s after this process started, with (?P<cpu>[0-9.]+) s of CPU "
                  r"spent by this process, \d+ % of that time \(by thread: (?P<threads>[^)]*)\)")


def test_process_age_is_counted_from_the_process_start() -> None:
    """The age a child process computes for itself puts its start between the moment its parent
    asked for it (less one clock tick: the kernel counts the start in ticks) and the moment it
    answered: not the boot time of ``/proc/stat`` (whole seconds, up to 1 s early)."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    code = ("import json, time; from balsam.launcher.runner import process_age_sec; "
            "age = process_age_sec(); print(json.dumps([time.time(), age]))")
    asked = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    answered_at, age = json.loads(out)
    assert age is not None and age >= 0
    started = answered_at - age
    assert asked - 2 * tick <= started <= answered_at


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_the_first_start_is_noted_once(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=2)

    class Noop(ApplicationDefinition):
        site = name
        command_template = "true"

    Noop.sync()
    ids = make_runnable(Noop.submit(workdir=f"n{i}", save=False) for i in range(6))
    proc = start_launcher(path, mode, 5)
    assert finish(proc, timeout=120) == 0, Path(proc.console_path).read_text()
    assert {str(j.state) for j in Job.objects.filter(id=ids)} <= {"RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"}

    lines = [line for log in (path / "log").glob(f"{mode}_mode_*.log") for line in log.read_text().splitlines()
             if "first job started" in line]
    assert len(lines) == 1, lines  # one launcher, one first start
    match = NOTE.search(lines[0])
    assert match, lines[0]
    assert float(match["age"]) > 0 and float(match["cpu"]) > 0
    assert "MainThread" in match["threads"]


def test_benchmark_steady_state_line() -> None:
    """``launcher_throughput.steady_state``: the share of the time from the first start to the last
    exit with every slot busy, and a job's mean run beside a process of the limit's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from launcher_throughput import steady_state

    runs = {1: 0.000, 2: 0.000, 3: 0.010, 4: 0.030}
    exits = {1: 0.010, 2: 0.020, 3: 0.030, 4: 0.040, 5: 0.050}  # job 5 never seen RUNNING: not counted
    line = steady_state(runs, exits, slots=2, limit=200.0, limit_threads=2)
    # Two running over 0-20 ms of the 40 ms span; runs of 10, 20, 20, 10 ms.
    assert "first RUNNING -> last RUN_DONE 0.04 s" in line
    assert "busy 50 % of it" in line
    assert "15.0 ms on average, a process of the limit 10.0 ms (2 at a time)" in line
    assert steady_state({}, exits, 2, 200.0, 2) == "steady state: no job seen both RUNNING and ended"
