"""file_cleaner: a matching file it cannot delete (EPERM, EACCES, EROFS, EIO) was skipped in silence:
the job's flag was cleared and the log said ``cleaned 1 finished jobs (0 files removed)`` while
the files stayed on disk. Now one WARNING names the job, its workdir, how many files stay and why.

The file is made undeletable for real: its directory is immutable (``chattr +i``, which root
cannot bypass either) or, where that flag cannot be set and the tests do not run as root, not
writable (``chmod a-w``: EACCES); skipped where neither holds (root without chattr)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from site_test_utils import finish_jobs, job_rows


def _immutable(directory: Path, on: bool) -> bool:
    if shutil.which("chattr") is not None:
        done = subprocess.run(["chattr", "+i" if on else "-i", str(directory)], capture_output=True)
        if done.returncode == 0:
            return True
    if os.geteuid() == 0:
        return False  # root deletes from a directory it cannot write to
    os.chmod(directory, 0o555 if on else 0o755)
    return True


#: What a file left in an undeletable directory was refused with (chattr +i; chmod a-w).
REFUSALS = ("Operation not permitted", "Permission denied")


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
        pytest.skip("chattr +i is not available here, and root deletes from a read-only directory")
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
    assert any(f"big.tmp: {why}" in warnings[0] for why in REFUSALS), warnings[0]
    # Not tried (and reported) again every cycle: the flag is cleared as for the other job.
    assert {r["id"]: r["pending_file_cleanup"] for r in job_rows(client, site_id=sid)} == {stuck.id: False,
                                                                                         free.id: False}


def test_undeletable_files_of_many_jobs_are_one_warning_for_the_cycle(make_site, client, caplog) -> None:
    """A read-only data/ (or a quota on it) refuses every job's files: one WARNING for the cycle,
    with the count and the first jobs, not one per job (120 jobs wrote 120 lines)."""
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class Scratch(ApplicationDefinition):
        site = sid
        command_template = "echo s"
        cleanup_files = ["*.tmp"]

    jobs = Job.objects.bulk_create([Job(f"ro/{i}", Scratch) for i in range(5)])
    data = Path(site.data_path)
    dirs = [data / "ro" / str(i) for i in range(5)]
    for directory in dirs:
        directory.mkdir(parents=True)
        (directory / "a.tmp").write_text("x")
        (directory / "b.tmp").write_text("x")
    locked = [d for d in dirs if _immutable(d, True)]
    try:
        if len(locked) < len(dirs):
            pytest.skip("chattr +i is not available here, and root deletes from a read-only directory")
        finish_jobs(client, sid, [job.id for job in jobs])
        cleaner = FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=10, service_period=1), client)
        with caplog.at_level(logging.INFO, logger="balsam.site.modules.file_cleaner"):
            cleaner.run_cycle()
    finally:
        for directory in locked:
            _immutable(directory, False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    ordered = sorted(jobs, key=lambda job: job.id)
    assert warnings[0].startswith("5 jobs: 10 file(s) matching cleanup_files could not be deleted and are left in "
                                  f"place: job {ordered[0].id}: 2 in {data}/ro/"), warnings[0]
    assert warnings[0].endswith("; and 2 more jobs") and warnings[0].count("(first: ") == 3, warnings[0]
