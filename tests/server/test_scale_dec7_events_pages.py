"""Pages of events read only the rows they show (audit of the other paths at 10^5 jobs).

- ``GET /events/`` on SQLite: the owner check joined the jobs, and SQLite's planner built a Bloom
  filter over every job of the user's sites before reading a page (10^5 jobs: 17 ms a page, 0.1 ms
  with a lookup of each event's job; ``routes.events.events_page_select``). The count stays exact
  and is read through the join (faster for every match).
- The dashboard's Events page (by id) read the same join (13 ms at 10^5 jobs, analyzed; 160 ms
  not); it reads the lookup now (``routes.events.events_by_id_select``). Filtered by a state, SQLite
  read all of a common state's events and sorted them (no statistics: the server does not ANALYZE),
  or walked every event by id for a rare one (with them); the state's events, counted up to
  ``FEW_IN_STATE``, now choose the plan.

The statements the real routes run (a starlette TestClient on a migrated database of 3,000 jobs of
one site, three events each, analyzed: the planners' statistics, or on SQLite not, as the server
leaves it) are caught as they execute and explained; figures in docs/performance.md."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from balsam.server.app import create_app
from balsam.server.db import create_db_engine
from balsam.server.migrate import upgrade
from balsam.server.settings import ServerSettings

PASSWORD = "a long enough password"
JOBS = 3000


def _fill(conn: sa.Connection, site: int, analyze: bool = True) -> None:
    """An app and ``JOBS`` jobs of ``site``, each with 3 events (RUNNING -> RUN_DONE, a second
    apart, the newest last); the last 5 jobs' last event is RUN_ERROR."""
    app = conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site}).scalar()
    pg = conn.dialect.name == "postgresql"
    series = (f"generate_series(0, {JOBS - 1}) AS i" if pg else
              f"(WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {JOBS - 1}) SELECT i FROM n)")
    conn.exec_driver_sql(
        "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
        "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
        "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
        f"SELECT {site}, {app}, 'w' || i, '{{}}', '', '{{}}', 1, 1, 1, 1, '{{}}', 0, 1, 0, '[]', 'RUN_DONE', true, '', '', "
        f"{'now()' if pg else 'CURRENT_TIMESTAMP'} FROM {series}")
    stamp = ("TIMESTAMPTZ '2026-11-01 00:00:00+00' + (j.id * 3 + k) * INTERVAL '1 second'" if pg else
             "strftime('%Y-%m-%d %H:%M:%f', '2026-11-01 00:00:00', '+' || (j.id * 3 + k) || ' seconds')")
    last = JOBS - 5
    conn.exec_driver_sql(
        "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
        f"SELECT j.id, {stamp}, 'RUNNING', CASE WHEN k = 2 AND j.workdir IN ({', '.join(repr(f'w{i}') for i in range(last, JOBS))}) "
        "THEN 'RUN_ERROR' WHEN k = 2 THEN 'RUN_DONE' ELSE 'RUNNING' END, '{}' "
        f"FROM jobs j, (SELECT 0 AS k UNION ALL SELECT 1 UNION ALL SELECT 2) AS ks ORDER BY j.id, k".replace("%", "%%" if pg else "%"))
    if analyze:
        conn.exec_driver_sql("ANALYZE")


#: The database analyzed (the planners' statistics), and on SQLite as the server leaves it, without
#: (PostgreSQL's autovacuum analyzes: that combination is not generated, no database made for it).
BOTH = pytest.mark.parametrize(("served", "database_url"), [
    ("analyzed", "sqlite"), pytest.param("analyzed", "postgresql", marks=pytest.mark.postgres), ("as left", "sqlite")],
    indirect=True)
#: Only SQLite (the plans of routes.events' SQLite paths), as the server leaves it and analyzed.
SQLITE_BOTH = pytest.mark.parametrize(("served", "database_url"), [("analyzed", "sqlite"), ("as left", "sqlite")],
                                      indirect=True)


