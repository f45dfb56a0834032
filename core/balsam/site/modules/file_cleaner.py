"""The ``file_cleaner`` agent module: delete each finished job's ``cleanup_files``.

Each cycle (``service_period`` seconds) it fetches up to ``cleanup_batch_size`` JOB_FINISHED jobs of
this site with ``pending_file_cleanup`` set, groups them by app, deletes the files matching the app's
``cleanup_files`` glob patterns inside each workdir (never through a symlink to somewhere else: a
matched symlink is removed as a link, its target is kept), and clears
``pending_file_cleanup`` on all of them with one bulk PATCH.

A job re-run by its user meanwhile (its files are the new run's): the jobs are asked about once
more, in one request, right before any file is deleted, and those no longer JOB_FINISHED are left
alone; the server ignores a cleared flag for a job that is not JOB_FINISHED (a re-run after the
re-check keeps its flag, and its files are cleaned when it finishes again).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Optional

import attrs

from ...options import option
from ...states import JobState
from ..api_util import bulk_patch, is_api_outage, list_all
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
    """Why ``Path.glob`` refuses ``pattern`` (e.g. ``'**x'`` on Python 3.11), or None."""
    try:
        # A directory that does not exist: the pattern is parsed, nothing is listed.
        list(Path("/nonexistent-balsam-glob-check").glob(pattern))
    except ValueError as exc:
        return str(exc)
    return None


def cleanup_workdir(workdir: Path, data_path: Path, patterns: list[str]) -> list[Path]:
    """Delete files under ``workdir`` that match ``patterns`` (already checked with
    :func:`glob_pattern_error` by the caller, once per app); return what was removed.

    Symlinks are never followed to delete something else: a match counts only if its parent
    directory, resolved, is the workdir (resolved once) or below it, so a pattern cannot reach
    another job's files through a directory symlink; a match that is itself a symlink is removed
    as a link (its target is left alone); otherwise only regular files are removed.
    """
    removed: list[Path] = []
    try:
        data_root = data_path.resolve()
        root = workdir.resolve()
    except (OSError, RuntimeError):
        return removed
    if data_root not in root.parents:
        return removed
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
            except (OSError, RuntimeError):
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

    def run_cycle(self) -> Optional[float]:
        batch = self.options.cleanup_batch_size
        jobs = list_all(
            self.client,
            "/jobs/",
            {"site_id": self.site_id, "state": JobState.finished.value, "pending_file_cleanup": "true"},
            limit=batch,
        )
        if not jobs:
            self.logger.debug("cycle: no finished job waits for cleanup")
            return None
        listed = len(jobs)
        data_path = Path(self.site_config.data_path)
        removed = 0
        patterns_of: dict[int, list[str]] = {}
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
        for job in jobs:
            patterns = patterns_of.get(job["app_id"])
            if patterns:
                removed += len(cleanup_workdir(data_path / job["workdir"], data_path, patterns))
        if jobs:
            bulk_patch(self.client, "/jobs/", [{"id": job["id"], "pending_file_cleanup": False} for job in jobs])
        self.logger.info("cleaned %d finished jobs (%d files removed)", len(jobs), removed)
        return 0.0 if listed >= batch else None
