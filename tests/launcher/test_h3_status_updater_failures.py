"""The status updater's failures against a real server: a ``Retry-After`` (429, 503) of the server
or of a proxy before it is honoured; an answer lost after the server applied the call; a call
the server refuses for one of its jobs.

Before, every PATCH was one try and the updater's own loop retried it after 0.5 s, 1 s, 2 s ...
whatever the answer asked: a server (or a rate-limiting proxy) that answered ``429 Retry-After: 2``
had the same PATCH again after 0.5 s, from every launcher at once, and the updates put meanwhile
went in a PATCH of their own beside the retry.

Real components: a uvicorn server (SQLite) behind a small HTTP proxy (tests/failure_proxy.py) that answers the first
``PATCH /jobs/`` with 429 (nothing forwarded) or forwards it and answers 503 (applied, its answer
lost: a cut commit); the real RESTClient and BulkStatusUpdater.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from balsam.client import status_updater
from balsam.client.rest import RESTClient
from balsam.client.status_updater import BulkStatusUpdater
from failure_proxy import FailureProxy, job_maker, job_moves, wait_until  # tests/failure_proxy.py

LOGGER = "balsam.client.status_updater"


def seconds(value: str) -> Callable[[], str]:
    return lambda: value


def date_in(sec: int) -> Callable[[], str]:
    """An HTTP-date ``sec`` whole seconds after the second the answer is made in."""
    return lambda: email.utils.formatdate(int(time.time()) + sec, usegmt=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    """The test's user on a real server, on SQLite and on PostgreSQL (the idempotent replay of a
    resent call differs between them: docs in balsam.server.idempotency)."""
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def proxy(env: Any) -> Iterator[FailureProxy]:
    throttling = FailureProxy(env.url)
    yield throttling
    throttling.close()


@pytest.fixture
def jobs(env: Any, tmp_path: Path) -> Callable[..., list[int]]:
    """``jobs(n)``: ids of ``n`` new jobs of the test user (failure_proxy.job_maker)."""
    return job_maker(env, tmp_path, "h3")


#: The updater's own backoff in the tests that wait on it (0.5 s doubling to 10 s in production):
#: a tenth, so that a call failing 4 or 5 times costs a second, not 8-16 s. Still a real wait that
#: doubles at each failure (0.1, 0.2, 0.4, 0.8, 1.0), printed exactly by "retrying in %.1f s", and far
#: above a local PATCH (milliseconds): the order of side calls and retries is the one of production.
FAST_BACKOFF_FIRST_SEC = 0.1
FAST_BACKOFF_MAX_SEC = 1.0


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The updater's own backoff cut to ``FAST_BACKOFF_*`` (read by the updater at each failure)."""
    monkeypatch.setattr(status_updater, "BACKOFF_FIRST_SEC", FAST_BACKOFF_FIRST_SEC)
    monkeypatch.setattr(status_updater, "BACKOFF_MAX_SEC", FAST_BACKOFF_MAX_SEC)


def _states(env: Any, ids: list[int]) -> list[str]:
    client = RESTClient(env.url, env.token)
    by_id = {job.id: job.state.value for job in client.Job.objects.filter(id=ids)}
    return [by_id[i] for i in ids]


