"""A release resent past its Idempotency-Key's lifetime on the server (``BALSAM_IDEMPOTENCY_TTL_SEC``,
24 h by default, maybe less than an allocation) is applied anew, not replayed. Safe: of its ids the
launcher's Session holds only jobs it never starts (the release's own, and those an acquire leased
again meanwhile, which the new application frees); nothing runs twice and nothing stays hidden.
A server whose keys live 1 s (balsam.launcher.prefetch, "Giving back"; test_release_resend)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from launcher_helpers import SESSION_EXPIRE_SEC
from test_release_resend import APPLIED, UNREACHED, Launcher, quick_resend, wait_until  # noqa: F401

KEY_TTL_SEC = 1


@pytest.fixture(scope="module")
def _short_key_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_IDEMPOTENCY_TTL_SEC": str(KEY_TTL_SEC),
                                    "BALSAM_SESSION_EXPIRE_SEC": str(SESSION_EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_short_key_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _short_key_server
    return _short_key_server.url


def _leased_again_behind_an_unanswered_release(launcher: Launcher) -> None:
    """The launcher takes its jobs and gives them back: the first try frees them but its answers
    are lost, and its resends do not reach the server (until the key expired) while its slots are
    free, so it leases them again."""
    f = launcher.f
    taken = launcher.start_and_take_all()
    launcher.give_back_and_lose_the_answers(taken, APPLIED)  # the first try freed them
    launcher.lossy.lose = UNREACHED  # the resends do not reach the server until the key expired
    f.note_held(0, 3)  # slots free: this launcher leases them again (not handed over)
    wait_until("the jobs were leased again", lambda: f.acquired == 6)


def test_a_resend_after_the_key_expired_is_applied_anew_and_loses_nothing(balsam_env: Any, quick_resend: None) -> None:
    launcher = Launcher(3)
    f = launcher.f
    try:
        _leased_again_behind_an_unanswered_release(launcher)
        f.note_held(0, 0)
        time.sleep(KEY_TTL_SEC + 0.5)  # the key expires: the resend is applied anew
        launcher.lossy.lose = None
        got: list[int] = []
        wait_until("another launcher leased the jobs",
                   lambda: got.extend(launcher.lease_elsewhere(3)) or sorted(got) == launcher.ids)
        wait_until("every release was answered", lambda: f.release_unknown == [])
        assert f.backlog == 0 and f.take() == []
        # The resend (the first key, expired) freed the jobs leased again: applied anew, it named
        # jobs this launcher held and never started; their new release then found none held.
        assert f.released == 3 and launcher.lossy.releases[-1][1] != launcher.lossy.releases[0][1]
    finally:
        launcher.close()


def test_jobs_leased_again_are_started_once_an_expired_resend_freed_them(balsam_env: Any, quick_resend: None) -> None:
    """Slots free after the answer, no other launcher: the resend (key expired) frees the jobs
    leased again meanwhile; their new release goes out before any acquire (it finds them free), and
    the next acquire leases them and hands them over. Before, an acquire went first, leased them
    again, parked them, and their new release freed them again: a release and an acquire every
    retry_sec, under a new key each time, the jobs never started anywhere."""
    launcher = Launcher(3)
    f = launcher.f
    try:
        _leased_again_behind_an_unanswered_release(launcher)
        time.sleep(KEY_TTL_SEC + 0.5)  # the key expires: the resend is applied anew
        launcher.lossy.lose = None
        handed: list[int] = []

        def hand_over() -> bool:
            handed.extend(p.id for p in f.take())
            f.note_held(0, 3)  # the slots stay free: the loop starts what it takes
            return sorted(handed) == launcher.ids

        wait_until("the jobs were handed over", hand_over)
        assert f.release_unknown == [] and not f._unsettled and not f._parked
        # Two requests only: the first (resent under its expired key, applied anew) and one new
        # release of the jobs leased again, which found them free.
        keys = [key for _ids, key in launcher.lossy.releases]
        assert len(set(keys)) == 2 and keys[-1] != keys[0] and keys.count(keys[-1]) == 1
        assert f.released == 3
    finally:
        launcher.close()
