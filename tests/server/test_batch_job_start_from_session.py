"""A BatchJob's start_time from its launcher's first Session (SQLite and PostgreSQL, real servers).

The site agent records start_time from the scheduler's own start where its poll gives one, else its
sighting of the job running: a whole ``scheduler.sync_period`` late or more (Cobalt gives no start;
an agent that was down). The dashboard and ``balsam.analytics.first_runs_query`` count a run as the
allocation's only from ``FIRST_RUN_LOOKBACK`` (2 min) before start_time, so an allocation whose
start_time was a late sighting lost its early runs, and its nodes counted as held only from the
sighting. Before: the server never recorded a start itself. Now the create of a Session with a
``batch_job_id`` makes start_time no later than then (set, lowered, never raised), and a PATCH never
moves a stored start_time later: the agent's sighting, PATCHed because its copy was read before the
Session, no longer overwrites the Session's earlier start. Times are made by the tests, not slept.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api, wait_blocked_by

from balsam.server.admin import Admin, AdminError

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import logged_in_client  # noqa: E402  (tests/dashboard)

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def _utc(text: "str | None") -> "dt.datetime | None":
    """A time of the API's answers (UTC, written without a zone) as an aware one."""
    return None if text is None else dt.datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=dt.timezone.utc)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat()


def _batch_job(api: Api, site_id: int, state: str = "queued", **fields: Any) -> dict:
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site_id, "project": "p", "queue": "q", "num_nodes": 2,
                                                   "wall_time_min": 30, "job_mode": "mpi"})
    if state != "pending_submission" or fields:
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={**({"state": state} if state != "pending_submission" else {}),
                                                       **fields})
    return bj


def _start(api: Api, bj_id: int) -> "dt.datetime | None":
    return _utc(api.ok("GET", f"/batch-jobs/{bj_id}")["start_time"])


def _open_session(api: Api, site_id: int, bj_id: int) -> tuple[dt.datetime, dt.datetime]:
    """A launcher's Session of ``bj_id``: (client time before, client time after) its create."""
    before = dt.datetime.now(dt.timezone.utc)
    api.ok("POST", "/sessions/", 201, json={"site_id": site_id, "batch_job_id": bj_id})
    return before, dt.datetime.now(dt.timezone.utc)


#: The server's clock (SQLite: its process's; PostgreSQL: the database's) against the test's, one host.
SLACK = dt.timedelta(seconds=2)


def test_a_session_sets_a_missing_start_and_lowers_a_late_one_but_keeps_an_earlier(api: Api) -> None:
    site = api.site()
    missing = _batch_job(api, site["id"])
    before, after = _open_session(api, site["id"], missing["id"])
    start = _start(api, missing["id"])
    assert start is not None and before - SLACK <= start <= after + SLACK
    read = api.ok("GET", f"/batch-jobs/{missing['id']}")
    assert read["state"] == "queued"  # the state stays the agent's (sessions_logic says why)
    # A second launcher of the allocation, later: the first start stays.
    _open_session(api, site["id"], missing["id"])
    assert _start(api, missing["id"]) == start

    # A start recorded later than the Session (an agent whose clock runs ahead): lowered.
    late = _batch_job(api, site["id"], state="running",
                      start_time=_iso(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)))
    before, after = _open_session(api, site["id"], late["id"])
    start = _start(api, late["id"])
    assert start is not None and before - SLACK <= start <= after + SLACK

    # The scheduler's own start, earlier than the launcher's Session: kept.
    scheduler_start = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=3)
    early = _batch_job(api, site["id"], state="running", start_time=_iso(scheduler_start))
    _open_session(api, site["id"], early["id"])
    assert _start(api, early["id"]) == scheduler_start


def test_a_later_start_time_patch_keeps_the_sessions_start(api: Api) -> None:
    site = api.site()
    bj = _batch_job(api, site["id"])
    _open_session(api, site["id"], bj["id"])
    start = _start(api, bj["id"])
    assert start is not None
    # The agent's sighting, from its copy read before the Session (no start there): the bulk PATCH
    # it sends, and the single update of a Balsam 0.7 client; each answers what is stored.
    sighting = start + dt.timedelta(minutes=10)
    [answer] = api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "state": "running", "start_time": _iso(sighting)}])
    assert answer["state"] == "running" and _utc(answer["start_time"]) == start
    answer = api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": _iso(sighting), "status_info": {"a": "b"}})
    assert _utc(answer["start_time"]) == start and answer["status_info"] == {"a": "b"}
    # A client re-sending a copy read before the start was known (null) does not erase it.
    assert _utc(api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": None})["start_time"]) == start
    # An earlier start (the scheduler's history, once the job ended) is stored.
    history = start - dt.timedelta(seconds=30)
    [answer] = api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "start_time": _iso(history)}])
    assert _utc(answer["start_time"]) == history == _start(api, bj["id"])


