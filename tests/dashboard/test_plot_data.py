"""The dashboard's plot data on a known event log (SQLite and PostgreSQL), checked three ways: against
figures worked out by hand, against balsam.analytics run on the same events read through the REST
API (what the Python API does), and for per-user isolation."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import login  # noqa: E402

# In-process app (TestClient): the data check needs the test to write the event log into the database.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

T0 = dt.datetime(2024, 5, 1, 10, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def epoch(seconds: float) -> float:
    return at(seconds).timestamp()


#: (job, from, to, seconds after T0, data). Jobs: a1, a2, a3 at alice's site A; b1 at her site B;
#: x1 at bob's site X. Tags: a1, a2, b1, x1 have c=x; a3 has c=y.
EVENTS = [
    ("a1", "PREPROCESSED", "RUNNING", 0, {"num_nodes": 2}),
    ("x1", "PREPROCESSED", "RUNNING", 5, {"num_nodes": 8}),
    ("b1", "PREPROCESSED", "RUNNING", 10, {"num_nodes": 4}),
    ("x1", "RUNNING", "RUN_DONE", 20, {}),
    ("x1", "POSTPROCESSED", "JOB_FINISHED", 30, {}),
    ("b1", "RUNNING", "RUN_DONE", 40, {}),
    ("b1", "POSTPROCESSED", "JOB_FINISHED", 45, {}),
    ("a2", "PREPROCESSED", "RUNNING", 50, {"num_nodes": 1}),
    ("a3", "PREPROCESSED", "RUNNING", 60, {"num_nodes": 0.5}),
    ("a2", "RUNNING", "RUN_ERROR", 80, {"error": "boom"}),
    ("a2", "RUN_ERROR", "FAILED", 85, {}),
    ("a1", "RUNNING", "RUN_DONE", 100, {}),
    ("a1", "POSTPROCESSED", "JOB_FINISHED", 110, {}),
    ("a3", "RUNNING", "RUN_DONE", 200, {}),
    ("a3", "POSTPROCESSED", "JOB_FINISHED", 210, {}),
]
#: (site, nodes, state, start, end, filter_tags)
BATCH_JOBS = [
    ("A", 4, "finished", -10, 300, {}),
    ("A", 2, "running", 150, None, {}),
    ("A", 64, "pending_submission", None, None, {}),
    ("B", 8, "finished", 0, 50, {"c": "y"}),
    ("X", 16, "finished", 0, 100, {}),
]
NOW = 400  # seconds after T0: "now" for BatchJobs still running


@pytest.fixture
def known_log(database_url: str) -> Iterator[dict[str, Any]]:
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.auth import hash_password
    from balsam.server.settings import ServerSettings
    from balsam.server.tables import apps, batch_jobs, jobs, log_events, sites, users

    app = create_app(settings=ServerSettings(database_url=database_url, secret_key="plot-test-secret-0123456789-abcdefghijklmnop"),
                     create_tables_now=True)
    engine = app.state.engine
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for name in ("alice", "bob"):
            ids[name] = conn.execute(sa.insert(users).values(username=name, hashed_password=hash_password("pw-" + name),
                                                             date_joined=T0).returning(users.c.id)).scalar_one()
        site_owner = {"A": "alice", "B": "alice", "X": "bob"}
        for site, owner in site_owner.items():
            ids[site] = conn.execute(sa.insert(sites).values(
                owner_id=ids[owner], name=f"site-{site}", path=f"/sites/{site}", backfill_windows={}, queued_jobs={},
                optional_batch_job_params={}, allowed_projects=[], allowed_queues={}, transfer_locations={},
                last_refresh=T0, creation_date=T0).returning(sites.c.id)).scalar_one()
            ids["app" + site] = conn.execute(sa.insert(apps).values(
                site_id=ids[site], name="Sim", description="", serialized_class="", source_code="", parameters={},
                transfers={}).returning(apps.c.id)).scalar_one()
        for job, site, tag in (("a1", "A", "x"), ("a2", "A", "x"), ("a3", "A", "y"), ("b1", "B", "x"), ("x1", "X", "x")):
            ids[job] = conn.execute(sa.insert(jobs).values(
                site_id=ids[site], app_id=ids["app" + site], workdir=job, tags={"c": tag}, serialized_parameters="",
                data={}, num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, launch_params={},
                gpus_per_rank=0.0, node_packing_count=1, wall_time_min=0, parent_ids=[], state="JOB_FINISHED",
                pending_file_cleanup=False, serialized_return_value="", serialized_exception="", last_update=T0,
            ).returning(jobs.c.id)).scalar_one()
        conn.execute(sa.insert(log_events), [
            {"job_id": ids[job], "from_state": a, "to_state": b, "timestamp": at(s), "data": data}
            for job, a, b, s, data in EVENTS
        ])
        conn.execute(sa.insert(batch_jobs), [
            {"site_id": ids[site], "project": "p", "queue": "q", "optional_params": {}, "num_nodes": nodes,
             "wall_time_min": 10, "job_mode": "mpi", "partitions": None, "filter_tags": tags, "state": state,
             "status_info": {}, "start_time": None if start is None else at(start),
             "end_time": None if end is None else at(end)}
            for site, nodes, state, start, end, tags in BATCH_JOBS
        ])
    with TestClient(app) as client:
        yield {"client": client, "ids": ids, "app": app}


def _plot(client: Any, user: str, **params: Any) -> dict[str, Any]:
    client.cookies.clear()
    assert login(client, user, "pw-" + user).status_code == 303
    answer = client.get("/dashboard/plots/data", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _frozen_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plots' "now" (BatchJobs still running hold their nodes until then) at T0 + NOW."""
    from balsam.server.dashboard import plots

    real = plots.plot_data

    def fixed(conn: Any, user_id: int, q: Any, **kw: Any) -> dict:
        kw.setdefault("now", at(NOW))
        return real(conn, user_id, q, **kw)

    monkeypatch.setattr("balsam.server.dashboard.views.plot_data", fixed)


