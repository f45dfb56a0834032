"""An unsettled release is resent until answered (balsam.launcher.prefetch, "Giving back").

A release whose answers were lost :data:`~balsam.launcher.prefetch.MAX_RELEASE_TRIES` times is
given up so that acquires go on, and its jobs are never started by this launcher (a try may have
been applied). Before: they stayed leased by the launcher's Session, hidden from the elastic queue
and from other launchers, until that Session ended (a whole allocation). Now the same request (same
Idempotency-Key, same ids) is resent in the background until answered; then:

- jobs no try had given back are released (another Session leases them);
- jobs an acquire of this launcher leased again meanwhile (a try had been applied) are not handed
  over; once the release is answered they are given back in a new release (another Session leases
  them);
- jobs of the answered release that a later acquire leases are handed over as usual
  (past the key's lifetime on the server: test_release_resend_expiry).

Real components: a uvicorn server (SQLite, PostgreSQL), the real client and JobLease (heartbeat
thread), the prefetcher's own thread; lost answers are injected around the real client. No timed
assertion: the tests wait for states.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.prefetch import Prefetcher
from launcher_helpers import make_runnable

APPLIED, UNREACHED = "applied", "unreached"


class LostAnswer(Exception):
    status_code = None


class LossyClient:
    """The real client; while ``lose`` is set, a release's answer is lost: after the server applied
    it (APPLIED) or before the request reached it (UNREACHED). Each release posted is recorded."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lose: Optional[str] = None
        self.releases: list[tuple[list[int], str]] = []

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if not path.endswith("/release"):
            return self.client.post(path, json=json, **kw)
        self.releases.append((list(json["job_ids"]), kw.get("idempotency_key", "")))
        lose = self.lose
        if lose == UNREACHED:
            raise LostAnswer("connection reset (the request never reached the server)")
        answer = self.client.post(path, json=json, **kw)
        if lose == APPLIED:
            raise LostAnswer("read timeout (the answer was lost)")
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _prepare(job: Any) -> PreparedJob:
    return PreparedJob(job=job, id=int(job.id), workdir=Path("."), cmdline="true", env={})


class Launcher:
    """A prefetcher on a real lease of ``count`` runnable jobs of a new site; the test acts as the
    serial master's loop thread (take, note_held, give_back)."""

    def __init__(self, count: int) -> None:
        from balsam.api import App, Job, Site
        from balsam.client.default import get_default_client
        from balsam.client.lease import JobLease

        self.client = get_default_client()
        self.site = Site.objects.create(name=f"resend-{uuid.uuid4().hex[:8]}", path=f"/tmp/resend-{uuid.uuid4().hex[:8]}")
        app = App.objects.create(site_id=self.site.id, name="A", serialized_class="x", source_code="x")
        self.ids = sorted(make_runnable(Job(workdir=f"w/{i}", app_id=app.id) for i in range(count)))
        self.lossy = LossyClient(self.client)
        self.lease = JobLease(self.lossy, self.site.id, tick_period=1.0, wrap=Job._from_api, acquire_retry_count=0)
        # floor 1 and no lookahead: it leases only the room the test reports (0: every slot busy).
        self.f = Prefetcher(lambda: self.lease, _prepare, lambda demand: None, None, depth=count,
                            remaining_min=lambda: 60, retry_sec=0.05, floor=1, room=count, release_after_sec=5.0)
        self.others: list[int] = []

    def start_and_take_all(self) -> list[PreparedJob]:
        self.f.start()
        wait_until("the prefetcher leased every job", lambda: self.f.backlog == len(self.ids))
        taken = self.f.take()
        self.f.note_held(len(taken), 0)  # every slot busy: nothing more is leased
        assert sorted(p.id for p in taken) == self.ids
        return taken

    def give_back_and_lose_the_answers(self, taken: list[PreparedJob], how: str) -> None:
        self.lossy.lose = how
        self.f.give_back([(p, self.f.taken_generation) for p in taken])
        wait_until("the release was given up", lambda: self.f.release_given_up)
        assert self.f.release_unknown == self.ids and self.f.backlog == 0
        assert len(self.lossy.releases) == prefetch.MAX_RELEASE_TRIES

    def lease_elsewhere(self, count: int) -> list[int]:
        """One acquire of another Session (another launcher) of this site."""
        if not self.others:
            self.others.append(self.client.post("/sessions/", json={"site_id": self.site.id})["id"])
        return [j["id"] for j in self.client.post(f"/sessions/{self.others[0]}", json={"max_num_jobs": count})]

    def close(self) -> None:
        self.f.join()
        self.lease.close()
        for sid in self.others:
            self.client.delete(f"/sessions/{sid}")


