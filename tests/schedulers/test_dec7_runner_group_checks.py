"""How ``subprocess_runner`` (real processes) tells whether an exited command left processes in its
process group, and how it reads the command's output and exit:

- where /proc cannot be read (macOS, a BSD without procfs) only ``killpg(pgid, 0)`` says whether
  the group has members, and the command's own zombie is one: kept unreaped, every command was
  taken for one that left processes (a false warning and a 1 s wait on every poll). There the
  command is reaped first, with ``os.waitid`` (Python 3.13 on macOS has it) and without it;
- on Linux /proc is listed once and only the pids given out since the command's are read (its
  members were started after it), not every process of the host on every command; which pids those
  are is decided from given numbers here (pid wrap, a possible whole round of the pid space), as
  the host's own pids wrap every few minutes under load;
- a command that keeps its pipes full is still timed out;
- a command that the agent's shutdown reaps before the runner read its exit (``kill_descendants``
  ending the agent's children) is no exit 0: its outcome is unknown;
- a SIGCHLD ignored by what started the agent or the CLI (inherited across exec) is set back to
  its default at their start; where it is still ignored, the runner's error says so.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from balsam import scheduler
from balsam.scheduler import Command, SchedulerError, reset_ignored_sigchld, subprocess_runner
from balsam.process_identity import terminate_processes

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


def _a_left_child_is_ended(caplog) -> None:
    """A command that exits leaving a child in its process group: the runner warns and ends it."""
    left = _mark()
    try:
        result = subprocess_runner(Command(["/bin/sh", "-c", f"(sleep {left} > /dev/null 2>&1 &); echo done"],
                                           timeout=30))
        assert (result.returncode, result.stdout) == (0, "done\n")
        assert LEFT_WARNING in caplog.text
        assert not _running(left), "the child the exited command left in its group runs on"
    finally:
        _kill(left)


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
    _a_left_child_is_ended(caplog)


@pytest.mark.parametrize("scan", ["pids-given-since", "every-process"])
def test_a_process_left_in_the_group_is_found_by_either_listing(monkeypatch, caplog, scan):
    if scan == "every-process":  # the host's counts unreadable (or a whole round of pids possible)
        monkeypatch.setattr(scheduler, "_pid_use", lambda: None)
    else:  # counts that rule out a round of the pid space, whatever the host's pids do meanwhile
        monkeypatch.setattr(scheduler, "_pid_use", lambda: (10 ** 15, 0))
    caplog.set_level(logging.WARNING, logger="balsam.scheduler")
    _a_left_child_is_ended(caplog)


def _given(pgid, started, tasks, forks, last, pid_max=32768):
    given = scheduler._pids_given_since(pgid, (started, tasks), forks, last, pid_max)
    return None if given is None else {pid for span in given for pid in span}


def test_which_pids_were_given_since_the_command_with_given_numbers():
    # In turn: the pids after the command's, up to the last given.
    assert _given(1000, started=5000, tasks=200, forks=5012, last=1010) == set(range(1001, 1011))
    assert _given(1000, started=5000, tasks=200, forks=5001, last=1000) == set()
    # Wrapped once (the last given is below the command's): to pid_max - 1, and again from the lowest.
    assert _given(32700, started=5000, tasks=200, forks=5400, last=310) == set(range(32701, 32768)) | set(range(1, 311))
    # A whole round possible: every pid given since or skipped as taken (3 ids a task at most),
    # 32,768 - 300 of them: every process is read.
    assert _given(1000, started=5000, tasks=100, forks=5000 + 32468 - 300 - 1, last=1010) == set(range(1001, 1011))
    assert _given(1000, started=5000, tasks=100, forks=5000 + 32468 - 300, last=1010) is None
    assert _given(1000, started=0, tasks=10_900, forks=10, last=1010) is None
    # A figure unread.
    assert scheduler._pids_given_since(1000, None, 5012, 1010, 32768) is None
    assert scheduler._pids_given_since(1000, (5000, 200), None, 1010, 32768) is None
    assert scheduler._pids_given_since(1000, (5000, 200), 5012, None, 32768) is None
    assert scheduler._pids_given_since(1000, (5000, 200), 5012, 1010, None) is None


def _fake_proc(root, processes, *, last, forks, pid_max=32768):
    """A /proc with ``processes`` (pid -> (state, pgrp)) and the kernel's figures."""
    for pid, (state, pgrp) in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "stat").write_bytes(b"%d (a b) %s) %s 1 %d %d 0" % (pid, b"x", state, pgrp, pgrp))
    (root / "self").mkdir()
    (root / "sys" / "kernel").mkdir(parents=True)
    (root / "sys" / "kernel" / "ns_last_pid").write_text(f"{last}\n")
    (root / "sys" / "kernel" / "pid_max").write_text(f"{pid_max}\n")
    (root / "stat").write_text(f"cpu 1 2 3\nctxt 9\nprocesses {forks}\nprocs_running 1\n")
    (root / "loadavg").write_text(f"0.00 0.01 0.05 1/{len(processes)} {last}\n")


