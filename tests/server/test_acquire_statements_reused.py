"""An acquire's statements are built once per shape of request and reused with each request's
values (sessions_logic._acquire_plan): building them and their SQLAlchemy cache keys anew was about
a third of an acquire's CPU. Shown here: the lease statement a launcher's acquires execute is the
same object from one acquire to the next while their numbers change, and each acquire still leases
by its own values (wall time, nodes, GPUs, apps, how many, tags), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import collections
import re
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from balsam.models import SessionAcquire
from balsam.server import sessions_logic
from balsam.server.tables import jobs
from server_testlib import client_with_session

SECRET = "h9-acquire-plans-secret-0123456789-abcdefghijklmn"


def _make_jobs(client: Any, app_id: int, specs: list[dict]) -> list[int]:
    body = [{"app_id": app_id, "workdir": f"w/{i}", **spec} for i, spec in enumerate(specs)]
    resp = client.post("/jobs/", json=body)
    assert resp.status_code == 201, resp.text
    ids = [job["id"] for job in resp.json()]
    resp = client.patch("/jobs/", json=[{"id": jid, "state": "PREPROCESSED"} for jid in ids])
    assert resp.status_code == 200, resp.text
    return ids


def test_acquires_reuse_their_statements_and_lease_by_their_own_values(database_url: str) -> None:
    with client_with_session(database_url, SECRET) as s:
        client, session, app_id = s["client"], s["session"], s["app_id"]
        other_app = client.post("/apps/", json={"site_id": s["site_id"], "name": "B", "serialized_class": "",
                                                "source_code": "", "parameters": {}, "transfers": {},
                                                "description": ""}).json()["id"]
        short, mid, long_, wide, gpu, tagged_x, tagged_y = _make_jobs(client, app_id, [
            {"wall_time_min": 10}, {"wall_time_min": 30}, {"wall_time_min": 60}, {"wall_time_min": 5, "num_nodes": 2},
            {"wall_time_min": 5, "gpus_per_rank": 1}, {"wall_time_min": 5, "tags": {"c": "x"}},
            {"wall_time_min": 5, "tags": {"c": "y"}},
        ])
        [b_job] = _make_jobs(client, other_app, [{"wall_time_min": 5}])

        leases: list[Any] = []

        def note(_conn: Any, clauseelement: Any, *_args: Any) -> None:
            if isinstance(clauseelement, sa.Update) and clauseelement.table is jobs:
                leases.append(clauseelement)

        sa.event.listen(s["app"].state.engine, "before_execute", note)

        def acquire(**spec: Any) -> list[int]:
            resp = client.post(f"/sessions/{session}", json={"states": ["PREPROCESSED", "RESTART_READY"], **spec})
            assert resp.status_code == 200, resp.text
            return sorted(job["id"] for job in resp.json())

        launcher = {"max_nodes_per_job": 1, "max_gpus_per_node": 0, "app_ids": [app_id]}
        # One shape, its numbers changing (the wall time left, how many jobs): one statement.
        assert acquire(max_num_jobs=1, max_wall_time_min=20, **launcher) == [short]  # in id order
        assert acquire(max_num_jobs=1, max_wall_time_min=20, **launcher) == [tagged_x]
        assert acquire(max_num_jobs=5, max_wall_time_min=20, **launcher) == [tagged_y]
        assert acquire(max_num_jobs=5, max_wall_time_min=40, **launcher) == [mid]
        assert len(leases) == 4 and all(lease is leases[0] for lease in leases), leases
        # Other values of the same shape: more nodes and GPUs, the other app.
        assert acquire(max_num_jobs=5, max_wall_time_min=40, max_nodes_per_job=2, max_gpus_per_node=1,
                       app_ids=[app_id]) == [wide, gpu]
        assert acquire(max_num_jobs=5, max_wall_time_min=40, max_nodes_per_job=1, max_gpus_per_node=0,
                       app_ids=[other_app]) == [b_job]
        assert all(lease is leases[0] for lease in leases)
        assert acquire(max_num_jobs=5, max_wall_time_min=90, **launcher) == [long_]
        assert acquire(max_num_jobs=5, **launcher) == []


def test_the_tags_of_an_acquire_are_its_own(database_url: str) -> None:
    """Tags are part of a plan's shape (written into its statement): each tag value its own plan."""
    with client_with_session(database_url, SECRET) as s:
        client, session = s["client"], s["session"]
        x1, y1, x2, y2 = _make_jobs(client, s["app_id"], [{"tags": {"c": "x"}}, {"tags": {"c": "y"}},
                                                          {"tags": {"c": "x"}}, {"tags": {"c": "y"}}])

        def acquire(tags: dict) -> list[int]:
            resp = client.post(f"/sessions/{session}", json={"max_num_jobs": 1, "filter_tags": tags})
            assert resp.status_code == 200, resp.text
            return [job["id"] for job in resp.json()]

        assert acquire({"c": "y"}) == [y1]
        assert acquire({"c": "x"}) == [x1]
        assert acquire({"c": "y"}) == [y2]
        assert acquire({"c": "x"}) == [x2]
        assert acquire({"c": "x"}) == []


