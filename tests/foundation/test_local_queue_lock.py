"""The local queue's lock (``QueueLock``: an flock on ``jobs.json.lock``), which replaced the filelock
package in the queue command that the site agent runs every ``sync_period``.

It must exclude the same holders as before (a process holding the lock through filelock, as tests
and an older balsam do), say which file when it waits too long (filelock raised a bare ``Timeout``
traceback), and not be inherited by the batch job started while it is held (a job holding the lock
for its whole run would stop every later queue command).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from balsam.builtin.local_queue import LocalQueue, QueueError, QueueLock


def _queue_command(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_lock_held_through_filelock_is_waited_for_then_named(tmp_path):
    queue = LocalQueue(tmp_path / "state")
    with FileLock(str(queue.state_dir / "jobs.json.lock")):
        lock = QueueLock(queue.state_dir / "jobs.json.lock", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(QueueError) as info:
            with lock:
                pass
        assert time.monotonic() - started >= 0.3
    assert str(info.value) == (f"{queue.state_dir / 'jobs.json.lock'} is held by another queue command "
                               "for more than 0.3 s")
    with lock:  # released by the other holder: taken at once
        pass


def test_the_queue_command_waits_for_the_lock_and_answers_once_it_is_free(tmp_path):
    state = tmp_path / "state"
    LocalQueue(state)
    holder = FileLock(str(state / "jobs.json.lock"))
    holder.acquire()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", str(state),
                                 "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting for the lock
    finally:
        holder.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == {}


def test_the_batch_job_does_not_inherit_the_lock(tmp_path):
    state = tmp_path / "state"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 30\n")
    script.chmod(0o755)
    submitted = _queue_command(state, "submit", str(script), "--walltime", "1")
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout)
    try:
        # The job runs (it was started while the submit held the lock): the lock is free.
        with QueueLock(state / "jobs.json.lock", timeout=0.5):
            pass
        status = _queue_command(state, "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[str(job_id)]["state"] == "running"
    finally:
        _queue_command(state, "delete", str(job_id))
