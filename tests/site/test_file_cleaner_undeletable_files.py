"""file_cleaner: a matching file it cannot delete (EPERM, EACCES, EROFS, EIO) was skipped in silence:
the job's flag was cleared and the log said ``cleaned 1 finished jobs (0 files removed)`` while
the files stayed on disk. Now one WARNING names the job, its workdir, how many files stay and why.

The file is made undeletable for real: its directory is immutable (``chattr +i``, which root
cannot bypass either); skipped where the file system or the user cannot set that flag."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from site_test_utils import finish_jobs, job_rows


def _immutable(directory: Path, on: bool) -> bool:
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i" if on else "-i", str(directory)], capture_output=True)
    return done.returncode == 0


def test_a_file_that_cannot_be_deleted_is_reported_with_its_job_and_workdir(make_site, client, caplog) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class Scratch(ApplicationDefinition):
        site = sid
        command_template = "echo s"
        cleanup_files = ["*.tmp"]

    stuck, free = Job.objects.bulk_create([Job("keep/stuck", Scratch), Job("keep/free", Scratch)])
    data = Path(site.data_path)
    for name in ("stuck", "free"):
        (data / "keep" / name).mkdir(parents=True)
        (data / "keep" / name / "big.tmp").write_text("scratch")
    locked = data / "keep" / "stuck"
    if not _immutable(locked, True):
        pytest.skip("chattr +i is not available here")
    try:
        finish_jobs(client, sid, [stuck.id, free.id])
        cleaner = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)
        with caplog.at_level(logging.INFO, logger="balsam.site.modules.file_cleaner"):
            cleaner.run_cycle()
    finally:
        _immutable(locked, False)
    assert (locked / "big.tmp").exists()
    assert not (data / "keep" / "free" / "big.tmp").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"job {stuck.id}: 1 file(s) matching cleanup_files in {locked} could not be deleted" in warnings[0]
    assert "big.tmp: Operation not permitted" in warnings[0]
    # Not tried (and reported) again every cycle: the flag is cleared as for the other job.
    assert {r["id"]: r["pending_file_cleanup"] for r in job_rows(client, site_id=sid)} == {stuck.id: False,
                                                                                         free.id: False}
