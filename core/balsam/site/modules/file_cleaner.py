"""The ``file_cleaner`` agent module: delete each finished job's ``cleanup_files``.

Each cycle (``service_period`` seconds) it fetches up to ``cleanup_batch_size`` JOB_FINISHED jobs of
this site with ``pending_file_cleanup`` set, groups them by app, deletes the files matching the app's
``cleanup_files`` glob patterns inside each workdir (never through a symlink to somewhere else: a
matched symlink is removed as a link, its target is kept; a workdir that is, or lies below, a
symlink is not cleaned), and clears ``pending_file_cleanup`` on all of them with one bulk PATCH. A
job with children not yet JOB_FINISHED or FAILED keeps its files and its flag until they are.

A job re-run by its user meanwhile (its files are the new run's): the jobs are asked about once
more, in one request, right before any file is deleted, and those no longer JOB_FINISHED are left
alone; the server ignores a cleared flag for a job that is not JOB_FINISHED (a re-run after the
re-check keeps its flag, and its files are cleaned when it finishes again).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import attrs

from ...options import option
from ...states import JobState
from ..service_client import bulk_patch, is_api_outage, list_all
from ..apps import AppCache
from ..module import AgentModule


@attrs.frozen
class FileCleanerSettings:
    """The ``file_cleaner:`` section of settings.yml."""

    cleanup_batch_size: int = option(180, "Finished jobs whose files are cleaned per cycle.")
    service_period: int = option(30, "Seconds between two clean-up cycles.")

    def validate(self) -> dict[str, str]:
        problems = {}
        for name in ("cleanup_batch_size", "service_period"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        return problems


def glob_pattern_error(pattern: str) -> Optional[str]:
    """Why ``pattern`` is not used (``Path.glob`` refuses it, e.g. ``'**x'`` on Python 3.11; it is
    absolute, or climbs out of the workdir with ``..``), or None. An absolute pattern made
    ``Path.glob`` raise NotImplementedError, which ended every cycle: no job was cleaned again."""
    if pattern.startswith("/") or Path(pattern).is_absolute():
        return "an absolute path: patterns are relative to the job's workdir"
    if ".." in Path(pattern).parts:
        return "'..' would leave the job's workdir"
    try:
        # A directory that does not exist: the pattern is parsed, nothing is listed.
        list(Path("/nonexistent-balsam-glob-check").glob(pattern))
    except (ValueError, NotImplementedError) as exc:
        return str(exc) or type(exc).__name__
    return None


def workdir_link(workdir: Path, data_path: Path) -> Optional[str]:
    """Why ``workdir`` (``data_path / job.workdir``) is not cleaned, or None: it must be the very
    directory its path names below ``data/``. A workdir that is itself a symlink, or lies below
    one (``data/a -> data/b``), is another directory's name: its patterns would delete the files of
    the job that works there (or of anything the link reaches)."""
    try:
        data_root = data_path.resolve()
        root = workdir.resolve()
        relative = PurePosixPath(workdir.relative_to(data_path).as_posix())
    except (OSError, RuntimeError, ValueError) as exc:
        return f"cannot resolve it ({exc})"
    if not relative.parts or ".." in relative.parts or relative.is_absolute():
        return "it is not a directory below data/"
    if root != data_root.joinpath(*relative.parts):
        return f"it is (or lies below) a symlink to {root}"
    return None


def cleanup_workdir(workdir: Path, data_path: Path, patterns: list[str],
                    failures: Optional[list[tuple[Path, OSError]]] = None) -> list[Path]:
    """Delete files under ``workdir`` that match ``patterns`` (already checked with
    :func:`glob_pattern_error` by the caller, once per app); return what was removed. A match that
    cannot be deleted (EACCES, EPERM, EROFS, EIO ...) is appended to ``failures`` with the error
    (one already gone is not: nothing is left to delete).

    Symlinks are never followed to delete something else: a match counts only if its parent
    directory, resolved, is the workdir (resolved once) or below it, so a pattern cannot reach
    another job's files through a directory symlink; a match that is itself a symlink is removed
    as a link (its target is left alone); otherwise only regular files are removed. A workdir
    that is (or lies below) a symlink is not cleaned at all (:func:`workdir_link`).
    """
    removed: list[Path] = []
    if workdir_link(workdir, data_path) is not None:
        return removed
    root = workdir.resolve()
    for pattern in patterns:
        if not pattern or ".." in Path(pattern).parts or Path(pattern).is_absolute():
            continue
        for match in workdir.glob(pattern):
            try:
                parent = match.parent.resolve()
                if parent != root and root not in parent.parents:
                    continue
                mode = match.lstat().st_mode
                if not (stat.S_ISLNK(mode) or stat.S_ISREG(mode)):
                    continue
                match.unlink()
                removed.append(match)
            except FileNotFoundError:
                continue  # gone meanwhile: nothing left to delete
            except OSError as exc:
                if failures is not None:
                    failures.append((match, exc))
                continue
            except RuntimeError:  # a symlink loop while resolving the parent: not a file of the workdir
                continue
    return removed


class FileCleanerModule(AgentModule):
    section = "file_cleaner"
    default_period = 30.0
    period_fields = ("service_period",)
    options_schema = FileCleanerSettings
    section_comment = "Deletes the cleanup_files of finished jobs."
    enabled_by_default = True

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        super().__init__(site_config, config, client)
        self.apps = AppCache(client)
        self._reported: set[tuple[int, str]] = set()
        self._after = 0  # the next cycle lists the jobs after this id (0: from the start)

    #: The jobs a cycle's WARNING about undeletable files names (the others are counted).
    stuck_shown = 3

    def _warn_stuck(self, stuck: list[tuple[Any, int, Path, str]]) -> None:
        if len(stuck) == 1:
            job_id, count, workdir, first = stuck[0]
            self.logger.warning("job %s: %d file(s) matching cleanup_files in %s could not be deleted and are left in "
                                "place (first: %s)", job_id, count, workdir, first)
            return
        shown = "; ".join(f"job {job_id}: {count} in {workdir} (first: {first})"
                          for job_id, count, workdir, first in stuck[:self.stuck_shown])
        more = f"; and {len(stuck) - self.stuck_shown} more jobs" if len(stuck) > self.stuck_shown else ""
        self.logger.warning("%d jobs: %d file(s) matching cleanup_files could not be deleted and are left in place: "
                            "%s%s", len(stuck), sum(count for _id, count, _dir, _first in stuck), shown, more)

    #: Busy children read per request by the children check: each page names at least one busy
    #: parent, which leaves the next request's parent_id filter.
    children_page = 1000

    def _without_busy_children(self, jobs: list[dict], patterns_of: dict[int, list[str]]) -> tuple[list[dict], int]:
        """``jobs`` less those with a child not yet JOB_FINISHED or FAILED, and how many were kept
        back: the children of a DAG read their parents' files (``input.h5`` links,
        ``parent.workdir``); a parent's files are deleted once all its children are done. A job
        kept back keeps its flag.

        Only whether a parent has a busy child matters, not how many: each request asks for a few
        busy children of the parents not yet known busy, and the parents they name are dropped
        from the next one, until none is left. Requests: at most one per busy parent, plus one;
        a parent with 10^5 running children costs one small page, not every child's row."""
        ids = {job["id"] for job in jobs if patterns_of.get(job["app_id"])}
        if not ids:
            return jobs, 0
        busy_states = [state.value for state in JobState if state not in (JobState.finished, JobState.failed)]
        busy: set[int] = set()
        remaining = set(ids)
        while remaining:
            children = list_all(self.client, "/jobs/", {"parent_id": sorted(remaining), "state": busy_states},
                                limit=self.children_page)
            found = {pid for child in children for pid in (child.get("parent_ids") or []) if pid in remaining}
            if not found:
                break  # no busy child left (or rows naming no parent asked about: nothing more to learn)
            busy |= found
            remaining -= found
        if busy:
            self.logger.info("%d finished jobs have children still to finish: their files are kept for now", len(busy))
        return [job for job in jobs if job["id"] not in busy], len(busy)

    def run_cycle(self) -> Optional[float]:
        batch = self.options.cleanup_batch_size
        params: dict[str, Any] = {"site_id": self.site_id, "state": JobState.finished.value, "pending_file_cleanup": "true"}
        if self._after:
            params["id__gt"] = self._after
        jobs = list_all(self.client, "/jobs/", params, limit=batch)
        if not jobs and self._after:
            # Past the end: the next cycle lists from the start again, after the period: the jobs
            # there were kept back (or cleaned) a moment ago; running again at once would list the
            # same kept-back parents for ever without the agent ever waiting.
            self._after = 0
            return None
        if not jobs:
            self.logger.debug("cycle: no finished job waits for cleanup")
            return None
        listed, listed_rows = len(jobs), list(jobs)
        data_path = Path(self.site_config.data_path)
        removed = 0
        patterns_of: dict[int, list[str]] = {}
        kept = 0
        for app_id in sorted({job["app_id"] for job in jobs}):
            try:
                app_cls = self.apps.app_class(app_id)
                patterns = list(getattr(app_cls, "cleanup_files", None) or [])
            except Exception as exc:
                if is_api_outage(exc):
                    # Not "no patterns": the jobs stay pending and the agent loop retries with backoff.
                    raise
                self.logger.warning("app %s: cannot load its cleanup_files: %s", app_id, exc)
                patterns = []
            usable = []
            for pattern in patterns:
                problem = glob_pattern_error(pattern) if isinstance(pattern, str) else "not a string"
                if problem is None:
                    usable.append(pattern)
                elif (app_id, str(pattern)) not in self._reported:
                    # Once per app and pattern; its jobs are still marked clean (with the other
                    # patterns applied) so that they cannot fill every batch and starve other apps.
                    self._reported.add((app_id, str(pattern)))
                    self.logger.error("app %s: cleanup_files pattern %r is invalid (%s): skipped", app_id, pattern, problem)
            patterns_of[app_id] = usable
            if not usable:
                self.logger.debug("app %s: no cleanup_files patterns; its jobs are only marked clean", app_id)
        if any(patterns_of.values()):
            # Loading the apps took time: a job its user re-ran since the list is running again (or
            # about to) in the same workdir, and its files are the new run's. Asked once for the
            # batch, right before deleting. (A re-run that comes even later keeps its flag anyway:
            # the server ignores a cleared flag for a job no longer JOB_FINISHED.)
            still = {row["id"] for row in list_all(
                self.client, "/jobs/", {"id": [job["id"] for job in jobs], "state": JobState.finished.value},
                limit=len(jobs),
            )}
            if len(still) < len(jobs):
                self.logger.info("%d jobs were re-run since they were listed: not cleaned", len(jobs) - len(still))
            jobs = [job for job in jobs if job["id"] in still]
            jobs, kept = self._without_busy_children(jobs, patterns_of)
        # Jobs kept back stay pending and would be listed first again: the next cycle reads on
        # past this batch (then from the start again), so that they cannot hold back the others.
        self._after = max(row["id"] for row in listed_rows) if kept and listed >= batch else 0
        stuck: list[tuple[Any, int, Path, str]] = []  # (job id, files left, workdir, the first one and why)
        for job in jobs:
            patterns = patterns_of.get(job["app_id"])
            if patterns:
                workdir = data_path / job["workdir"]
                why = workdir_link(workdir, data_path)
                if why is not None:
                    self.logger.warning("job %s: workdir %s not cleaned: %s", job["id"], job["workdir"], why)
                    continue
                failures: list[tuple[Path, OSError]] = []
                removed += len(cleanup_workdir(workdir, data_path, patterns, failures))
                if failures:
                    path, exc = failures[0]
                    stuck.append((job["id"], len(failures), workdir,
                                  f"{os.path.relpath(path, workdir)}: {exc.strerror or exc}"))
        if stuck:
            # Their flags are still cleared (a file that cannot be deleted now would be tried, and
            # fail, every cycle): one line for the cycle says what stays, where and why (a line
            # per job was hundreds for a read-only data/). It was silent: "cleaned N finished
            # jobs" while the files stayed on disk.
            self._warn_stuck(stuck)
        cleared = 0
        if jobs:
            refused = bulk_patch(self.client, "/jobs/", [{"id": job["id"], "pending_file_cleanup": False} for job in jobs])
            cleared = len(jobs) - len(refused or [])
        self.logger.info("cleaned %d finished jobs (%d files removed)", len(jobs), removed)
        # At once again only with more to do: a full batch of which some flags were cleared (more
        # may wait), or one all kept back, read on past it (``_after``). A full batch of which
        # nothing changed would be listed the same again: wait the period.
        return 0.0 if listed >= batch and (cleared or self._after) else None