@pytest.fixture
def served(request: pytest.FixtureRequest, database_url: str) -> Iterator[tuple[TestClient, sa.Engine]]:
    """A logged-in TestClient (user ``u``: REST token and dashboard cookie) over a migrated database
    holding ``u``'s site with its jobs and events, and an engine on the same database: analyzed, or
    (``BOTH``) on SQLite as the server leaves it, without statistics."""
    analyze = getattr(request, "param", "analyzed") == "analyzed"
    upgrade(database_url)
    settings = ServerSettings(database_url=database_url, secret_key="x" * 40, registration="open")
    engine = create_db_engine(database_url)
    with TestClient(create_app(settings=settings, create_tables_now=False)) as tc:
        tc.post("/auth/password/register", json={"username": "u", "password": PASSWORD}).raise_for_status()
        token = tc.post("/auth/password/login", data={"username": "u", "password": PASSWORD}).json()["access_token"]
        page = tc.get("/dashboard/login")
        nonce = re.search(r'name="login_token" value="([^"]*)"', page.text).group(1)
        answer = tc.post("/dashboard/login", data={"username": "u", "password": PASSWORD, "login_token": nonce},
                         follow_redirects=False)
        assert answer.status_code == 303, answer.text
        tc.headers["Authorization"] = f"Bearer {token}"
        site = tc.post("/sites/", json={"name": "s", "path": "/tmp/s"}).json()["id"]
        with engine.begin() as conn:
            _fill(conn, site, analyze)
        tc.site_id = site
        try:
            yield tc, engine
        finally:
            engine.dispose()


def _planned(engine: sa.Engine, get: Any, wanted: Callable[[str], bool],
             none_read: str) -> tuple[Any, list[tuple[str, str]]]:
    """``get()``'s answer (asserted 200), and every SELECT it ran that ``wanted`` keeps, each with
    its plan; at least one (else ``none_read``)."""
    seen: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and wanted(statement):
            seen.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", catch)
    try:
        answer = get()
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", catch)
    assert answer.status_code == 200, answer.text
    plans = []
    with engine.connect() as conn:
        pg = conn.dialect.name == "postgresql"
        cursor = conn.connection.dbapi_connection.cursor()
        for statement, parameters in seen:
            cursor.execute(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + statement, parameters)
            plans.append((statement, "\n".join(" ".join(map(str, row)) for row in cursor.fetchall())))
        cursor.close()
    assert plans, none_read
    return answer, plans


def _event_pages(engine: sa.Engine, get: Any) -> tuple[Any, list[tuple[str, str]]]:
    """``get()``'s answer, and each page of events it read (a SELECT of log_events with a LIMIT,
    the events' columns: not a count of a state's events up to a bound) with its plan."""
    return _planned(engine, get, lambda statement: "FROM log_events" in statement and "LIMIT" in statement
                    and "log_events.data" in statement, "no page of events was read")