def test_a_packing_acquire_leases_the_jobs_it_chose(database_url: str) -> None:
    """mpi mode's first fit (``max_aggregate_nodes``) leases the ids it chose, in its order."""
    with client_with_session(database_url, SECRET) as s:
        client, session = s["client"], s["session"]
        two, one_a, three, one_b = _make_jobs(client, s["app_id"], [{"num_nodes": 2}, {"num_nodes": 1},
                                                                    {"num_nodes": 3}, {"num_nodes": 1}])
        for expected in ([one_a, one_b, two], [three]):
            resp = client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "max_aggregate_nodes": 4})
            assert resp.status_code == 200, resp.text
            assert [job["id"] for job in resp.json()] == expected


def _unique_tags() -> dict:
    """Tags no other acquire in this process sends: a shape of its own, whose plan is built here
    (plans are cached per process, so another test's acquire could have built it otherwise)."""
    return {"shape": uuid.uuid4().hex}


def test_a_plan_is_its_sessions_own_batch_job_or_none(database_url: str) -> None:
    """A session with a BatchJob and one without, acquiring one shape in turn: each leased job
    carries its own session's BatchJob (the BatchJob is part of the plan's shape)."""
    with client_with_session(database_url, SECRET) as s:
        client, plain, tags = s["client"], s["session"], _unique_tags()
        bj = client.post("/batch-jobs/", json={"site_id": s["site_id"], "project": "p", "queue": "q", "num_nodes": 1,
                                               "wall_time_min": 10, "job_mode": "mpi"})
        assert bj.status_code == 201, bj.text
        with_bj = client.post("/sessions/", json={"site_id": s["site_id"], "batch_job_id": bj.json()["id"]}).json()["id"]
        ids = _make_jobs(client, s["app_id"], [{"tags": tags}] * 4)
        for session, expected_bj, jid in zip([plain, with_bj, plain, with_bj], [None, bj.json()["id"]] * 2, ids):
            resp = client.post(f"/sessions/{session}", json={"max_num_jobs": 1, "filter_tags": tags})
            assert resp.status_code == 200, resp.text
            assert [job["id"] for job in resp.json()] == [jid], resp.text
            assert client.get(f"/jobs/{jid}").json()["batch_job_id"] == expected_bj, (session, jid)


def test_serial_only_is_part_of_a_plans_shape(database_url: str) -> None:
    """serial_only, all else the same: the serial acquire leases only single-rank jobs, the next
    acquire without it any job."""
    with client_with_session(database_url, SECRET) as s:
        client, session, tags = s["client"], s["session"], _unique_tags()
        multi, single = _make_jobs(client, s["app_id"], [{"tags": tags, "ranks_per_node": 2}, {"tags": tags}])

        def acquire(serial_only: bool) -> list[int]:
            resp = client.post(f"/sessions/{session}", json={"max_num_jobs": 1, "filter_tags": tags,
                                                             "serial_only": serial_only})
            assert resp.status_code == 200, resp.text
            return [job["id"] for job in resp.json()]

        assert acquire(True) == [single]
        assert acquire(False) == [multi]


# PostgreSQL only: SQLite takes no row locks (its writes are serialized).
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_an_acquire_after_a_waiting_look_leases_skip_locked(database_url: str) -> None:
    """On PostgreSQL a waiting acquire's look (``Prefer: wait``) reads its candidates without a
    lock; the acquire after it, of the same shape, takes them FOR UPDATE SKIP LOCKED (the lock is
    part of a plan's shape): without it two launchers could lease one job."""
    with client_with_session(database_url, SECRET) as s:
        client, session, tags = s["client"], s["session"], _unique_tags()
        [jid] = _make_jobs(client, s["app_id"], [{"tags": tags}])
        statements: list[str] = []

        def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(" ".join(statement.split()))

        sa.event.listen(s["app"].state.engine, "before_cursor_execute", note)
        resp = client.post(f"/sessions/{session}", json={"max_num_jobs": 1, "filter_tags": tags},
                           headers={"Prefer": "wait=1"})
        assert resp.status_code == 200 and [job["id"] for job in resp.json()] == [jid], resp.text
        leases = [st for st in statements if st.startswith("UPDATE jobs") and "FROM jobs" in st]
        assert leases, statements
        assert all(re.search(r"FOR UPDATE (OF \S+ )?SKIP LOCKED", st) for st in leases), leases


def test_the_plan_cache_evicts_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher's plan, used on every acquire, stays while shapes used once (users' tags) come
    and go: a hit moves its plan to the end, the first is evicted."""
    monkeypatch.setattr(sessions_logic, "_ACQUIRE_PLANS", collections.OrderedDict())
    monkeypatch.setattr(sessions_logic, "MAX_ACQUIRE_PLANS", 2)

    def plan(tag: str) -> Any:
        return sessions_logic._acquire_plan(SessionAcquire(max_num_jobs=1, filter_tags={"c": tag}), "sqlite",
                                            lock=True, batch_job=False)

    launchers = plan("launcher")
    plan("once-1")
    assert plan("launcher") is launchers  # a hit
    plan("once-2")  # evicts once-1, used less recently than the launcher's
    assert plan("launcher") is launchers
    assert len(sessions_logic._ACQUIRE_PLANS) == 2
