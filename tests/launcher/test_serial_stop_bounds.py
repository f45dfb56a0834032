"""Serial mode's launcher at a stop: naming the workers' MPI launcher never fails it, and its wait
for the master's Session close ends as soon as the master is known dead and stays well inside
Slurm's KillWait (30 s by default, after which every process of the job is SIGKILLed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from balsam.launcher.modes import serial
from balsam.launcher.modes.serial import SerialMode


@pytest.mark.parametrize("cmd, name", [
    ("srun -n 2 --cpus-per-task 4 python -m worker", "srun"),
    ("/opt/pals/bin/mpiexec -n 2 python -m worker", "mpiexec"),
    ("env X=1 srun -n 2 python -m worker", "srun"),
    ("env -u SLURM_MEM_PER_CPU OMP_NUM_THREADS=1 srun -n 2 worker", "srun"),
    ("FOO='a b' mpiexec -n 2 worker", "mpiexec"),
    # a startup parameter shlex refuses (bash gets the line as it is): no ValueError
    ("srun --comment \"it's -n 2 worker", "srun"),
])
def test_launcher_name_of_a_workers_command_line(cmd: str, name: str) -> None:
    assert serial.launcher_name(cmd) == name


def _mode(tmp_path: Path, grace_sec: float) -> SerialMode:
    mode = object.__new__(SerialMode)
    mode.context = SimpleNamespace(log_file=lambda name: tmp_path / name)
    mode.countdown = SimpleNamespace(grace_sec=grace_sec)
    mode.stop = SimpleNamespace(reason="signal", requested=True)
    mode._launcher_name = "srun"
    return mode


def test_stop_wait_is_bounded_below_slurm_killwait(tmp_path: Path) -> None:
    assert _mode(tmp_path, grace_sec=10.0).stop_report_wait_sec() <= 15


def test_a_dead_master_on_this_host_is_not_waited_for(tmp_path: Path, monkeypatch) -> None:
    mode = _mode(tmp_path, grace_sec=10.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"session_id": 7, "pid": dead.pid, "host": socket.gethostname(), "closed": None}
    mode.session_path.write_text(json.dumps(record))
    ended = []
    monkeypatch.setattr(mode, "_end_session", ended.append, raising=False)

    def no_wait(seconds: float) -> None:
        raise AssertionError("waited for a master that is known dead")

    monkeypatch.setattr(serial.time, "sleep", no_wait)
    assert mode._workers_stopped(-15, hard_deadline=float("inf")) == 1
    assert [r["session_id"] for r in ended] == [7]
