"""The local queue (the default scheduler of every local site) with a state directory it cannot make,
or cannot write or read (docs/reliability.md, "When the disk is full").

- ``submit`` whose ``--state-dir`` did not exist yet, on a full disk: a Python traceback and exit
  status 1, which the local scheduler took for a failed try (3, and the BatchJob was
  ``submit_failed``). Now one line naming the directory, exit status ``EXIT_NO_ROOM`` (3), which the
  scheduler reads as ``SchedulerError(no_room=True)``: the agent waits for room. So too a batch
  script's ``.output`` file with no room.
- ``status``, ``history``, ``find`` and ``delete`` made the missing directory (and its lock file)
  first, and failed the same way: a directory without records has no jobs, and is now answered so
  without writing anything.
- A state directory that cannot be written or read (permission denied): a traceback; now one line
  naming the file, exit status 1 (tried again, not refused for good, not "no room").

Real components: the queue command in a fresh interpreter, as the local scheduler runs it, on a real
full tmpfs (no free inode; mounted as root, else skipped) and on real directories without
permission (as root, with CAP_DAC_OVERRIDE dropped by ``setpriv``; else skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from balsam.builtin import local_queue
from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import SchedulerError, SubmitRequest
from full_tmpfs import FullTmpfs, mounted_tmpfs  # tests/full_tmpfs.py

#: Root without the capabilities that let it ignore file permissions (as any user is).
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"]


def queue_cli(state_dir: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m balsam.builtin.local_queue --state-dir DIR ARGS`` in a fresh interpreter (this
    test's PYTHONPATH: the tree under test), as the local scheduler runs it."""
    return subprocess.run([*prefix, sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", str(state_dir),
                           *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def script_in(folder: Path, marker: Path) -> Path:
    script = folder / "job.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def full(tmp_path: Path) -> Iterator[FullTmpfs]:
    with mounted_tmpfs(tmp_path / "full", nr_inodes=32) as tmpfs:
        yield tmpfs


def test_submit_to_a_missing_state_dir_on_a_full_disk_waits_for_room(tmp_path: Path, full: FullTmpfs) -> None:
    """Before: ``OSError: [Errno 28] No space left on device: '.../lq'`` (a traceback), exit status 1."""
    marker = tmp_path / "ran.txt"
    script = script_in(tmp_path, marker)
    state = full.path / "lq"
    full.fill()
    result = queue_cli(state, "submit", str(script), "--name", "bj")
    assert result.returncode == local_queue.EXIT_NO_ROOM, result.stderr
    assert one_line(result) == f"local queue: cannot create the state directory {state}: No space left on device"
    assert not state.exists() and not marker.exists() and not result.stdout

    # The local scheduler, its own command through its own runner: "no room", not a failed try.
    driver = LocalScheduler(state_dir=state)
    request = SubmitRequest(script_path=script, project="local", queue="local", num_nodes=1, wall_time_min=1,
                            job_name="bj")
    with pytest.raises(SchedulerError) as info:
        driver.submit(request)
    assert info.value.no_room is True and info.value.permanent is False
    assert str(state) in str(info.value)

    # The commands that only read answer "no jobs" and make nothing (they made the directory and
    # its lock file, and failed the same way).
    assert json.loads(queue_cli(state, "status").stdout) == {}
    assert json.loads(queue_cli(state, "history", "5").stdout) == {"5": None}
    assert json.loads(queue_cli(state, "find", str(script), "--name", "bj").stdout) == []
    deleted = queue_cli(state, "delete", "5")
    assert deleted.returncode == 2 and one_line(deleted) == f"local queue: no local job 5 (no records in {state})"
    assert driver.get_statuses() == {} and driver.find_submitted(request) == []
    assert not state.exists()

    full.make_room()  # the same submit works once there is room
    submitted = queue_cli(state, "submit", str(script), "--name", "bj")
    assert submitted.returncode == 0 and submitted.stdout.strip().isdecimal(), submitted.stderr


def test_an_empty_state_dir_or_a_scripts_output_with_no_room(tmp_path: Path, full: FullTmpfs) -> None:
    """A state directory made before the disk filled, without its ``jobs`` folder, lock or records;
    and a batch script whose ``.output`` file has no room (before: a traceback, exit status 1)."""
    marker = tmp_path / "ran.txt"
    state = full.path / "lq"
    state.mkdir()
    scripts = full.path / "qsubmit"
    scripts.mkdir()
    in_full = script_in(scripts, marker)
    full.fill()
    result = queue_cli(state, "submit", str(script_in(tmp_path, marker)))
    assert result.returncode == local_queue.EXIT_NO_ROOM
    assert one_line(result) == f"local queue: cannot create the state directory {state / 'jobs'}: No space left on device"
    status = queue_cli(state, "status")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stderr

    elsewhere = tmp_path / "lq"
    result = queue_cli(elsewhere, "submit", str(in_full))
    assert result.returncode == local_queue.EXIT_NO_ROOM
    line = one_line(result)
    assert line.startswith(f"local queue: cannot open {in_full}.output: No space left on device; job ")
    assert line.endswith(" not started")
    assert json.loads(queue_cli(elsewhere, "status").stdout) == {} and not marker.exists()


@pytest.fixture
def unprivileged() -> tuple[str, ...]:
    """The command prefix that makes file permissions hold for the queue command."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None or subprocess.run([*DROP_DAC, "true"], capture_output=True).returncode != 0:
        pytest.skip("root here, and cannot drop CAP_DAC_OVERRIDE")
    return tuple(DROP_DAC)


#: Runs each command line (a JSON list of argv lists) through the queue's entry point in this one
#: interpreter, printing [[exit status, stderr], ...]: one interpreter start for all of them.
RUN_EACH = """
import contextlib, io, json, sys
from balsam.builtin import local_queue
answers = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = local_queue.main(argv)
        except BaseException as exc:  # what the command line would show as a traceback
            code, err = 1, io.StringIO("Traceback (most recent call last):\\n" + repr(exc) + "\\n")
    answers.append([code, err.getvalue()])
print(json.dumps(answers))
"""


def test_a_state_dir_without_permission_is_one_line(tmp_path: Path, unprivileged: tuple[str, ...]) -> None:
    """Each command with a state directory it may not make, write or read: one line naming it, exit
    status 1. Before: a traceback (``PermissionError: [Errno 13] ...``) for every one of them."""
    script = script_in(tmp_path, tmp_path / "ran.txt")
    locked = tmp_path / "locked"
    (locked / "records" / "jobs").mkdir(parents=True)
    (locked / "records" / "jobs.json").write_text(json.dumps({"jobs": {}, "next_id": 5}))
    unreadable = tmp_path / "unreadable"
    (unreadable / "jobs").mkdir(parents=True)
    (unreadable / "jobs.json").write_text(json.dumps({"jobs": {}, "next_id": 5}))
    (unreadable / "jobs.json").chmod(0)
    (unreadable / "jobs.json.lock").touch()
    commands = [("submit", str(script)), ("status",), ("history", "5"), ("delete", "5"),
                ("find", str(script), "--name", "bj")]
    expected = [(locked / "missing", "submit", f"cannot create the state directory {locked / 'missing'}")]
    expected += [(locked / "records", args[0], f"cannot open {locked / 'records' / 'jobs.json.lock'}") for args in commands]
    expected += [(unreadable, args[0], f"cannot read {unreadable / 'jobs.json'}") for args in commands]
    argvs = [["--state-dir", str(state), *next(a for a in commands if a[0] == command)] for state, command, _ in expected]
    for folder in (locked / "records", locked):
        folder.chmod(0o555)
    try:
        ran = subprocess.run([*unprivileged, sys.executable, "-c", RUN_EACH, json.dumps(argvs)], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        for folder in (locked / "records", locked):
            folder.chmod(0o755)
    assert ran.returncode == 0, ran.stderr
    for (state, command, says), (code, stderr) in zip(expected, json.loads(ran.stdout)):
        assert code == 1 and stderr.splitlines() == [f"local queue: {says}: Permission denied"], (state, command, stderr)
    assert not (tmp_path / "ran.txt").exists()
