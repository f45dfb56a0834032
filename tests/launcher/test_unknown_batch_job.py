"""A launcher whose ``BALSAM_BATCH_JOB_ID`` names no BatchJob of the site says so in one line.

Before: docs/launcher.md's example (``BALSAM_BATCH_JOB_ID=42``) on a site without BatchJob 42 printed
a 33-line traceback ending in ``APIError: POST .../sessions/ failed with HTTP 404: BatchJob 42 not
found at site 2``, with no ``Error:`` line, though start-up problems print one. Now: one
``Error:`` line naming the variable and what to do, exit status 1, no traceback.

Real uvicorn server (SQLite), real ``python -m balsam.launcher`` processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher


@pytest.mark.parametrize("mode", ["serial", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_unknown_batch_job_is_one_error_line(mode, new_site) -> None:
    name, path = new_site(idle_ttl_sec=2)
    proc = start_launcher(path, mode, 1, env={"BALSAM_BATCH_JOB_ID": "424242"})
    console_path = Path(proc.console_path)
    assert finish(proc, timeout=60) == 1, console_path.read_text()
    console = console_path.read_text()
    assert "Traceback" not in console, console
    lines = console.strip().splitlines()
    assert len(lines) == 1, console
    [line] = lines
    assert line.startswith("Error: BALSAM_BATCH_JOB_ID=424242: "), line
    assert "BatchJob 424242 not found" in line and "balsam queue ls" in line and "unset it" in line, line
    assert "HTTP 404" not in line and "/sessions/" not in line, line


def test_the_refusal_is_told_apart_from_other_errors() -> None:
    from balsam.client.rest import APIError
    from balsam.launcher.service_calls import UnknownBatchJob, unknown_batch_job

    refused = APIError("POST", "http://x/sessions/", 404, "BatchJob 42 not found at site 2")
    found = unknown_batch_job(refused, 42)
    assert isinstance(found, UnknownBatchJob) and str(found).startswith("BALSAM_BATCH_JOB_ID=42: ")
    assert unknown_batch_job(APIError("POST", "http://x/sessions/", 404, "Site 2 not found"), 42) is None
    assert unknown_batch_job(APIError("POST", "http://x/sessions/", 500, "BatchJob oops"), 42) is None
    assert unknown_batch_job(refused, None) is None  # no BatchJob asked for: not this refusal
