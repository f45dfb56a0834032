"""Launcher test fixtures: a live server with a short session expiry and per-test sites.

``live_server`` is overridden for this folder so that the shared ``balsam_env`` fixture (a fresh
user with its login file) points at a server whose sessions expire after 4 s without a heartbeat:
the lease-loss tests need expiry to happen within a test.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import make_site  # noqa: E402

SESSION_EXPIRE_SEC = 4


@pytest.fixture(scope="session")
def _launcher_live_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": str(SESSION_EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_launcher_live_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _launcher_live_server
    return _launcher_live_server.url


@pytest.fixture
def new_site(balsam_env: Any, tmp_path: Path) -> Callable[..., tuple[str, Path]]:
    """``new_site(**launcher_settings) -> (site_name, site_path)`` registered as the test's user."""

    def factory(**launcher: Any) -> tuple[str, Path]:
        name = f"site-{uuid.uuid4().hex[:8]}"
        return name, make_site(tmp_path / name, name, launcher)

    return factory


def make_runnable(jobs: Iterable[Any]) -> list[int]:
    """Create jobs and move them to PREPROCESSED, as the processing module's default preprocess does."""
    from balsam.api import Job

    created = Job.objects.bulk_create(list(jobs))
    ids = [j.id for j in created]
    Job.objects.filter(id=ids).update(state="PREPROCESSED")
    return ids


def wait_for_states(ids: list[int], states: set[str], timeout: float = 60.0) -> dict[int, Any]:
    """Poll until every job is in one of ``states``; return {id: Job}."""
    from balsam.api import Job

    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for j in Job.objects.filter(id=ids)}
        if all(str(j.state) in states for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        if time.monotonic() > deadline:
            summary = {i: str(j.state) for i, j in jobs.items()}
            raise AssertionError(f"jobs not in {sorted(states)} after {timeout} s: {summary}")
        time.sleep(0.2)


def events_of(ids: list[int]) -> dict[int, list[Any]]:
    """Each job's EventLog rows, oldest first."""
    from balsam.api import EventLog

    by_job: dict[int, list[Any]] = {i: [] for i in ids}
    for event in EventLog.objects.filter(job_id=ids):
        by_job[event.job_id].append(event)
    for rows in by_job.values():
        rows.sort(key=lambda e: (e.timestamp, e.id))
    return by_job