def _another_users_site(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        other = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('v', '2026-12-01') RETURNING id")).scalar()
        conn.execute(sa.text(
            "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
            "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
            "(:u, 'v', '/v', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01')"), {"u": other})


@BOTH
@pytest.mark.parametrize("query", ["limit=100", "limit=100&ordering=timestamp", "limit=100&to_state=RUN_DONE"])
def test_an_event_page_does_not_filter_every_job_first(served: Any, query: str) -> None:
    tc, engine = served
    answer, plans = _event_pages(engine, lambda: tc.get(f"/events/?{query}"))
    body = answer.json()
    expected = JOBS * 3 if "to_state" not in query else JOBS - 5
    assert body["count"] == expected and len(body["results"]) == 100, body["count"]  # the exact count, as before
    stamps = [event["timestamp"] for event in body["results"]]
    assert stamps == sorted(stamps, reverse="ordering" not in query)
    for statement, plan in plans:
        if engine.dialect.name == "sqlite":
            # The join's plan: "BLOOM FILTER ON jobs", built from every job of the site.
            assert "BLOOM FILTER" not in plan and "jobs USING COVERING INDEX ix_jobs_site_id" not in plan, plan
            assert "SEARCH jobs USING INTEGER PRIMARY KEY" in plan, plan  # each event's job, looked up
        else:
            assert "Seq Scan on jobs" not in plan, plan


def test_other_users_events_and_job_filters_keep_the_join(served: Any) -> None:
    """With a site of another user, or a filter on the jobs, a page joins the jobs as before (see
    events_page_select): the answers are the user's matching events, and only theirs."""
    tc, engine = served
    _another_users_site(engine)
    answer, _plans = _event_pages(engine, lambda: tc.get("/events/?limit=100"))
    assert answer.json()["count"] == JOBS * 3
    answer, _plans = _event_pages(engine, lambda: tc.get(f"/events/?limit=100&site_id={tc.site_id}&to_state=RUN_ERROR"))
    assert answer.json()["count"] == 5 and {e["to_state"] for e in answer.json()["results"]} == {"RUN_ERROR"}


def _dashboard_ids(page_html: str) -> list[int]:
    return [int(i) for i in re.findall(r'id="event-(\d+)"', page_html)]


def _sqlite_lookup_plan(plan: str) -> None:
    """The plan of a page whose owner check looks up each event's job (events_page_select)."""
    # The join's plans: a Bloom filter built from every job of the site, or every job of the site
    # read first through its index, then their events sorted.
    assert "BLOOM FILTER" not in plan and "USING COVERING INDEX ix_jobs_site_id" not in plan, plan
    assert "SEARCH jobs USING INTEGER PRIMARY KEY" in plan, plan


@BOTH
@pytest.mark.parametrize("query", ["", "to_state=RUN_DONE"])
def test_the_dashboard_events_page_does_not_read_every_job_first(served: Any, query: str) -> None:
    """Newest first, and the state of many events: walked by id, each event's job looked up. Before:
    the join of events_select (a Bloom filter, or, without statistics, every job of the site and
    all their events sorted; with ``to_state``, all of that state's events sorted)."""
    tc, engine = served
    answer, plans = _event_pages(engine, lambda: tc.get(f"/dashboard/events?{query}"))
    ids = _dashboard_ids(answer.text)
    with engine.connect() as conn:
        state = query.partition("=")[2]
        expected = conn.execute(sa.text(
            "SELECT id FROM log_events WHERE to_state = :s OR :s = '' ORDER BY id DESC LIMIT 100"), {"s": state}).scalars().all()
    assert ids == expected  # the newest 100, in order
    older = re.search(r'<a href="([^"]+)" rel="next">', answer.text).group(1).replace("&amp;", "&")
    second, plans_older = _event_pages(engine, lambda: tc.get(older))
    assert _dashboard_ids(second.text)[0] < ids[-1]  # the next page goes on below the first
    for statement, plan in plans + plans_older:
        assert "ORDER BY log_events.id DESC" in statement, statement
        if engine.dialect.name == "sqlite":
            _sqlite_lookup_plan(plan)
            # Walked by id: not all of the state's events read and sorted.
            assert "TEMP B-TREE" not in plan and "ix_log_events_to_state_timestamp" not in plan, plan
        else:
            assert "Seq Scan on jobs" not in plan, plan


@BOTH
def test_the_dashboard_events_of_a_rare_state_are_read_through_its_index(served: Any) -> None:
    """A state few events reached (five RUN_ERROR), its newest page and the pages before and after an
    event: read through ix_log_events_to_state_timestamp and sorted, not found by walking every
    event by id (the plan with statistics, before), nor by the primary key's range of a page's bound."""
    tc, engine = served
    with engine.connect() as conn:
        errors = conn.execute(sa.text("SELECT id FROM log_events WHERE to_state = 'RUN_ERROR' ORDER BY id DESC")).scalars().all()
    assert len(errors) == 5
    for paging, expected in (("", errors), (f"&before={errors[1]}", errors[2:]), (f"&after={errors[3]}", errors[:3])):
        answer, plans = _event_pages(engine, lambda: tc.get(f"/dashboard/events?to_state=RUN_ERROR{paging}"))
        assert _dashboard_ids(answer.text) == expected, paging
        _rare_state_plans(engine, plans, paging)


def _rare_state_plans(engine: sa.Engine, plans: list[tuple[str, str]], paging: str) -> None:
    for _statement, plan in plans:
        if engine.dialect.name == "sqlite":
            _sqlite_lookup_plan(plan)
            assert "ix_log_events_to_state_timestamp" in plan, plan
            assert "SCAN log_events" not in plan and "PRIMARY KEY (rowid<" not in plan and "(rowid>" not in plan, plan
        elif "after" not in paging:  # (id > the 4th newest: PostgreSQL reads those few by the key)
            # PostgreSQL reads a rare state's few events by an index and sorts them.
            assert "Seq Scan on log_events" not in plan and "pk_log_events" not in plan, plan


def test_the_dashboard_events_page_of_another_users_server(served: Any) -> None:
    """With another user's site, or a filter on the jobs, the join stays (events_page_select): the
    page lists the user's matching events, and only theirs."""
    tc, engine = served
    with engine.begin() as conn:
        other = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('v', '2026-12-01') RETURNING id")).scalar()
        site = conn.execute(sa.text(
            "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
            "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
            "(:u, 'v', '/v', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"), {"u": other}).scalar()
        _fill(conn, site)  # the other user's 9,000 events, newer than u's
        mine = conn.execute(sa.text(
            "SELECT e.id FROM log_events e JOIN jobs j ON j.id = e.job_id WHERE j.site_id = :s AND e.to_state = 'RUN_ERROR' "
            "ORDER BY e.id DESC"), {"s": tc.site_id}).scalars().all()
        newest = conn.execute(sa.text(
            "SELECT e.id FROM log_events e JOIN jobs j ON j.id = e.job_id WHERE j.site_id = :s ORDER BY e.id DESC LIMIT 100"),
            {"s": tc.site_id}).scalars().all()
    for query, expected in (("to_state=RUN_ERROR", mine), (f"to_state=RUN_ERROR&site_id={tc.site_id}", mine), ("", newest)):
        answer, plans = _event_pages(engine, lambda: tc.get(f"/dashboard/events?{query}"))
        assert _dashboard_ids(answer.text) == expected, query
        for statement, _plan in plans:
            assert "JOIN jobs" in statement and "EXISTS" not in statement, statement


# --- Events of a time range (timestamp_after/_before) on SQLite without statistics --------------
#
# The page and its exact count joined the jobs, and without statistics SQLite's planner read every
# job of the site and all their events first: the count of an hour of events (3,240 of 9*10^5)
# took 400 ms, page and count 1 s with another user's site; the dashboard's Events page read a wide
# two-sided range's every event and sorted them by id. A range of few events (counted in
# ix_log_events_timestamp up to routes.events.FEW_IN_TIME_RANGE) is now read through that index,
# page and count, each event's job looked up; a wider one is walked by id on the dashboard.

T0 = "2026-11-01T00:00:00+00:00"  # the events' timestamps: T0 + (job id * 3 + k) seconds, one a second


def _stamp(seconds: float) -> str:
    import datetime as dt
    return (dt.datetime.fromisoformat(T0) + dt.timedelta(seconds=seconds)).isoformat().replace("+", "%2B")


def _statements(engine: sa.Engine, get: Any) -> tuple[Any, list[tuple[str, str]]]:
    """``get()``'s answer, and every statement it ran that reads the events' columns (pages and
    counts, not the probes), each with its plan."""
    return _planned(engine, get, lambda statement: "log_events.data" in statement, "no events read")


def _expected_events(engine: sa.Engine, lo: "int | None", hi: "int | None", state: str = "", *,
                     by_id: bool = False, newest_first: bool = True) -> list[int]:
    """The ids of the events in [T0 + lo, T0 + hi] seconds (either end open when None), worked out
    from the events' own timestamps in Python, in the listing's order."""
    import datetime as dt
    t0 = dt.datetime.fromisoformat(T0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.column("id"), sa.column("timestamp", sa.DateTime), sa.column("to_state"))
                            .select_from(sa.table("log_events"))).all()
    picked = []
    for event_id, stamp, to_state in rows:
        seconds = (stamp.replace(tzinfo=dt.timezone.utc) - t0).total_seconds()
        if (lo is None or seconds >= lo) and (hi is None or seconds <= hi) and (not state or to_state == state):
            picked.append((stamp, event_id))
    picked.sort(key=(lambda p: p[1]) if by_id else (lambda p: p))
    ids = [event_id for _stamp, event_id in picked]
    return ids[::-1] if newest_first else ids


