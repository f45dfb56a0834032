"""Helpers of the local queue's tests: a job left running from a state directory, and the queue's
look at the user's processes (LocalQueue._live_wrappers: psutil, every process of the user),
counted (a poll of an idle state directory must not pay for it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

from balsam.builtin import local_queue


def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The state directories scanned from now on, one entry per scan (the scan still runs)."""
    scans: list[Path] = []
    real_scan = local_queue.LocalQueue._live_wrappers

    def counted(self: local_queue.LocalQueue) -> list[tuple[int, int]]:
        scans.append(self.state_dir)
        return real_scan(self)

    monkeypatch.setattr(local_queue.LocalQueue, "_live_wrappers", counted)
    return scans


@contextlib.contextmanager
def running_sleep_job(tmp_path: Path, capsys: Any) -> Iterator[tuple[Path, Path, int, int]]:
    """A job running (``sleep``) submitted from state directory ``tmp_path/lq`` in this process:
    (state dir, script, job id, the wrapper's pid); its process group killed at the end."""
    state = tmp_path / "lq"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nsleep 60\n")
    script.chmod(0o755)
    code = local_queue.main(["--state-dir", str(state), "submit", str(script), "--name", "bj"])
    out, err = capsys.readouterr()
    assert code == 0, err
    job_id = int(out)
    pid = json.loads((state / "jobs.json").read_text())["jobs"][str(job_id)]["pid"]
    try:
        yield state, script, job_id, pid
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)  # its own session and process group (start_new_session)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)  # our child: submit ran in this process
        except ChildProcessError:
            pass