# 1 s asked (an HTTP-date: 1-2 s, whole seconds), here and in the 503 and close tests below: twice
# the 0.5 s after which the old loop resent whatever was asked, so a retry sooner still fails them.
@pytest.mark.parametrize("retry_after", [seconds("1"), date_in(2)], ids=["delay-seconds", "http-date"])
def test_a_429_is_retried_no_sooner_than_it_asks_with_the_updates_put_meanwhile(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], retry_after: Callable[[], str]) -> None:
    first, later = jobs(2)
    proxy.plan = [("429", retry_after)]
    proxy.hold = True
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        updater.put(first, "RUNNING")
        assert proxy.holding.wait(30)
        updater.put(later, "RUNNING")  # after the call went out, before the server's wait ends
        proxy.release.set()
        assert updater.flush(60)
    finally:
        updater.close()
    arrivals = [(at, ids, status, asked) for at, ids, _key, status, asked in proxy.patches]
    assert len(arrivals) == 2, arrivals  # was 3: the same PATCH after 0.5 s, the later update apart
    (at429, ids429, status429, asked), (at_retry, ids_retry, status_retry, _) = arrivals
    assert (ids429, status429) == ([first], 429)
    # The retry carries the update put during the wait, after the refused one: one PATCH.
    assert (ids_retry, status_retry) == ([first, later], 200)
    # Not before the time asked (a lower bound: the retry may come later, never sooner).
    assert asked is not None
    not_before = (at429 + float(asked)) if asked.isdecimal() else email.utils.parsedate_to_datetime(asked).timestamp()
    assert at_retry >= not_before, arrivals
    assert updater.dropped_count == 0 and updater.sent == 2
    assert _states(env, [first, later]) == ["RUNNING", "RUNNING"]
    for job_id in (first, later):
        assert job_moves(env, job_id).count(("PREPROCESSED", "RUNNING")) == 1


def test_a_503_after_the_server_applied_the_call_is_resent_as_it_was_after_its_wait(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]]) -> None:
    # A 503 may follow a commit that went through (its answer was cut): only the same body under
    # the same Idempotency-Key is safe to send again; the updates put meanwhile follow it.
    first, later = jobs(2)
    proxy.plan = [("503", seconds("1"))]
    proxy.hold = True
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        updater.put_updates([{"id": first, "state": "RUNNING"}, {"id": first, "state": "RUN_DONE", "return_code": 0}])
        assert proxy.holding.wait(30)
        updater.put(later, "RUNNING")
        proxy.release.set()
        assert updater.flush(60)
    finally:
        updater.close()
    patches = proxy.patches
    assert [(ids, status) for _at, ids, _key, status, _asked in patches] == [
        ([first, first], 503), ([first, first], 200), ([later], 200)], patches
    assert patches[0][2] and patches[0][2] == patches[1][2]  # the same request, answered from its record
    assert patches[1][0] - patches[0][0] >= 1.0, patches  # was 0.5 s
    assert updater.dropped_count == 0, updater.dropped  # nothing applied twice, nothing refused
    assert _states(env, [first, later]) == ["RUN_DONE", "RUNNING"]
    moves = job_moves(env, first)
    assert moves.count(("PREPROCESSED", "RUNNING")) == 1 and moves.count(("RUNNING", "RUN_DONE")) == 1, moves


def test_close_cuts_a_retry_after_longer_than_its_give_up_for_one_last_try(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    (job_id,) = jobs(1)
    proxy.always = ("429", seconds("30"))
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=2,
                                spool_dir=tmp_path / "spool")
    updater.put(job_id, "RUNNING")
    assert wait_until(lambda: len(proxy.patches) >= 1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        updater.close()
    # close() cut the 30 s wait at its give-up, for one last try (before: one try a second until
    # close_timeout), and its join did not run out.
    assert len(proxy.patches) == 2, proxy.patches
    assert not any("did not finish within" in r.getMessage() for r in caplog.records), caplog.text
    assert any("past the" in r.getMessage() and "one last try" in r.getMessage() for r in caplog.records), caplog.text
    assert updater.gave_up and updater.spooled == 1
    (spooled,) = (tmp_path / "spool").glob("*.jsonl")
    assert [json.loads(line)["id"] for line in spooled.read_text().splitlines()] == [job_id]


def test_close_during_a_short_retry_after_waits_it_out_and_sends(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path) -> None:
    (job_id,) = jobs(1)
    proxy.plan = [("429", seconds("1"))]
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=20,
                                spool_dir=tmp_path / "spool")
    updater.put(job_id, "RUNNING")
    assert wait_until(lambda: len(proxy.patches) >= 1)
    updater.close()  # during the wait: the wait ends within close_timeout, so it is kept, then sent
    assert [(ids, status) for _at, ids, _key, status, _asked in proxy.patches] == [([job_id], 429), ([job_id], 200)]
    assert proxy.patches[1][0] - proxy.patches[0][0] >= 1.0, proxy.patches
    assert not updater.gave_up and updater.spooled == 0 and updater.sent == 1
    assert _states(env, [job_id]) == ["RUNNING"]


