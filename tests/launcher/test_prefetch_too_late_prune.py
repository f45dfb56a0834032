"""A job the prefetcher holds back as too late (balsam.launcher.prefetch, "Giving back") that the same
Session leases again is no longer given back under its id.

While giving back is given up, the jobs :meth:`Prefetcher.take` holds back as too long for the time
left wait in :attr:`Prefetcher.too_late`, leased and never started, until giving back resumes. The
server can hand the same Session the same job again meanwhile: its user re-queues it (a user's state
change of a leased job ends the lease; the mark that keeps it from acquires, ``released_from_session_id``,
is cleared by the Session's heartbeats that do not list it, and the held-jobs report never lists
the prefetcher's held-back jobs), lowering its wall time so that it fits the time left, and the
next acquire of this Session leases it. Before: the resumed release named the id all the same and
freed the new copy, which the loop had taken to start: another launcher leased it too (run twice).
And two copies of one id held back gave the second one acquire number 0 ("not numbered"; after a
lost Session: dropped as that Session's, kept leased).

Real server (SQLite, PostgreSQL), real client and JobLease, the prefetcher's own thread (the test
acts as the serial master's loop thread; test_release_resend's harness, test_giveback_resume's
injected losses); the copies on their own: the prefetcher without its thread
(test_prefetch_release_units). No timed assertion: the tests wait for states.
"""

from __future__ import annotations

from typing import Any

import pytest

from launcher_helpers import make_runnable
from test_giveback_resume import _give_up, quick  # noqa: F401
from test_prefetch_release_units import Lease, clock, fetcher, prepared  # noqa: F401
from test_release_resend import UNREACHED, Launcher, wait_until


def _new_job(launcher: Launcher, wall_time_min: int) -> int:
    from balsam.api import App, Job

    app = App.objects.get(site_id=launcher.site.id, name="A")
    return make_runnable([Job(workdir="late/0", app_id=app.id, wall_time_min=wall_time_min)])[0]


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_a_held_back_job_leased_again_by_the_same_session_is_not_given_back_under_its_id(
        env: str, request: pytest.FixtureRequest, quick: None) -> None:  # noqa: F811
    from balsam.api import Job

    request.getfixturevalue(env)
    launcher = Launcher(1)
    f = launcher.f
    left = [60]
    f._remaining_min = lambda: left[0]
    try:
        taken = launcher.start_and_take_all()
        # Giving back is given up, and stays so while the server is out of reach for releases.
        _give_up(launcher, taken, UNREACHED)
        late = _new_job(launcher, 30)
        f.note_held(0, 1)  # a slot frees: the job (30 min of the 60 left) is leased ahead
        wait_until("the 30 min job was leased", lambda: f.backlog == 1)
        left[0] = 20
        assert f.take() == [] and [p.id for p in f.too_late] == [late]  # held back, kept leased (given up)

        # Its user re-queues it with a shorter wall time: the lease ends, and once the Session's
        # heartbeats (which do not list it) have cleared the mark, this Session's acquire leases it again.
        Job.objects.filter(id=[late]).update(state="RESTART_READY", wall_time_min=10)
        wait_until("the same session leased the re-queued job again", lambda: f.backlog == 1)
        new = f.take()
        assert [p.id for p in new] == [late]  # the new copy fits the time left: the loop starts it
        f.note_held(1, 0)

        launcher.lossy.lose = None  # the server answers releases again: giving back resumes
        wait_until("giving back resumed", lambda: f.may_give_back)
        assert f.too_late == [] and not f._releasing
        # The old copy was not given back: no release named the id, and the new copy is still this
        # Session's (no other launcher can lease it while this one starts it).
        assert [ids for ids, _key in launcher.lossy.releases if late in ids] == []
        assert late not in launcher.lease_elsewhere(10)
    finally:
        launcher.close()


def test_an_acquire_that_leases_a_held_back_job_again_drops_the_old_copy(clock: list[float]) -> None:  # noqa: F811
    """The prefetch thread's check after an acquire: held back (given up), and queued, never sent."""
    lease = Lease()
    f = fetcher(lease)
    f.release_given_up = True
    f._resume_at = float("inf")
    with f._lock:
        f._set_too_late([(prepared(3), 1), (prepared(4), 1)])
        f._releasing.append((prepared(5), 1, True))
    f._drop_leased_again([prepared(3), prepared(5)])
    assert [p.id for p in f.too_late] == [4] and f._too_late_generations == {4: 1} and f._releasing == []


def test_a_held_back_job_whose_new_copy_reaches_the_loop_first_is_dropped(clock: list[float]) -> None:  # noqa: F811
    """Leased again after the prefetch thread's check: the loop's take of the new copy drops the
    old one (in too_late), and of two copies in one take only the newest counts."""
    lease = Lease()
    f = fetcher(lease)
    f.release_given_up = True
    f._resume_at = float("inf")
    left = [60]
    f._remaining_min = lambda: left[0]

    def hand_over(job_id: int, wall: int, generation: int) -> Any:
        p = prepared(job_id)
        p.job.wall_time_min = wall
        with f._lock:
            f._ready.append(p)
            f._ready_generations.append(generation)
        return p

    hand_over(3, 30, 1)
    left[0] = 20
    assert f.take() == [] and [p.id for p in f.too_late] == [3]
    new = hand_over(3, 10, 2)
    assert f.take() == [new] and f.too_late == [] and f._too_late_generations == {}
    # One take with both copies: the older too late, the newer fits; only the newer goes on.
    old = hand_over(7, 30, 3)
    newer = hand_over(7, 10, 4)
    assert f.take() == [newer] and f.too_late == []
    # Both too late: one copy held back, with the newest acquire number.
    hand_over(8, 30, 5)
    last = hand_over(8, 30, 6)
    assert f.take() == [] and f.too_late == [last] and f._too_late_generations == {8: 6}
    assert old is not newer


def test_each_held_back_copy_keeps_its_own_acquire_number_at_the_resumption(clock: list[float]) -> None:  # noqa: F811
    """Two copies of one id held back by two takes (the second leased again after the first was held
    back) are one: the newest, with its number; before, both were queued at the resumption, the
    second as acquire number 0 ("not numbered": after a lost Session, dropped as that Session's)."""
    lease = Lease()
    f = fetcher(lease)
    f.release_given_up = True
    f._resume_at = float("inf")
    f._remaining_min = lambda: 20
    for generation in (2, 3):
        p = prepared(9)
        p.job.wall_time_min = 30
        with f._lock:
            f._ready.append(p)
            f._ready_generations.append(generation)
        assert f.take() == []
    lease.lost_generation = 2  # acquire 2's Session was lost; acquire 3's copy is held by the new one
    f._resume_at = 0.0
    f._resume_release()
    assert [(p.id, g, late) for p, g, late in f._releasing] == [(9, 3, True)]
    f._send_release()
    assert [json["job_ids"] for path, json, _key in lease.client.posts if path.endswith("/release")] == [[9]]