def test_a_launcher_credentials_session_records_its_own_batch_jobs_start_only(api: Api) -> None:
    site = api.site()
    own, other = _batch_job(api, site["id"]), _batch_job(api, site["id"])
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600,
                                                           "batch_job_id": own["id"]})
    launcher = {"Authorization": f"Bearer {cred['access_token']}"}
    refused = api.http.post("/sessions/", headers=launcher, json={"site_id": site["id"], "batch_job_id": other["id"]})
    assert refused.status_code == 403, refused.text
    assert _start(api, other["id"]) is None  # rolled back with the refused create
    made = api.http.post("/sessions/", headers=launcher, json={"site_id": site["id"]})  # its BatchJob implied
    assert made.status_code == 201 and made.json()["batch_job_id"] == own["id"], made.text
    assert _start(api, own["id"]) is not None
    # A Session naming an ended BatchJob (a user token; its launcher's credential is revoked) says
    # nothing of when it started.
    ended = _batch_job(api, site["id"], state="running")
    api.ok("PUT", f"/batch-jobs/{ended['id']}", json={"state": "finished"})
    _open_session(api, site["id"], ended["id"])
    assert _start(api, ended["id"]) is None


@pytest.mark.postgres
def test_a_session_created_while_the_agents_patch_holds_the_row_still_lowers_it(
        _live_server_pg_obj: Any, register: Any) -> None:
    """PostgreSQL: the agent's late sighting is in flight (its transaction holds the BatchJob row,
    start_time written, not committed) when the launcher's Session is created: the create's UPDATE
    waits for it, then re-evaluates its condition on the committed row and lowers start_time."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    try:
        site = api.site()
        bj = _batch_job(api, site["id"])
        sighting = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
        agent, look = engine.connect(), engine.connect()
        tx = agent.begin()
        agent.execute(sa.text("UPDATE batch_jobs SET start_time = :t, state = 'running' WHERE id = :id"),
                      {"t": sighting, "id": bj["id"]})
        pid = agent.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        result: dict[str, Any] = {}
        create = threading.Thread(target=lambda: result.update(times=_open_session(api, site["id"], bj["id"])))
        create.start()
        try:
            wait_blocked_by(look, pid, 15, "the Session create never waited for the BatchJob row")
        finally:
            tx.commit()
            create.join(60)
        before, after = result["times"]
        start = _start(api, bj["id"])
        assert start is not None and before - SLACK <= start <= after + SLACK < sighting
        agent.close()
        look.close()
    finally:
        engine.dispose()
        api.close()


@pytest.mark.postgres
def test_the_agents_patch_waiting_for_a_session_create_keeps_the_sessions_start(
        _live_server_pg_obj: Any, register: Any) -> None:
    """PostgreSQL, the other order, both through the real routes: a launcher's Session create holds
    the BatchJob row (its start_time UPDATE done, uncommitted) while the agent's bulk PATCH (state
    running, its later sighting) waits for the row; the create commits first, and the PATCH,
    reading the row under its lock, keeps the Session's start. Deterministic: a side connection
    holds the launcher's credential, so the create stops right after its UPDATE (at its credential
    FOR SHARE, the lock order's next step) until the PATCH waits behind it."""
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    holder, look = engine.connect(), engine.connect()
    tx = None
    threads: list[threading.Thread] = []
    try:
        site = api.site()
        bj = _batch_job(api, site["id"])
        cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600,
                                                               "batch_job_id": bj["id"]})
        launcher = {"Authorization": f"Bearer {cred['access_token']}"}
        assert api.http.get("/sites/", headers=launcher).status_code == 200  # its token checked and cached
        tx = holder.begin()
        holder.execute(sa.text("SELECT id FROM credentials WHERE id = :id FOR UPDATE"), {"id": cred["id"]})
        hpid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        out: dict[str, Any] = {}

        def create() -> None:
            out["before"] = dt.datetime.now(dt.timezone.utc)
            out["create"] = api.http.post("/sessions/", headers=launcher, json={"site_id": site["id"]})
            out["after"] = dt.datetime.now(dt.timezone.utc)

        threads.append(threading.Thread(target=create))
        threads[-1].start()
        wait_blocked_by(look, hpid, 15, "the Session create never waited for its credential")
        look.rollback()
        [cpid] = look.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                              {"pid": hpid}).scalars().all()
        sighting = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
        threads.append(threading.Thread(target=lambda: out.update(patch=api.http.patch(
            "/batch-jobs/", json=[{"id": bj["id"], "state": "running", "start_time": _iso(sighting)}]))))
        threads[-1].start()
        wait_blocked_by(look, cpid, 15, "the agent's PATCH never waited for the Session create's BatchJob row")
        tx.rollback()  # the credential as it was: the create goes on and commits, then the PATCH
        for thread in threads:
            thread.join(60)
        assert out["create"].status_code == 201, out["create"].text
        assert out["patch"].status_code == 200, out["patch"].text
        [answer] = out["patch"].json()
        start = _start(api, bj["id"])
        assert start is not None and out["before"] - SLACK <= start <= out["after"] + SLACK < sighting
        assert answer["state"] == "running" and _utc(answer["start_time"]) == start
    finally:
        if tx is not None and tx.is_active:
            tx.rollback()
        for thread in threads:
            thread.join(60)
        holder.close()
        look.close()
        engine.dispose()
        api.close()