def _range_query(lo: "int | None", hi: "int | None") -> str:
    """The query's range of [T0 + lo, T0 + hi] seconds, its ends half a second out (the fill's
    timestamps have 3 decimals, the server's 6: equal instants are not equal strings on SQLite)."""
    return "".join([f"&timestamp_after={_stamp(lo - 0.5)}" if lo is not None else "",
                    f"&timestamp_before={_stamp(hi + 0.5)}" if hi is not None else ""])


def _sqlite_range_plan(plan: str) -> None:
    """Read through the range's index (or the state's, which holds the range too), each event's job looked up."""
    assert "ix_jobs_site_id" not in plan and "BLOOM FILTER" not in plan and "ix_log_events_job_id" not in plan, plan
    assert re.search(r"SEARCH log_events USING INDEX ix_log_events_(to_state_)?timestamp \(", plan), plan
    assert "SEARCH jobs USING INTEGER PRIMARY KEY" in plan, plan


#: REST listings of a time range: (query, range start and end in seconds from T0, to_state).
RANGE_QUERIES = [
    ("limit=100", 3000, 3299, ""),
    ("limit=100&ordering=timestamp", 3000, 3299, ""),
    ("limit=100&offset=250", 3000, 3299, ""),
    ("limit=100&to_state=RUN_DONE", 3000, 3899, "RUN_DONE"),
    ("limit=100", 8500, None, ""),
    ("limit=100&ordering=timestamp", None, 700, ""),
]