def test_retry_after_values() -> None:
    import datetime as dt

    from balsam.client.rest import retry_after_seconds

    now = dt.datetime(2026, 12, 6, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds("1.5", now) == 1.5
    assert retry_after_seconds("Sun, 06 Dec 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Sunday, 06-Dec-26 12:00:05 GMT", now) == 5.0  # RFC 850, still allowed
    assert retry_after_seconds("0", now) == 0.0  # said as seconds: the caller decides (the updater: its own backoff)
    # A date not in the future (a proxy's clock behind ours) says nothing of when to come back: as
    # unsaid, the caller's own backoff (read as 0 it was every retry at once).
    for past in ("Sun, 06 Dec 2026 11:59:00 GMT", "Sun, 06 Dec 2026 12:00:00 GMT"):
        assert retry_after_seconds(past, now) is None
    for unreadable in ("", None, "-3", "soon", "Sun, 99 Foo 2026"):
        assert retry_after_seconds(unreadable, now) is None


def _planned_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the updater's "retrying in N s" lines planned, in order."""
    return [float(m.group(1)) for r in caplog.records if r.name == LOGGER
            for m in [re.search(r"retrying in ([0-9.]+) s", r.getMessage())] if m]


@pytest.mark.parametrize("retry_after", [seconds("0"), date_in(-5), date_in(0)], ids=["zero", "past-date", "now-date"])
@pytest.mark.usefixtures("fast_backoff")
def test_a_retry_after_of_now_or_the_past_gets_the_updaters_own_backoff_not_a_tight_loop(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], retry_after: Callable[[], str],
        caplog: pytest.LogCaptureFixture) -> None:
    # A proxy answering "Retry-After: 0" (or a date its clock says is now, ours already past):
    # honoured as a wait of 0, the same PATCH went out again at once, 67 of them in 3 s of 429s,
    # an INFO line each. It asks nothing: the updater's own backoff (0.5 s, 1 s, ...) applies.
    (job_id,) = jobs(1)
    proxy.plan = [("429", retry_after), ("429", retry_after)]
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        try:
            updater.put(job_id, "RUNNING")
            assert updater.flush(60)
        finally:
            updater.close()
    arrivals = [(at, status) for at, _ids, _key, status, _asked in proxy.patches]
    assert [status for _at, status in arrivals] == [429, 429, 200], arrivals
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    # Lower bounds of the own backoff (its first wait, then twice it: 0.5 s, then 1 s in production;
    # cut here by fast_backoff): a tight loop's gaps are milliseconds.
    first = FAST_BACKOFF_FIRST_SEC
    assert gaps[0] >= first and gaps[1] >= 2 * first, gaps
    assert _planned_waits(caplog) == [first, 2 * first], caplog.text
    assert "as the server's Retry-After asks" not in caplog.text
    assert updater.sent == 1 and updater.dropped_count == 0
    assert _states(env, [job_id]) == ["RUNNING"]


def test_a_server_wait_is_capped_at_a_minute_and_closing_cuts_it(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # An hour asked (a misconfigured proxy): waited a minute at most (plus its jitter, 5 s at
    # most), then asked again; close() cuts even that to its give-up.
    from balsam.client.status_updater import MAX_SERVER_WAIT_SEC, _MAX_JITTER_SEC

    (job_id,) = jobs(1)
    proxy.always = ("429", seconds("3600"))
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=tmp_path / "spool")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        updater.put(job_id, "RUNNING")
        assert wait_until(lambda: _planned_waits(caplog))
        updater.close()
    (planned,) = _planned_waits(caplog)
    assert MAX_SERVER_WAIT_SEC <= planned <= MAX_SERVER_WAIT_SEC + _MAX_JITTER_SEC, caplog.text
    assert len(proxy.patches) == 2, proxy.patches  # the first try and close()'s last one
    assert updater.gave_up and updater.spooled == 1