@pytest.fixture
def env(db_kind: str, request: pytest.FixtureRequest) -> Any:
    """The Python API as a fresh user of the same live server as ``api`` (SQLite, PostgreSQL)."""
    return request.getfixturevalue("balsam_env" if db_kind == "sqlite" else "balsam_env_pg")


def test_runs_of_an_allocation_seen_started_late_count_from_its_sessions_start(env: Any, tmp_path: Path) -> None:
    """End to end: two allocations whose agent saw them running 5 minutes after their launchers
    opened their Sessions and ran jobs (one launcher's clock 30 s behind the server's). The
    analytics and the dashboard count their nodes as held from the Sessions' start, and the run
    stamped before it is the first run of its BatchJob."""
    from balsam.analytics import available_nodes, first_runs_query, step_at
    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job, Session, Site

    site = Site.objects.create(name=f"site-{tmp_path.name[-8:]}", path=str(tmp_path))
    site_name = site.name

    class Sleeper(ApplicationDefinition):
        site = site_name
        command_template = "sleep 1"

    Sleeper.sync()
    submitted = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=20)
    nodes = {"in_step": 2, "behind": 4}
    runs: dict[str, dt.datetime] = {}
    bjs: dict[str, Any] = {}
    # "behind" first: its run, 30 s before its Session, is before "in_step" started, whatever the pace.
    for name, clock_offset in (("behind", dt.timedelta(seconds=-30)), ("in_step", dt.timedelta(0))):
        bj = BatchJob.objects.create(site_id=site.id, num_nodes=nodes[name], wall_time_min=30, job_mode="serial",
                                     queue="local", project="local")
        bj.state = "queued"
        bj.status_info = {"submit_time": submitted.isoformat()}
        bj.save()  # the agent's copy: queued, no start
        job = Sleeper.submit(workdir=f"w/{name}")
        job.state = "PREPROCESSED"
        job.save()
        session = Session.objects.create(site_id=site.id, batch_job_id=bj.id)
        [leased] = session.acquire_jobs(max_num_jobs=1, app_ids={job.app_id})
        # The launcher stamps its run on its own clock, right after its Session was opened.
        runs[name] = dt.datetime.now() + clock_offset
        leased.state, leased.state_timestamp, leased.state_data = "RUNNING", runs[name], {"num_nodes": 1}
        Job.objects.bulk_update([leased])
        # The agent's sighting, 5 minutes after (a sync_period, or an agent that was down), from its
        # copy read before the Session: a Balsam 0.7 client's save().
        bj.state, bj.start_time = "running", dt.datetime.now() + dt.timedelta(minutes=5)
        bj.save()
        bjs[name] = bj
    rows = list(BatchJob.objects.filter(site_id=site.id))

    first = first_runs_query(rows, EventLog)
    assert bjs["behind"].id in first, first
    assert abs((first[bjs["behind"].id] - runs["behind"]).total_seconds()) < 1
    times, held = available_nodes(rows, first_runs=first)
    assert step_at(times, held, runs["behind"]) == nodes["behind"]
    assert step_at(times, held, runs["in_step"]) == nodes["behind"] + nodes["in_step"]

    client = logged_in_client(env.url, env.username, env.password)
    try:
        answer = client.get("/dashboard/plots/data", params={"site_id": site.id})
    finally:
        client.close()
    assert answer.status_code == 200, answer.text
    util = answer.json()["utilization"]
    dash_times = [dt.datetime.fromtimestamp(t) for t in util["t"]]
    assert step_at(dash_times, util["available"], runs["behind"]) == nodes["behind"]
    assert step_at(dash_times, util["available"], runs["in_step"]) == nodes["behind"] + nodes["in_step"]