def test_a_command_that_left_nothing_costs_no_read_of_every_process(monkeypatch, tmp_path):
    """Only the processes holding pids given since the command's are read (a few opened one by
    one, more through one listing): a read of every process's stat cost a busy login node's polls
    15 ms of CPU each at 1,600."""
    old = {pid: (b"S", pid) for pid in range(2, 400)}  # the host's processes, started before
    processes = {**old, 1: (b"S", 1), 1000: (b"Z", 1000), 1003: (b"S", 7), 1005: (b"Z", 1000),
                 32760: (b"S", 32760)}
    _fake_proc(tmp_path, processes, last=1008, forks=5010)
    monkeypatch.setattr(scheduler, "_PROC", str(tmp_path))
    assert scheduler._pid_use() == (5010, len(processes))
    read = []
    read_proc = scheduler._read_proc

    def recording(name):
        read.append(name)
        return read_proc(name)

    monkeypatch.setattr(scheduler, "_read_proc", recording)
    listdir = os.listdir
    listed = []

    def counting_listdir(path="."):
        listed.append(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counting_listdir)
    # The command (1000, a zombie not yet reaped) left a zombie (1005) and nothing else in its group:
    # the 8 pids given since are opened (no listing).
    assert scheduler._listed_alive(1000, (5000, 400)) is False
    assert [name for name in read if name.endswith("/stat")] == [f"{pid}/stat" for pid in range(1001, 1009)]
    assert not listed

    # Wrapped since the command (32700) started: the pids after it and the lowest ones (69 pids,
    # past _OPEN_MAX: listed) are read.
    read.clear()
    (tmp_path / "sys" / "kernel" / "ns_last_pid").write_text("2\n")
    assert scheduler._listed_alive(32700, (5000, 400)) is False
    assert sorted(name for name in read if name.endswith("/stat")) == ["1/stat", "2/stat", "32760/stat"]
    assert listed == [str(tmp_path)]

    # A whole round of pids possible: every process is read, and a member anywhere found.
    read.clear()
    (tmp_path / "sys" / "kernel" / "ns_last_pid").write_text("1008\n")
    (tmp_path / "10" / "stat").write_bytes(b"10 (helper) S 1 1000 1000 0")
    assert scheduler._listed_alive(1000, (5010 - 32468, 400)) is True
    assert len([name for name in read if name.endswith("/stat")]) > 300


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
    """kill_descendants (terminate_processes: psutil.wait_procs) may reap the runner's child before
    Popen.wait does, which then reads an exit 0: a submit a signal ended read as one that succeeded."""
    mark = _mark()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(subprocess_runner, Command(["/bin/sh", "-c", f"echo partial; exec sleep {mark}"],
                                                     timeout=60))
        try:
            _wait_until(lambda: _running(mark), "the command's sleep")
            # What kill_descendants does in the agent's shutdown (psutil's wait reaps them), to this
            # command alone: this process is a pytest worker whose other children are the session's
            # live servers.
            assert terminate_processes(_running(mark), grace_sec=5)
            try:
                result = run.result(timeout=30)
            except SchedulerError as exc:
                assert "its outcome is unknown" in str(exc)
            else:  # the runner read the exit first: the signal's number (Scheduler.run: unknown)
                assert result.returncode < 0, f"a command ended by SIGTERM came back {result}"
        finally:
            _kill(mark)


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal.signal")
def test_an_ignored_sigchld_is_named_and_set_back_to_its_default():
    """SIG_IGN survives exec: ignored by what started the agent, every child is reaped by the
    kernel as it exits and no command's exit status can be read (every poll failed, blamed on
    the agent's shutdown)."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with pytest.raises(SchedulerError, match="ignores SIGCHLD"):
            subprocess_runner(Command(["/bin/sh", "-c", "echo hi; exit 3"], timeout=30))
        assert reset_ignored_sigchld()
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
        result = subprocess_runner(Command(["/bin/sh", "-c", "echo hi; exit 3"], timeout=30))
        assert (result.returncode, result.stdout) == (3, "hi\n")
        assert not reset_ignored_sigchld()
    finally:
        signal.signal(signal.SIGCHLD, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
def test_the_agent_and_the_cli_set_an_inherited_ignored_sigchld_back(tmp_path):
    script = """
import signal, sys
ignored = lambda: signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN
print("inherited", ignored())
from balsam.site.agent import main
main([sys.argv[1]])  # not a site: an error, after the reset
print("agent", ignored())
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
from balsam.cli import main
try:
    main(["queue", "--help"], standalone_mode=False)
except SystemExit:
    pass
print("cli", ignored())
"""
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "no-site")], capture_output=True, text=True,
                         timeout=60, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    lines = [line for line in run.stdout.splitlines() if line.split(" ")[0] in ("inherited", "agent", "cli")]
    assert lines == ["inherited True", "agent False", "cli False"], run.stdout + run.stderr