@BOTH
def test_events_of_a_time_range_are_read_through_its_index(served: Any) -> None:
    """A page of a few events of a time range, and their exact count: the same events, order and
    count as worked out in Python; on SQLite both statements read ix_log_events_timestamp and look up
    each event's job, with or without statistics, on a one-user server and with another user's site."""
    tc, engine = served
    for others in (False, True):
        if others:
            _another_users_site(engine)
        for query, lo, hi, state in RANGE_QUERIES:
            answer, plans = _statements(engine, lambda: tc.get(f"/events/?{query}{_range_query(lo, hi)}"))
            expected = _expected_events(engine, lo, hi, state, newest_first="ordering" not in query)
            offset = int(query.partition("offset=")[2] or 0)
            body = answer.json()
            assert body["count"] == len(expected), (others, query)
            assert [e["id"] for e in body["results"]] == expected[offset:offset + 100], (others, query)
            if len(expected) > offset + 100:  # a count the page cannot tell: read exactly
                assert any("count(" in statement for statement, _plan in plans), plans
            for _statement, plan in plans:
                if engine.dialect.name == "sqlite":
                    _sqlite_range_plan(plan)
                else:
                    assert "Seq Scan on log_events" not in plan, plan


@BOTH
def test_events_of_a_time_range_answer_as_before_whatever_the_plan(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pages and counts through the range's index, and past the bound (FEW_IN_TIME_RANGE 0
    with another user's site: the join, as before), with the filters a range combines with."""
    from balsam.server.routes import events as events_route

    tc, engine = served
    with engine.connect() as conn:
        middle = conn.execute(sa.text("SELECT min(id) + 4000 FROM log_events")).scalar()
    for few in (None, 0):
        if few is not None:
            _another_users_site(engine)
            monkeypatch.setattr(events_route, "FEW_IN_TIME_RANGE", few, raising=False)  # (none before the fix)
        for query, lo, hi, state in (("limit=50", 3000, 3299, ""), ("limit=50&ordering=timestamp&offset=280", 3000, 3299, ""),
                                     ("limit=0", 3000, 3299, ""), ("limit=50&to_state=RUN_ERROR", 0, 10**6, "RUN_ERROR"),
                                     ("limit=50&from_state=RUNNING&to_state=RUN_DONE", 100, 600, "RUN_DONE"),
                                     ("limit=20", 5000, 4000, "")):
            body = tc.get(f"/events/?{query}{_range_query(lo, hi)}").json()
            expected = _expected_events(engine, lo, hi, state, newest_first="ordering" not in query)
            offset, limit = int(query.partition("offset=")[2] or 0), int(query.partition("limit=")[2].partition("&")[0])
            assert body["count"] == len(expected), (few, query)
            assert [e["id"] for e in body["results"]] == expected[offset:offset + limit], (few, query)
        # With id__gt (the events after one): the primary key may not serve the range's page.
        body = tc.get(f"/events/?limit=500&id__gt={middle}{_range_query(3000, 3299 + 12000)}").json()
        expected = [i for i in _expected_events(engine, 3000, 3299 + 12000) if i > middle]
        assert body["count"] == len(expected) and [e["id"] for e in body["results"]] == expected[:500], few


#: Dashboard Events pages of a time range: (range start and end in seconds from T0, to_state).
DASHBOARD_RANGES = [(3000, 3299, ""), (3000, 3899, "RUN_DONE"), (0, 10**6, ""), (None, 4000, ""), (0, 10**6, "RUN_ERROR")]


def _dashboard_range(lo: "int | None", hi: "int | None", state: str) -> str:
    return f"/dashboard/events?{_range_query(lo, hi)[1:]}" + (f"&to_state={state}" if state else "")


@BOTH
def test_the_dashboard_events_of_a_time_range(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's Events page (newest id first) of a time range: a range of more events than
    the bound (lowered to 500 so that these 9,000 events are many), on a one-user server, walked by
    id (SQLite read every event of a wide two-sided range and sorted them); a few events read
    through ix_log_events_timestamp and sorted, with another user's site too (without statistics
    the planner then read every job of the site and all their events first)."""
    from balsam.server.routes import events as events_route

    tc, engine = served
    monkeypatch.setattr(events_route, "FEW_IN_TIME_RANGE", 500, raising=False)  # (none before the fix)
    for lo, hi, state in DASHBOARD_RANGES[1:4]:
        answer, plans = _statements(engine, lambda: tc.get(_dashboard_range(lo, hi, state)))
        assert _dashboard_ids(answer.text) == _expected_events(engine, lo, hi, state, by_id=True)[:100], (lo, hi)
        for _statement, plan in plans:
            if engine.dialect.name == "sqlite":
                _sqlite_lookup_plan(plan)
                # Walked by id (or through the state's index): not the range's every event read and sorted.
                assert "ix_log_events_timestamp" not in plan, plan
    monkeypatch.undo()
    for others in (False, True):
        if others:
            _another_users_site(engine)
        for lo, hi, state in DASHBOARD_RANGES:
            expected = _expected_events(engine, lo, hi, state, by_id=True)
            answer, plans = _statements(engine, lambda: tc.get(_dashboard_range(lo, hi, state)))
            ids = _dashboard_ids(answer.text)
            assert ids == expected[:100], (others, lo, hi, state)
            older = re.search(r'<a href="([^"]+)" rel="next">', answer.text)
            if older:
                second, more_plans = _statements(engine, lambda: tc.get(older.group(1).replace("&amp;", "&")))
                assert _dashboard_ids(second.text) == expected[100:200], (others, lo, hi, state)
                plans += more_plans
            for _statement, plan in plans:
                if engine.dialect.name == "sqlite":  # (PostgreSQL's plans are its planner's, unchanged)
                    _sqlite_range_plan(plan)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_page_without_a_time_range_does_not_measure_the_bound(served: Any) -> None:
    """The bound of a time range (routes.events._time_bound: the ids' span, a min/max query on a
    one-user server) is measured only for a query with a range: pages without one (each SQLite
    ``GET /events/``) ran it too (0.1 ms of a 3 ms page)."""
    tc, engine = served

    def spans(query: str) -> list[str]:
        _answer, plans = _planned(engine, lambda: tc.get(f"/events/?{query}"), lambda statement: True, "nothing read")
        return [statement for statement, _plan in plans if re.search(r"max\(log_events\.id\)", statement)]

    assert spans(f"limit=100{_range_query(3000, 3299)}")  # with a range: measured (what this test looks for)
    for query in ("limit=100", "limit=100&to_state=RUN_ERROR", "limit=100&ordering=timestamp", "limit=0"):
        assert spans(query) == [], query


@SQLITE_BOTH
def test_the_count_alone_of_a_time_range_is_read_through_its_index(served: Any) -> None:
    """``limit=0`` (Balsam 0.7's ``.count()``) of a few events in a time range: counted through
    ix_log_events_timestamp, each event's job looked up, as a page's count is (it went through the
    join: without statistics every job of the site and all their events first); the same count."""
    tc, engine = served
    for others in (False, True):
        if others:
            _another_users_site(engine)
        for query, lo, hi, state in (("limit=0", 3000, 3299, ""), ("limit=0&to_state=RUN_DONE", 3000, 3899, "RUN_DONE")):
            answer, plans = _statements(engine, lambda: tc.get(f"/events/?{query}{_range_query(lo, hi)}"))
            assert answer.json() == {"count": len(_expected_events(engine, lo, hi, state)), "results": []}, (others, query)
            for statement, plan in plans:
                assert "count(" in statement, statement
                _sqlite_range_plan(plan)
