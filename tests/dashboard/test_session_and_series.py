"""The dashboard's session cookies, CSRF tokens, login nonces and tickets (and their one-time
redemption in the database); the step-series helpers of balsam.analytics that the plots and the
CLI tables use."""

from __future__ import annotations

import datetime as dt

import pytest

from balsam.analytics import align_steps, batch_jobs_serving, downsample, step_at, time_average
from balsam.server.auth import AuthUser, decode_token
from balsam.server.dashboard import session as s
from balsam.server.errors import Unauthorized

SECRET = "unit-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ALICE = AuthUser(id=7, username="alice")


def test_session_cookie_round_trip_and_refusals() -> None:
    cookie, session = s.issue_session(ALICE, SECRET, 3600)
    read = s.read_session(cookie, SECRET)
    assert read == session and read.user == ALICE
    assert s.read_session(cookie, SECRET + "x") is None  # another server's key
    assert s.read_session(cookie[:-3] + "abc", SECRET) is None  # tampered
    assert s.read_session(None, SECRET) is None and s.read_session("", SECRET) is None
    expired, _ = s.issue_session(ALICE, SECRET, -10)
    assert s.read_session(expired, SECRET) is None
    with pytest.raises(Unauthorized):
        decode_token(cookie, SECRET)  # a session cookie is no API token
    ticket = s.issue_ticket(ALICE, SECRET)
    assert s.read_session(ticket, SECRET) is None and s.read_ticket(ticket, SECRET).user == ALICE
    assert s.read_ticket(cookie, SECRET) is None


def test_a_ticket_is_redeemed_once_across_server_processes(database_url: str) -> None:
    """Before: a one-time link logged in any number of times within its two minutes. Two engines
    stand for two worker processes of one server: the second redemption is refused in either."""
    from balsam.server.db import create_db_engine, write_tx
    from balsam.server.migrate import upgrade
    from balsam.server.tables import dashboard_tickets

    upgrade(database_url)
    engines = [create_db_engine(database_url), create_db_engine(database_url)]
    try:
        ticket = s.read_ticket(s.issue_ticket(ALICE, SECRET), SECRET)
        other = s.read_ticket(s.issue_ticket(ALICE, SECRET), SECRET)
        assert ticket.nonce != other.nonce
        with write_tx(engines[0]) as conn:
            assert s.redeem_ticket(conn, ticket)
        for engine in engines:
            with write_tx(engine) as conn:
                assert not s.redeem_ticket(conn, ticket)
        with write_tx(engines[1]) as conn:
            assert s.redeem_ticket(conn, other)  # another link is unaffected
        # An expired ticket is refused, and the rows of expired tickets go on the next redemption.
        expired = s.Ticket(ALICE, "expired-nonce", s._now() - 1)
        with write_tx(engines[0]) as conn:
            assert not s.redeem_ticket(conn, expired)
            conn.execute(dashboard_tickets.insert().values(
                nonce="stale", expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)))
        with write_tx(engines[1]) as conn:
            assert s.redeem_ticket(conn, s.read_ticket(s.issue_ticket(ALICE, SECRET), SECRET))
            nonces = set(conn.execute(dashboard_tickets.select().with_only_columns(dashboard_tickets.c.nonce)).scalars())
        assert "stale" not in nonces and {ticket.nonce, other.nonce} <= nonces
    finally:
        for engine in engines:
            engine.dispose()


def test_renewal_keeps_the_session_id() -> None:
    cookie, session = s.issue_session(ALICE, SECRET, 100)
    assert s.renew_session(session, SECRET, 100, 3600) is None  # fresh: nothing to renew
    old = s.DashboardSession(ALICE, session.sid, session.expires - 60, session.login_time)
    renewed = s.read_session(s.renew_session(old, SECRET, 100, 3600), SECRET)
    assert renewed.sid == session.sid and renewed.expires > old.expires
    assert renewed.login_time == session.login_time
    assert renewed.csrf_token(SECRET) == session.csrf_token(SECRET)


def test_a_session_kept_in_use_still_ends_at_its_max_age() -> None:
    """Renewal on use must not keep a (possibly stolen) cookie alive forever."""
    _, session = s.issue_session(ALICE, SECRET, 100)
    logged_in_long_ago = s.DashboardSession(ALICE, session.sid, session.expires - 60, session.login_time - 3600 + 50)
    renewed = s.read_session(s.renew_session(logged_in_long_ago, SECRET, 100, 3600), SECRET)
    assert renewed.expires == logged_in_long_ago.login_time + 3600  # capped, not now + 100
    at_the_cap = s.DashboardSession(ALICE, session.sid, session.expires - 60, session.login_time - 3600 + 40)
    assert s.renew_session(at_the_cap, SECRET, 100, 3600) is None  # nothing left to extend


def test_csrf_token_and_login_nonce() -> None:
    _, session = s.issue_session(ALICE, SECRET, 100)
    _, other = s.issue_session(ALICE, SECRET, 100)
    token = session.csrf_token(SECRET)
    assert s.check_csrf(session, SECRET, token)
    assert not s.check_csrf(other, SECRET, token) and not s.check_csrf(session, SECRET, None)
    nonce = s.new_login_nonce(SECRET)
    assert s.check_login_nonce(SECRET, nonce, nonce)
    assert not s.check_login_nonce(SECRET, nonce, s.new_login_nonce(SECRET))
    forged = nonce.split(".")[0] + ".AAAA"
    assert not s.check_login_nonce(SECRET, forged, forged)  # a cookie the server did not sign


T = dt.datetime(2024, 1, 1)


def t(seconds: float) -> dt.datetime:
    return T + dt.timedelta(seconds=seconds)


def test_step_helpers() -> None:
    times, values = [t(0), t(10), t(20)], [1, 3, 0]
    assert [step_at(times, values, t(x)) for x in (-1, 0, 5, 10, 25)] == [0, 1, 1, 3, 0]
    axis, (a, b) = align_steps((times, values), ([t(5), t(20)], [2, 4]))
    assert axis == [t(0), t(5), t(10), t(20)] and a == [1, 1, 3, 0] and b == [0, 2, 2, 4]
    assert time_average(times, values, t(0), t(20)) == pytest.approx(2.0)  # 1 for 10 s, 3 for 10 s
    assert time_average(times, values, t(5), t(15)) == pytest.approx(2.0)
    assert time_average(times, values, t(30), t(30)) == 0


def test_downsample_keeps_last_or_peak_per_bucket() -> None:
    times = [t(i) for i in range(100)]
    cumulative = list(range(1, 101))
    spiky = [0] * 100
    spiky[42] = 9
    out_t, (c, p) = downsample(times, [cumulative, spiky], 10, ["last", "max"])
    assert len(out_t) == 10 and c[-1] == 100 and c == sorted(c) and max(p) == 9
    assert downsample(times[:5], [cumulative[:5]], 10, ["last"]) == (times[:5], [cumulative[:5]])


def test_batch_jobs_serving_a_tag_filter() -> None:
    class BJ:
        def __init__(self, tags: dict) -> None:
            self.filter_tags = tags

    any_job, only_x, only_y = BJ({}), BJ({"c": "x"}), BJ({"c": "y"})
    assert batch_jobs_serving([any_job, only_x, only_y], {"c": "x"}) == [any_job, only_x]
    assert batch_jobs_serving([any_job, only_y], None) == [any_job, only_y]
