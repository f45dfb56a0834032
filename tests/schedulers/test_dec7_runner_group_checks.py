"""How ``subprocess_runner`` (real processes) tells whether an exited command left processes in its
process group, and how it reads the command's output and exit:

- where /proc cannot be read (macOS, a BSD without procfs) only ``killpg(pgid, 0)`` says whether
  the group has members, and the command's own zombie is one: kept unreaped, every command was
  taken for one that left processes (a false warning and a 1 s wait on every poll). There the
  command is reaped first, with ``os.waitid`` (Python 3.13 on macOS has it) and without it;
- on Linux only the pids given after the command's are read (its members were started after it),
  not every process of the host on every command;
- a command that keeps its pipes full is still timed out;
- a command that the agent's shutdown reaps before the runner read its exit (``kill_descendants``
  ending the agent's children) is no exit 0: its outcome is unknown.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from balsam import scheduler
from balsam.scheduler import Command, SchedulerError, subprocess_runner
from balsam.site.agent import kill_descendants

LEFT_WARNING = "left processes in its process group"


def _mark() -> str:
    return f"{random.randint(100000, 999999)}.45"


def _running(mark: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] == ["sleep", mark] and p.info["status"] != psutil.STATUS_ZOMBIE]


def _kill(mark: str) -> None:
    for proc in _running(mark):
        proc.kill()


def _wait_until(condition, what: str) -> None:
    for _ in range(200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("waitid", [True, False], ids=["waitid", "no-waitid"])
def test_without_proc_a_command_that_left_nothing_is_not_warned_about(monkeypatch, tmp_path, caplog, waitid):
    missing = str(tmp_path / "no-proc")
    listdir = os.listdir

    def no_proc_listdir(path="."):  # also what the runner read before _PROC named the folder
        if str(path) == "/proc":
            raise FileNotFoundError(path)
        return listdir(path)

    monkeypatch.setattr(scheduler, "_PROC", missing, raising=False)
    monkeypatch.setattr(os, "listdir", no_proc_listdir)
    if not waitid:  # macOS before Python 3.13
        monkeypatch.delattr(os, "waitid")
    caplog.set_level(logging.WARNING, logger="balsam.scheduler")
    for _ in range(2):
        result = subprocess_runner(Command(["/bin/sh", "-c", "echo out; exit 3"], timeout=30))
        assert (result.returncode, result.stdout) == (3, "out\n")
    assert LEFT_WARNING not in caplog.text, "the command's own zombie was taken for a process it left"

    # A process the command did leave is still ended, with the warning.
    left = _mark()
    try:
        result = subprocess_runner(Command(["/bin/sh", "-c", f"(sleep {left} > /dev/null 2>&1 &); echo done"],
                                           timeout=30))
        assert (result.returncode, result.stdout) == (0, "done\n")
        assert LEFT_WARNING in caplog.text
        assert not _running(left), "the child the exited command left in its group runs on"
    finally:
        _kill(left)


@pytest.mark.parametrize("scan", ["pids-after-the-command", "every-process"])
def test_a_process_left_in_the_group_is_found_by_either_listing(monkeypatch, caplog, scan):
    if scan == "every-process":  # pids given again from the lowest, or too many to read one by one
        monkeypatch.setattr(scheduler, "_PID_RANGE_MAX", -1, raising=False)
    caplog.set_level(logging.WARNING, logger="balsam.scheduler")
    left = _mark()
    try:
        result = subprocess_runner(Command(["/bin/sh", "-c", f"(sleep {left} > /dev/null 2>&1 &); echo done"],
                                           timeout=30))
        assert (result.returncode, result.stdout) == (0, "done\n")
        assert LEFT_WARNING in caplog.text
        assert not _running(left)
    finally:
        _kill(left)


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/ns_last_pid"), reason="Linux's ns_last_pid")
def test_a_command_that_left_nothing_costs_no_read_of_every_process(monkeypatch, caplog):
    listed = []
    listdir = os.listdir

    def counting_listdir(path="."):
        if str(path) == "/proc":
            listed.append(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counting_listdir)
    caplog.set_level(logging.WARNING, logger="balsam.scheduler")
    for _ in range(3):
        assert subprocess_runner(Command(["true"], timeout=30)).returncode == 0
    assert LEFT_WARNING not in caplog.text
    assert not listed, "every process of the host was read for each command"


def test_a_command_that_keeps_its_pipes_full_is_timed_out(tmp_path, monkeypatch):
    """Checked after the reads too: read only while nothing was ready, a command whose output never
    ran dry (always ready, as a regular file is to select(2)) was never timed out."""
    monkeypatch.setattr(scheduler.selectors, "DefaultSelector", scheduler.selectors.SelectSelector)  # epoll: no files
    full = tmp_path / "full"
    with full.open("wb") as fp:
        fp.truncate(8 * 1024 * 1024)  # sparse: 256 reads of 32 KiB each
    command = subprocess.Popen(["sleep", "30"])
    try:
        with full.open("rb") as out, full.open("rb") as err:
            command.stdout, command.stderr = out, err
            output = scheduler._CommandOutput(command)
            assert not output.wait(0.0)
            read = sum(len(chunk) for chunk in output._chunks[out])
            assert read < full.stat().st_size, "read on past its deadline while the output never ran dry"
    finally:
        command.stdout = command.stderr = None
        command.kill()
        command.wait()


def test_a_command_the_agents_shutdown_reaps_is_no_exit_0():
    """kill_descendants (psutil.wait_procs) may reap the runner's child before Popen.wait does,
    which then reads an exit 0: a submit a signal ended read as one that succeeded."""
    mark = _mark()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(subprocess_runner, Command(["/bin/sh", "-c", f"echo partial; exec sleep {mark}"],
                                                     timeout=60))
        try:
            _wait_until(lambda: _running(mark), "the command's sleep")
            assert kill_descendants(grace_sec=5)
            try:
                result = run.result(timeout=30)
            except SchedulerError as exc:
                assert "its outcome is unknown" in str(exc)
            else:  # the runner read the exit first: the signal's number (Scheduler.run: unknown)
                assert result.returncode < 0, f"a command ended by SIGTERM came back {result}"
        finally:
            _kill(mark)