def test_plot_data_matches_the_hand_worked_figures(known_log: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _frozen_now(monkeypatch)
    client, ids = known_log["client"], known_log["ids"]
    site_a = _plot(client, "alice", site_id=ids["A"])
    assert site_a["throughput"] == {"t": [epoch(110), epoch(210)], "finished": [1, 2]}
    util = site_a["utilization"]
    # busy: a1 +2 @0, a2 +1 @50, a3 +0.5 @60, a2 -1 @80, a1 -2 @100, a3 -0.5 @200
    # held: 4 nodes from -10 to 300, 2 nodes from 150 to "now" (400); the pending BatchJob never started
    expected = {-10: (0, 4), 0: (2, 4), 50: (3, 4), 60: (3.5, 4), 80: (2.5, 4), 100: (0.5, 4), 150: (0.5, 6),
                200: (0, 6), 300: (0, 2), NOW: (0, 0)}
    assert util["t"] == [epoch(s) for s in expected]
    assert util["busy"] == [b for b, _ in expected.values()]
    assert util["available"] == [a for _, a in expected.values()]
    assert site_a["summary"]["finished"] == 2 and site_a["summary"]["peak_busy"] == 3.5
    assert site_a["summary"]["available_now"] == 0 and site_a["summary"]["busy_now"] == 0

    # a tag filter across both of alice's sites: a1 and b1 finished; B's BatchJob only runs c=y jobs
    tagged = _plot(client, "alice", tags="c:x")
    assert tagged["throughput"] == {"t": [epoch(45), epoch(110)], "finished": [1, 2]}
    busy = dict(zip(tagged["utilization"]["t"], tagged["utilization"]["busy"]))
    assert [busy[epoch(s)] for s in (0, 10, 40, 50, 80, 100)] == [2, 6, 2, 3, 2, 0]
    held = dict(zip(tagged["utilization"]["t"], tagged["utilization"]["available"]))
    assert held[epoch(0)] == 4 and held[epoch(10)] == 4  # B's 8 nodes serve c=y only


def test_plot_data_is_what_the_analytics_functions_say(known_log: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same events read through GET /events/ (as EventLog.objects does) and fed to balsam.analytics."""
    from balsam.analytics import align_steps, available_nodes, batch_jobs_serving, throughput_report, utilization_report
    from balsam.serialization import parse_datetime

    _frozen_now(monkeypatch)
    client, ids = known_log["client"], known_log["ids"]
    token = client.post("/auth/password/login", data={"username": "alice", "password": "pw-alice"}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    def api_events(**params: Any) -> list[SimpleNamespace]:
        rows = client.get("/events/", params=params, headers=headers).json()["results"]
        return [SimpleNamespace(**{**r, "timestamp": parse_datetime(r["timestamp"])}) for r in rows]

    def api_batch_jobs(**params: Any) -> list[SimpleNamespace]:
        rows = client.get("/batch-jobs/", params=params, headers=headers).json()["results"]
        return [SimpleNamespace(**{**r, "start_time": r["start_time"] and parse_datetime(r["start_time"]),
                                   "end_time": r["end_time"] and parse_datetime(r["end_time"])}) for r in rows]

    for selection in ({"site_id": ids["A"]}, {"site_id": ids["B"]}, {"tags": "c:x"}, {"tags": "c:y"}, {}):
        plotted = _plot(client, "alice", **selection)
        events = api_events(**selection)
        done_t, done_y = throughput_report(events)
        assert plotted["throughput"] == {"t": [t.timestamp() for t in done_t], "finished": done_y}, selection
        busy_t, busy_y = utilization_report(events)
        bj_filter = {"site_id": selection["site_id"]} if "site_id" in selection else {}
        tags = dict([selection["tags"].split(":")]) if "tags" in selection else None
        avail_t, avail_y = available_nodes(
            [b for b in batch_jobs_serving(api_batch_jobs(**bj_filter), tags) if b.start_time is not None], now=at(NOW))
        axis, (busy, avail) = align_steps((busy_t, busy_y), (avail_t, avail_y))
        assert plotted["utilization"] == {"t": [t.timestamp() for t in axis], "busy": busy, "available": avail}, selection


def test_another_user_sees_only_their_own_figures(known_log: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _frozen_now(monkeypatch)
    client, ids = known_log["client"], known_log["ids"]
    bob = _plot(client, "bob")
    assert bob["throughput"] == {"t": [epoch(30)], "finished": [1]}
    assert max(bob["utilization"]["busy"]) == 8 and max(bob["utilization"]["available"]) == 16
    assert _plot(client, "bob", site_id=ids["A"])["throughput"]["t"] == []
    assert _plot(client, "alice", site_id=ids["X"])["utilization"]["t"] == []
