"""file_cleaner: what it may delete (audit against a real server and site directory).

- A workdir that is itself a symlink (``data/a -> data/b``), or lies below one, names another
  directory: the cleaner resolved it and cleaned whatever the link reached, e.g. the files of the
  job working in ``data/b`` (still running). Such a workdir is not cleaned now (one WARNING).
- A finished parent whose children have not finished yet: its ``cleanup_files`` were deleted while
  its children still had to read them (``input.h5`` links, ``parent.workdir``). It keeps its files
  (and its flag) until every child is JOB_FINISHED or FAILED; a batch full of such parents does not
  hold back the other jobs.
- An absolute pattern in an app's ``cleanup_files`` raised NotImplementedError out of every cycle
  (no job of the site was cleaned again); it is reported once and skipped now, as ``..`` patterns
  are. Symlinks inside the workdir pointing out of it never delete anything outside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from site_test_utils import finish_jobs, job_rows


def _app(site, patterns):
    from balsam.api import ApplicationDefinition

    sid = site.site_id

    class Scratch(ApplicationDefinition):
        site = sid
        command_template = "echo s"
        cleanup_files = patterns

    return Scratch


def _cleaner(site, client, batch=10):
    return FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=batch, service_period=1), client)


def _pending(client, site) -> dict[int, bool]:
    return {row["id"]: row["pending_file_cleanup"] for row in job_rows(client, site_id=site.site_id)}


def test_a_workdir_that_is_a_symlink_to_another_jobs_workdir_is_not_cleaned(make_site, client, caplog) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    data = Path(site.data_path)
    linked, below, running = Job.objects.bulk_create([Job("a", app), Job("link/c", app), Job("b", app)])
    (data / "b").mkdir()
    (data / "b" / "state.tmp").write_text("the running job's checkpoint")
    os.symlink(data / "b", data / "a")  # job a's workdir is a link to job b's
    (data / "other" / "c").mkdir(parents=True)
    (data / "other" / "c" / "x.tmp").write_text("another directory's file")
    os.symlink(data / "other", data / "link")  # job link/c's workdir lies below a link
    finish_jobs(client, site.site_id, [linked.id, below.id])
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.file_cleaner"):
        _cleaner(site, client).run_cycle()
    assert (data / "b" / "state.tmp").exists(), "job b's file was deleted through job a's linked workdir"
    assert (data / "other" / "c" / "x.tmp").exists(), "a file was deleted through a linked parent directory"
    pending = _pending(client, site)
    assert pending[linked.id] is False and pending[below.id] is False  # not retried for ever
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"job {linked.id}: workdir a not cleaned" in w and "symlink" in w for w in warnings), warnings


def test_a_parent_keeps_its_files_until_its_children_are_done(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.h5"])
    data = Path(site.data_path)
    parent = Job.objects.create(workdir="dag/parent", app_id=app)
    child = Job.objects.create(workdir="dag/child", app_id=parent.app_id, parent_ids={parent.id})
    (data / "dag" / "parent").mkdir(parents=True)
    (data / "dag" / "parent" / "out.h5").write_text("the child's input")
    finish_jobs(client, site.site_id, [parent.id])
    assert job_rows(client, id=child.id)[0]["state"] not in ("JOB_FINISHED", "FAILED")
    cleaner = _cleaner(site, client)
    cleaner.run_cycle()
    assert (data / "dag" / "parent" / "out.h5").exists(), "the parent's output was deleted before its child ran"
    assert _pending(client, site)[parent.id] is True
    # The child runs and finishes: now the parent's files go.
    finish_jobs(client, site.site_id, [child.id])
    cleaner.run_cycle()
    cleaner.run_cycle()
    assert not (data / "dag" / "parent" / "out.h5").exists()
    assert _pending(client, site) == {parent.id: False, child.id: False}


def test_parents_kept_back_do_not_hold_back_the_other_jobs(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    data = Path(site.data_path)
    parent = Job.objects.create(workdir="p", app_id=app)
    Job.objects.create(workdir="p-child", app_id=parent.app_id, parent_ids={parent.id})
    other = Job.objects.create(workdir="o", app_id=parent.app_id)
    for job in (parent, other):
        (data / job.workdir).mkdir()
        (data / job.workdir / "a.tmp").write_text("x")
    finish_jobs(client, site.site_id, [parent.id, other.id])
    cleaner = _cleaner(site, client, batch=1)  # the parent (lower id) fills every batch
    for _ in range(3):
        cleaner.run_cycle()
    assert (data / "p" / "a.tmp").exists()
    assert not (data / "o" / "a.tmp").exists(), "the other job was never cleaned"
    assert _pending(client, site)[other.id] is False


def test_patterns_and_links_never_reach_outside_the_workdir(make_site, client, tmp_path, caplog) -> None:
    from balsam.api import Job

    site = make_site()
    data = Path(site.data_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.tmp").write_text("not the site's")
    neighbour = data / "n"
    neighbour.mkdir()
    (neighbour / "keep.tmp").write_text("the neighbour's")
    app = _app(site, ["../n/*.tmp", f"{outside}/*.tmp", "*/*.tmp", "ln.tmp", "**/*.tmp"])
    job = Job.objects.create(workdir="w", app_id=app)
    work = data / "w"
    work.mkdir()
    (work / "mine.tmp").write_text("x")
    os.symlink(outside, work / "out-dir")
    os.symlink(neighbour, work / "n-dir")
    os.symlink(outside / "keep.tmp", work / "ln.tmp")
    finish_jobs(client, site.site_id, [job.id])
    # An absolute pattern made Path.glob raise NotImplementedError: every cycle ended there, and
    # no job of the site was cleaned again. It is reported once and skipped now.
    with caplog.at_level(logging.ERROR, logger="balsam.site.modules.file_cleaner"):
        _cleaner(site, client).run_cycle()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("absolute" in e for e in errors) and any("'..'" in e for e in errors), errors
    assert _pending(client, site)[job.id] is False
    assert (outside / "keep.tmp").exists() and (neighbour / "keep.tmp").exists()
    assert not (work / "mine.tmp").exists() and not os.path.lexists(work / "ln.tmp")  # the link, not its target
    assert (work / "out-dir").is_symlink() and (work / "n-dir").is_symlink()