@pytest.fixture
def quick_resend(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first resend after a fraction of a second (5 s in production); raising=False: the tests
    # also run against the code before resends existed, where they fail on the jobs' states.
    monkeypatch.setattr(prefetch, "RELEASE_RESEND_FIRST_SEC", 0.2, raising=False)


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_jobs_of_a_release_that_never_reached_the_server_are_released_once_it_does(
        env: str, request: pytest.FixtureRequest, quick_resend: None) -> None:
    request.getfixturevalue(env)
    launcher = Launcher(3)
    try:
        taken = launcher.start_and_take_all()
        launcher.give_back_and_lose_the_answers(taken, UNREACHED)
        # Stuck: still leased by the launcher's Session, which will not start them.
        assert launcher.lease_elsewhere(3) == []
        launcher.lossy.lose = None  # the server can be reached again
        got: list[int] = []
        wait_until("another launcher leased the given-back jobs",
                   lambda: got.extend(launcher.lease_elsewhere(3)) or sorted(got) == launcher.ids)
        assert launcher.f.release_unknown == [] and launcher.f.released == 3 and launcher.f.backlog == 0
        # Resent with the first try's key and ids.
        first = launcher.lossy.releases[0]
        assert all(release == first for release in launcher.lossy.releases) and first[0] == launcher.ids
    finally:
        launcher.close()


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_jobs_leased_again_before_the_answer_are_given_back_once_it_comes(
        env: str, request: pytest.FixtureRequest, quick_resend: None) -> None:
    request.getfixturevalue(env)
    launcher = Launcher(3)
    f = launcher.f
    try:
        taken = launcher.start_and_take_all()
        launcher.give_back_and_lose_the_answers(taken, APPLIED)  # the first try freed them
        launcher.lossy.lose = UNREACHED  # the server out of reach for a while
        first_key = launcher.lossy.releases[0][1]
        # Slots free: this launcher leases them again; not handed over (a try may still be in flight).
        f.note_held(0, 3)
        wait_until("the jobs were leased again", lambda: f.acquired == 6)
        f.note_held(0, 0)
        assert f.backlog == 0 and f.take() == [] and f.release_unknown == launcher.ids
        launcher.lossy.lose = None
        got: list[int] = []
        wait_until("another launcher leased the jobs leased again",
                   lambda: got.extend(launcher.lease_elsewhere(3)) or sorted(got) == launcher.ids)
        wait_until("every release was answered", lambda: f.release_unknown == [])
        assert f.backlog == 0 and f.take() == []
        # The resend was replayed (same key and ids); the jobs leased again went in a new release.
        keys = [key for _ids, key in launcher.lossy.releases]
        assert keys.count(first_key) > prefetch.MAX_RELEASE_TRIES and keys[-1] != first_key
        assert all(ids == launcher.ids for ids, _key in launcher.lossy.releases)
    finally:
        launcher.close()


def test_a_job_of_an_answered_release_leased_again_is_handed_over(balsam_env: Any, quick_resend: None) -> None:
    launcher = Launcher(3)
    f = launcher.f
    try:
        taken = launcher.start_and_take_all()
        launcher.give_back_and_lose_the_answers(taken, UNREACHED)
        launcher.lossy.lose = None
        wait_until("the release was answered", lambda: f.release_unknown == [])
        assert f.released == 3
        f.note_held(0, 3)  # slots free: this launcher leases them again, and starts them
        wait_until("the jobs were handed over", lambda: f.backlog == 3)
        assert sorted(p.id for p in f.take()) == launcher.ids
    finally:
        launcher.close()