@pytest.fixture
def database_url_of_api(db_kind: str, request: pytest.FixtureRequest) -> str:
    """The database of the live server ``api`` talks to (SQLite, PostgreSQL)."""
    return request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj").database_url


def test_a_wrong_start_time_is_replaced_or_cleared_by_the_administrator(
        api: Api, database_url_of_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo's early date stays through the API (a later or null start_time is not stored, the
    answer shows the stored one); ``balsam server set-start-time`` on the database replaces or
    clears it. Before: no way at all (the command did not exist)."""
    import os

    from click.testing import CliRunner

    from balsam.cli import main

    for key in [k for k in os.environ if k.startswith("BALSAM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BALSAM_DATABASE_URL", database_url_of_api)

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["server", "set-start-time", *args], catch_exceptions=False)

    site = api.site()
    bj = _batch_job(api, site["id"])
    typo = dt.datetime(2016, 12, 6, 22, 0, tzinfo=dt.timezone.utc)
    meant = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=5)
    assert _utc(api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": _iso(typo)})["start_time"]) == typo
    # Through the API the typo stays: the answer shows what is kept.
    assert _utc(api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"start_time": _iso(meant)})["start_time"]) == typo

    done = run(str(bj["id"]), _iso(meant))
    assert done.exit_code == 0, done.output
    assert f"BatchJob {bj['id']} (site {site['id']}, queued): start_time 2016-12-06 22:00:00 UTC -> " \
           f"{meant:%Y-%m-%d %H:%M:%S} UTC" in done.output
    assert _start(api, bj["id"]) == meant
    # Written without a zone: UTC, as the API reads it.
    naive = meant - dt.timedelta(minutes=1)
    assert run(str(bj["id"]), naive.replace(tzinfo=None).isoformat()).exit_code == 0
    assert _start(api, bj["id"]) == naive

    cleared = run(str(bj["id"]), "--clear")
    assert cleared.exit_code == 0 and "-> none" in cleared.output, cleared.output
    assert _start(api, bj["id"]) is None
    before, after = _open_session(api, site["id"], bj["id"])  # recorded again as at first
    start = _start(api, bj["id"])
    assert start is not None and before - SLACK <= start <= after + SLACK

    # Refused with one line, nothing changed: a start after now, after its end, no such BatchJob,
    # neither or both of WHEN and --clear, a WHEN that is no time.
    future = run(str(bj["id"]), _iso(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)))
    assert future.exit_code == 1 and "is later than now" in future.output, future.output
    ended = _batch_job(api, site["id"], state="running", start_time=_iso(meant))
    api.ok("PUT", f"/batch-jobs/{ended['id']}", json={"state": "finished", "end_time": _iso(meant + dt.timedelta(minutes=1))})
    late = run(str(ended["id"]), _iso(meant + dt.timedelta(minutes=2)))
    assert late.exit_code == 1 and "later than its end_time" in late.output, late.output
    assert _start(api, ended["id"]) == meant and _start(api, bj["id"]) == start
    # A BatchJob that may have run is not cleared: nothing would record its start again (the agent
    # sends one only on its move to running, its launcher opens no new Session). Before: cleared,
    # and empty for the rest of its run (for good once ended).
    running = _batch_job(api, site["id"], state="running", start_time=_iso(meant))
    for started, state in ((running, "running"), (ended, "finished")):
        refused = run(str(started["id"]), "--clear")
        assert refused.exit_code == 1 and f"is {state}: its start_time cannot be cleared" in refused.output, \
            refused.output
        assert _start(api, started["id"]) == meant
    # Nor set before 2000-01-01 (a typo's year 1, or 1970). Before: stored.
    for ancient in ("0001-01-01T00:00:00", "1970-01-01T00:00:00Z"):
        refused = run(str(bj["id"]), ancient)
        assert refused.exit_code == 1 and "earlier than 2000-01-01" in refused.output, refused.output
    assert _start(api, bj["id"]) == start
    missing = run("2000000000", _iso(meant))
    assert missing.exit_code == 1 and "no BatchJob 2000000000" in missing.output, missing.output
    assert run(str(bj["id"])).exit_code == 2 and run(str(bj["id"]), _iso(meant), "--clear").exit_code == 2
    garbage = run(str(bj["id"]), "yesterday")
    assert garbage.exit_code == 2 and "ISO-8601" in garbage.output, garbage.output


def test_a_later_start_time_not_stored_is_logged_once_at_info(caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored start is kept silently no longer: the server logs the first such request of its
    process at INFO (naming the command that replaces a wrong one), the others at DEBUG; a null or
    the stored value re-sent (a client re-sending its copy) is not logged."""
    import logging
    from types import SimpleNamespace

    from balsam.server.routes import batch_jobs as routes

    monkeypatch.setattr(routes, "_start_kept_logged", False)
    stored = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    current = {1: SimpleNamespace(start_time=stored), 2: SimpleNamespace(start_time=stored)}
    with caplog.at_level(logging.DEBUG, logger=routes.__name__):
        for sent in (None, stored, stored + dt.timedelta(hours=1), stored + dt.timedelta(hours=2)):
            patches = {1: {"start_time": sent}}
            routes._keep_earliest_start(current, patches)
            assert patches == {1: {}}
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == [logging.INFO, logging.DEBUG], levels
    assert "BatchJob 1: start_time 2026-01-01T01:00:00+00:00 sent, 2026-01-01T00:00:00+00:00 kept" in levels[0][1]
    assert "balsam server set-start-time" in levels[0][1]