def test_the_jitter_never_makes_a_wait_shorter_than_asked(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], caplog: pytest.LogCaptureFixture) -> None:
    # Jitter spreads the launchers of one busy server over a little more than the wait it asked,
    # never less (sooner would be the load the 429 refused).
    (job_id,) = jobs(1)
    proxy.plan = [("429", seconds("1"))] * 3
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        try:
            updater.put(job_id, "RUNNING")
            assert updater.flush(60)
        finally:
            updater.close()
    arrivals = [(at, status) for at, _ids, _key, status, _asked in proxy.patches]
    assert [status for _at, status in arrivals] == [429, 429, 429, 200], arrivals
    assert all(b[0] - a[0] >= 1.0 for a, b in zip(arrivals, arrivals[1:])), arrivals
    planned = _planned_waits(caplog)
    assert len(planned) == 3 and all(1.0 <= wait <= 1.1 for wait in planned), planned  # jitter: 10 % at most


def test_close_while_the_thread_plans_its_wait_still_cuts_the_wait(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path) -> None:
    # close() called between the planning of a 30 s wait (as not closing) and the wait itself,
    # here while the thread writes its "retrying in" line (a slow log file on a shared file
    # system): the thread slept the whole 30 s, close() ran out its join (close_timeout + 30 s)
    # and spooled the update while the thread still held it, which then spooled it again.
    (job_id,) = jobs(1)
    proxy.always = ("429", seconds("30"))
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=tmp_path / "spool")
    closed = threading.Event()
    alive_when_closed: list[bool] = []

    took: list[float] = []

    def close() -> None:
        began = time.monotonic()
        updater.close()
        took.append(time.monotonic() - began)
        alive_when_closed.append(updater._thread.is_alive())
        closed.set()

    class CloseWhileLogging(logging.Handler):
        fired = False

        def emit(self, record: logging.LogRecord) -> None:
            if "retrying in" in record.getMessage() and not self.fired:
                self.fired = True
                threading.Thread(target=close, daemon=True).start()
                assert wait_until(lambda: updater._stopping, 30)  # close() has begun

    handler = CloseWhileLogging()
    log = logging.getLogger(LOGGER)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        updater.put(job_id, "RUNNING")
        assert closed.wait(90)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert handler.fired
    assert alive_when_closed == [False]  # close() joined the thread: it did not run out its join
    assert len(proxy.patches) == 2, proxy.patches  # the first try and close()'s last one
    # A failing call, not a slow server: its give-up at close_timeout, not with a slow server's extra
    # (close() began while the failure's line was written, before the failure was counted: 31 s).
    assert took[0] < status_updater.CLOSE_JOIN_EXTRA_SEC, took
    assert updater.gave_up and updater.spooled == 1
    (spooled,) = (tmp_path / "spool").glob("*.jsonl")  # once
    assert [json.loads(line)["id"] for line in spooled.read_text().splitlines()] == [job_id]


