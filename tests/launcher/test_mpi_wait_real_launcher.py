"""mpi mode's waiting acquire (``Prefer: wait``) with a real server and a real ``python -m
balsam.launcher -j mpi``: a job created after the launcher found the backlog empty is leased when it
is created, not ``delay_sec`` later (test_mpi_wait_acquire.py has the loop's cases)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, make_site, start_launcher
from launcher_helpers import make_runnable, wait_for_states

#: Against hangs only (the job runs in well under a second; without a waiting acquire, after 600 s).
WAIT_SEC = 60.0


@pytest.mark.slow
@pytest.mark.mpi
def test_real_launcher_leases_a_job_created_after_the_empty_answer_without_delay_sec(balsam_env: Any, tmp_path: Path) -> None:
    """``delay_sec`` 600 s: a job created after the launcher's first empty answer runs at once only
    if its acquire waits in the server (else it would run ten minutes later, past the guard)."""
    from balsam.api import ApplicationDefinition

    name = f"site-{uuid.uuid4().hex[:8]}"
    path = make_site(tmp_path / name, name, {"idle_ttl_sec": 300, "delay_sec": 600},
                     logging={"level": "DEBUG", "buffer_num_records": 0})

    class Quick(ApplicationDefinition):
        site = name
        command_template = "true"

    Quick.sync()
    proc = start_launcher(path, "mpi", 10)
    try:
        # The first acquire's empty answer (the mpi mode's debug line, written at once here).
        deadline = time.monotonic() + WAIT_SEC
        while "acquired 0 jobs" not in _mode_log(path):
            assert proc.poll() is None, _console(proc)
            assert time.monotonic() < deadline, f"no empty answer logged:\n{_mode_log(path)[-3000:]}"
            time.sleep(0.1)
        ids = make_runnable([Quick.submit(workdir="w/0", save=False)])
        wait_for_states(ids, {"RUN_DONE"}, timeout=WAIT_SEC)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, _console(proc)
    assert "asked to wait up to" in _mode_log(path), _mode_log(path)[-3000:]


def _mode_log(site: Path) -> str:
    return "".join(p.read_text() for p in (site / "log").glob("mpi_mode_*.log"))


def _console(proc: Any) -> str:
    return Path(proc.console_path).read_text()[-3000:]