def test_ordering_by_start_time_lists_never_started_batch_jobs_last_and_first_reversed(api: Api) -> None:
    """``ordering=start_time``: BatchJobs without a start last; ``-start_time``: first (Balsam 0.7
    on PostgreSQL). Before, SQLite listed them at the other end each time."""
    site = api.site()
    early, late = (dt.datetime(2026, month, 1, tzinfo=dt.timezone.utc) for month in (1, 6))
    names = {}
    for name, start in (("none-1", None), ("late", late), ("none-2", None), ("early", early)):
        bj = _batch_job(api, site["id"], **({"start_time": _iso(start)} if start else {}))
        names[bj["id"]] = name

    def listed(ordering: str) -> list[str]:
        page = api.ok("GET", "/batch-jobs/", params={"site_id": site["id"], "ordering": ordering})
        return [names[bj["id"]] for bj in page["results"]]

    assert listed("start_time") == ["early", "late", "none-1", "none-2"]
    assert listed("-start_time") == ["none-1", "none-2", "late", "early"]


def test_the_start_of_a_requeued_batch_job_cannot_be_cleared(_live_server_obj: Any, register: Any) -> None:
    """A requeued BatchJob is queued again but has run: start_time keeps its first start, and a
    clear would let the agent record the next run's start as the allocation's first."""
    api = Api(_live_server_obj.url, register)
    admin = Admin(_live_server_obj.database_url)
    try:
        site = api.site()
        bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                        "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"})
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "running", "start_time": "2026-01-01T00:00:00Z"})
        # What the agent sends for a requeue (scheduler._record_requeue).
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "queued",
                                                       "status_info": {"requeue_count": "1", "requeue_time": "x"}})
        with pytest.raises(AdminError, match="requeued"):
            admin.set_batch_job_start(bj["id"], None)
        assert api.ok("GET", f"/batch-jobs/{bj['id']}")["start_time"] is not None
    finally:
        admin.close()
        api.close()