def test_the_clients_own_retries_wait_for_a_future_date_and_back_off_on_a_past_one(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]]) -> None:
    # RESTClient's retries (the CLI, the site agent, the Python API), not the updater's.
    (job_id,) = jobs(1)
    # Its own backoff a fifth of the default (0.5 s): still a real wait that doubles, checked below.
    client = RESTClient(proxy.url, env.token, backoff_base=0.1)
    proxy.plan = [("429", date_in(2))]
    client.patch("/jobs/", json=[{"id": job_id, "state": "RUNNING"}], retry_count=1)
    (at429, _ids, key, status, asked), (at_retry, _ids2, key2, status2, _a) = proxy.patches
    assert (status, status2) == (429, 200) and key == key2
    assert asked is not None and at_retry >= email.utils.parsedate_to_datetime(asked).timestamp(), proxy.patches
    assert _states(env, [job_id]) == ["RUNNING"]
    # A date already past (the proxy's clock behind ours): read as 0, the whole budget of tries
    # went out in 0.2 s; now the client's own backoff (backoff_base, then twice it, each at least).
    proxy.patches.clear()
    proxy.always = ("429", date_in(-5))
    with pytest.raises(Exception) as info:
        client.patch("/jobs/", json=[{"id": job_id, "state": "RUN_DONE", "return_code": 0}], retry_count=2)
    assert getattr(info.value, "status_code", None) == 429
    arrivals = [at for at, *_rest in proxy.patches]
    assert len(arrivals) == 3, proxy.patches
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert gaps[0] >= client.backoff_base and gaps[1] >= 2 * client.backoff_base, gaps
    assert _states(env, [job_id]) == ["RUNNING"]


# -- the rest of the failure handling (each verified against the real server) ---------------------


def test_a_call_whose_answer_is_lost_after_it_was_applied_is_resent_as_the_same_request(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]]) -> None:
    # RUNNING and RUN_DONE of one job in one call: applied twice, the resent RUNNING would be
    # refused (409: RUN_DONE cannot go back to RUNNING) and dropped.
    (job_id,) = jobs(1)
    proxy.plan = [("drop", seconds(""))]
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        updater.put_updates([{"id": job_id, "state": "RUNNING"}, {"id": job_id, "state": "RUN_DONE", "return_code": 0}])
        assert updater.flush(60)
    finally:
        updater.close()
    patches = proxy.patches
    assert [(ids, status) for _at, ids, _key, status, _asked in patches] == [([job_id, job_id], 0),
                                                                             ([job_id, job_id], 200)]
    assert patches[0][2] and patches[0][2] == patches[1][2]
    assert updater.dropped_count == 0 and updater.sent == 2, updater.dropped
    assert _states(env, [job_id]) == ["RUN_DONE"]
    moves = job_moves(env, job_id)
    assert moves.count(("PREPROCESSED", "RUNNING")) == 1 and moves.count(("RUNNING", "RUN_DONE")) == 1, moves


def test_a_job_refused_for_good_is_reported_and_dropped_and_the_others_of_its_call_applied_once(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]],
        caplog: pytest.LogCaptureFixture) -> None:
    before, bad, after = jobs(3)
    client = RESTClient(env.url, env.token)
    deleted = client.Job.objects.get(id=jobs(1)[0])
    deleted_id = deleted.id
    deleted.delete()
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        try:
            # One call: a job that cannot go to JOB_FINISHED from PREPROCESSED (409), one deleted
            # (404), two good ones.
            updater.put_updates([{"id": before, "state": "RUNNING"}, {"id": bad, "state": "JOB_FINISHED"},
                                 {"id": deleted_id, "state": "RUNNING"}, {"id": after, "state": "RUNNING"}])
            assert updater.flush(60)
            updater.put(bad, "RUNNING")  # the updater goes on: a later update of the same job is sent
            assert updater.flush(60)
        finally:
            updater.close()
    assert _states(env, [before, bad, after]) == ["RUNNING", "RUNNING", "RUNNING"]
    for job_id in (before, bad, after):
        assert job_moves(env, job_id).count(("PREPROCESSED", "RUNNING")) == 1
    assert sorted(u["id"] for u, _reason in updater.dropped) == sorted([bad, deleted_id])
    assert updater.dropped_count == 2 and updater.sent == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("refused" in e for e in errors), errors
    # Isolated in a few calls, not retried: every call but the last has a 4xx answer.
    statuses = [status for _at, _ids, _key, status, _asked in proxy.patches]
    assert all(400 <= s < 500 or s == 200 for s in statuses) and len(statuses) <= 8, proxy.patches


@pytest.mark.usefixtures("fast_backoff")
def test_a_call_the_server_fails_for_one_job_does_not_hold_the_updates_of_other_jobs(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]]) -> None:
    # One job's data trips a server fault (500, no Retry-After) on every call that carries it.
    # Before, that call was retried alone and every later update of every job waited behind it
    # until close() gave up. Now after a few failures the other jobs' updates go out in calls of
    # their own meanwhile; the failing call is still resent unchanged under its Idempotency-Key
    # (a 500 may follow a commit: here each try is applied, then answered 500), and its job's
    # later updates wait behind it, in order.
    bad, other = jobs(2)
    # 4 failures: the side lane opens at the 3rd (SIDE_LANE_AFTER_FAILURES), and the call fails once
    # more after it, still resent unchanged (a 5th failure only added the backoff's 8 s wait).
    proxy.fail_ids, proxy.fail_left, proxy.fail_forward = {bad}, 4, True
    proxy.hold = True  # the first answer waits until the later updates are queued
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        updater.put_updates([{"id": bad, "state": "RUNNING"}, {"id": bad, "state": "RUN_DONE", "return_code": 0}])
        assert proxy.holding.wait(30)
        updater.put(other, "RUNNING")
        updater.put(bad, "POSTPROCESSED")  # after the failing call, whenever it goes through
        updater.put(other, "RUN_DONE", return_code=0)
        proxy.release.set()
        assert updater.flush(120)
    finally:
        updater.close()
    patches = [(ids, key, status) for _at, ids, key, status, _asked in proxy.patches]
    bad_call = [p for p in patches if p[0] == [bad, bad]]
    assert [status for _ids, _key, status in bad_call] == [500] * 4 + [200], patches
    assert len({key for _ids, key, _status in bad_call}) == 1, patches  # one request, resent unchanged
    through = patches.index(bad_call[-1])
    other_calls = [i for i, p in enumerate(patches) if other in p[0]]
    # The other job's updates went out while the bad call still failed (before: only after it).
    assert other_calls and all(i < through for i in other_calls), patches
    # The bad job's later update after its call went through, never beside it or before.
    assert [i for i, p in enumerate(patches) if p[0] and bad in p[0] and p[0] != [bad, bad]] == [through + 1], patches
    assert updater.dropped_count == 0, updater.dropped
    assert _states(env, [bad, other]) == ["JOB_FINISHED", "RUN_DONE"]  # POSTPROCESSED goes on to JOB_FINISHED
    for job_id, moves in ((bad, [("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE"), ("RUN_DONE", "POSTPROCESSED")]),
                          (other, [("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE")])):
        made = job_moves(env, job_id)
        assert all(made.count(move) == 1 for move in moves), made  # each once: nothing applied twice


@pytest.mark.usefixtures("fast_backoff")
def test_a_call_that_always_fails_is_spooled_in_order_at_close_and_the_other_jobs_updates_were_sent(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path) -> None:
    from balsam.client.status_updater import SpoolReplayer

    bad, other = jobs(2)
    proxy.fail_ids, proxy.fail_left, proxy.fail_forward = {bad}, 10**6, False  # rolled back each time
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=tmp_path / "spool")
    try:
        updater.put(bad, "RUNNING")
        assert wait_until(lambda: len(proxy.patches) >= 1)
        updater.put(other, "RUNNING")
        updater.put(bad, "RUN_DONE", return_code=0)
        updater.put(other, "RUN_DONE", return_code=0)
        assert wait_until(lambda: _states(env, [other]) == ["RUN_DONE"], 60)  # not waiting for close()
    finally:
        updater.close()
    assert updater.gave_up and updater.spooled == 2
    spooled = [json.loads(line) for f in sorted((tmp_path / "spool").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [(u["id"], u["state"]) for u in spooled] == [(bad, "RUNNING"), (bad, "RUN_DONE")]
    # The site agent replays them once the server is fixed: applied once, in order.
    proxy.fail_left = 0
    replay = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        assert SpoolReplayer(tmp_path / "spool", replay).poll() == 2
        assert replay.flush(60)
    finally:
        replay.close()
    assert replay.dropped_count == 0, replay.dropped
    assert _states(env, [bad, other]) == ["RUN_DONE", "RUN_DONE"]
    made = job_moves(env, bad)
    assert made.count(("PREPROCESSED", "RUNNING")) == 1 and made.count(("RUNNING", "RUN_DONE")) == 1, made


@pytest.mark.usefixtures("fast_backoff")
def test_close_gives_a_call_failing_beside_a_side_call_that_goes_through_no_fresh_give_up_window(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path) -> None:
    # close() begins while a side call (the other job's update, sent beside a call that always
    # fails) is in flight; it goes through only after close_timeout. Its success cleared the shared
    # give-up clock and the failing call, failing since before close(), got a fresh close_timeout
    # (one per nesting level of side calls: close() lasted ~4 x close_timeout, past its join, and
    # the call was spooled twice). Now that call's own clock runs from close(): given up at once.
    bad, other = jobs(2)
    proxy.fail_ids, proxy.fail_left, proxy.fail_forward = {bad}, 10**6, False
    proxy.hold_ids = {other}
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=tmp_path / "spool")
    try:
        updater.put(bad, "RUNNING")
        assert wait_until(lambda: len(proxy.patches) >= 1)
        updater.put(other, "RUNNING")
        assert proxy.holding.wait(60)  # the side call, after the bad call's third failure
        closer = threading.Thread(target=updater.close)
        closer.start()
        assert wait_until(updater._closing.is_set)
        time.sleep(updater.close_timeout + 0.5)  # the side call goes through past the give-up
        proxy.release.set()
        closer.join(120)
        assert not closer.is_alive()
    finally:
        proxy.release.set()
        updater.close()
    assert not updater._thread.is_alive()
    patches = [(ids, status) for _at, ids, _key, status, _asked in proxy.patches]
    through = patches.index(([other], 200))
    assert [p for p in patches[through + 1:] if bad in p[0]] == [], patches  # no try in a fresh window
    assert updater.gave_up and updater.spooled == 1
    spooled = [json.loads(line) for f in sorted((tmp_path / "spool").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [(u["id"], u["state"]) for u in spooled] == [(bad, "RUNNING")]  # once
    assert _states(env, [bad, other]) == ["PREPROCESSED", "RUNNING"]


@pytest.mark.usefixtures("fast_backoff")
def test_a_side_call_retried_a_moment_holds_its_jobs_later_updates_only_until_it_goes_through(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]]) -> None:
    # The other job's side call (beside a call that always fails) fails a few times itself, long
    # enough for side calls of its own: the other job's next update, queued, is held then. Before,
    # that held its job behind the failing call for good: the update waited for that call to end
    # (here: until the test lets it through) long after its own side call went through. Now it goes
    # out once its side call has, while the bad call still fails.
    bad, other = jobs(2)
    proxy.fail_ids, proxy.fail_left, proxy.fail_forward = {bad}, 10**6, False
    proxy.flaky = {other: 3}  # its first call: 3 failures, enough to open side calls of its own
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, max_batch=1)
    try:
        updater.put(bad, "RUNNING")
        updater.put(other, "RUNNING")
        updater.put(other, "RUN_DONE", return_code=0)
        assert wait_until(lambda: _states(env, [other]) == ["RUN_DONE"], 30)  # the bad call still fails
        assert _states(env, [bad]) == ["PREPROCESSED"]
        proxy.fail_left = 0
        assert updater.flush(60)
    finally:
        updater.close()
    patches = [(ids, status) for _at, ids, _key, status, _asked in proxy.patches]
    assert [status for ids, status in patches if ids == [other]] == [500, 500, 500, 200, 200], patches
    assert updater.dropped_count == 0, updater.dropped
    assert _states(env, [bad, other]) == ["RUNNING", "RUN_DONE"]
    made = job_moves(env, other)
    assert made.count(("PREPROCESSED", "RUNNING")) == 1 and made.count(("RUNNING", "RUN_DONE")) == 1, made
