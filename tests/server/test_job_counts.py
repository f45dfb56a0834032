"""The trigger-kept job counters (migration 0003) agree with a GROUP BY over the jobs after every kind
of change the server makes: bulk create (with parents), bulk and filtered state changes, children
released by their parents, deletes, and cascades from deleting an app or a site; on PostgreSQL also
before and after the deltas are folded, and under concurrent bulk updates (no deadlock, no drift)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client


SECRET = "job-counts-test-secret-0123456789-abcdefghijklmnop"


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        yield {"client": client, "engine": app.state.engine, "user_id": 1}


def _check(api: dict, fold: bool = False) -> Counter:
    """Counters == GROUP BY truth, per (site, app, state); returns the truth."""
    from balsam.server.job_counts import counts_by_site_app_state, fold_deltas

    engine = api["engine"]
    if fold:
        with engine.begin() as conn:
            fold_deltas(conn)
    with engine.connect() as conn:
        truth = Counter({(s, a, st): n for s, a, st, n in conn.exec_driver_sql(
            "SELECT site_id, app_id, state, count(*) FROM jobs GROUP BY site_id, app_id, state")})
        counted = counts_by_site_app_state(conn, api["user_id"])
    assert counted == dict(truth)
    return truth


def _patch(client: Any, ids: list[int], state: str, **data: Any) -> None:
    answer = client.patch("/jobs/", json=[{"id": i, "state": state, "state_data": data} for i in ids])
    assert answer.status_code == 200, answer.text


def test_counters_follow_every_change(api: dict) -> None:
    client = api["client"]
    (site1, app1), (site2, app2) = create_site_and_app(client, "one"), create_site_and_app(client, "two")
    jobs = client.post("/jobs/", json=[{"app_id": app1, "workdir": f"a/{i}", "tags": {"k": str(i % 3)}}
                                       for i in range(120)]).json()
    ids = [j["id"] for j in jobs]
    children = client.post("/jobs/", json=[{"app_id": app2, "workdir": f"c/{i}", "parent_ids": ids[:2]}
                                           for i in range(5)]).json()
    truth = _check(api)
    assert truth[(site1, app1, "STAGED_IN")] == 120 and truth[(site2, app2, "AWAITING_PARENTS")] == 5

    _patch(client, ids[:60], "PREPROCESSED")
    _patch(client, ids[:40], "RUNNING", num_nodes=1)
    _check(api, fold=True)
    _patch(client, ids[:30], "RUN_DONE")
    _patch(client, ids[30:40], "RUN_ERROR", error="x")
    _patch(client, ids[:30], "POSTPROCESSED")  # -> JOB_FINISHED by the server; releases the children
    truth = _check(api)
    assert truth[(site1, app1, "JOB_FINISHED")] == 30 and truth[(site2, app2, "STAGED_IN")] == 5
    # a filtered state change, a no-op change and a change of other fields only
    answer = client.put("/jobs/", params={"tags": "k:1", "state": "STAGED_IN"}, json={"state": "FAILED"})
    assert answer.status_code == 200, answer.text
    client.patch("/jobs/", json=[{"id": i, "data": {"x": 1}} for i in ids[100:110]]).raise_for_status()
    _check(api, fold=True)

    assert client.delete("/jobs/", params={"state": "FAILED"}).status_code == 200
    assert client.delete(f"/jobs/{ids[0]}").status_code == 204
    _check(api)
    assert client.delete(f"/apps/{app2}").status_code == 204   # its jobs go with it (cascade)
    truth = _check(api, fold=True)
    assert not any(app == app2 for _site, app, _state in truth)
    assert client.delete(f"/sites/{site1}").status_code == 204  # apps and jobs go with it
    assert _check(api, fold=True) == Counter()
    with api["engine"].connect() as conn:
        leftover = conn.exec_driver_sql("SELECT count(*) FROM job_counts WHERE n <> 0").scalar()
    assert leftover == 0
    assert children  # (the children were released and then deleted with their app)


def test_counts_by_state_api_of_the_dashboard(api: dict) -> None:
    from starlette.datastructures import QueryParams as SQ

    from balsam.server.http import QueryParams
    from balsam.server.jobs_logic import count_jobs_by_state

    client = api["client"]
    (_site1, app1), (site2, app2) = create_site_and_app(client, "one"), create_site_and_app(client, "two")
    jobs = client.post("/jobs/", json=[{"app_id": app1 if i < 7 else app2, "workdir": f"a/{i}", "tags": {"k": str(i % 2)}}
                                       for i in range(10)]).json()
    _patch(client, [jobs[0]["id"], jobs[8]["id"]], "FAILED")
    with api["engine"].connect() as conn:
        def counts(*items: tuple[str, str], window: "int | None" = 1000) -> tuple[dict, bool]:
            return count_jobs_by_state(conn, api["user_id"], QueryParams(SQ(list(items))), window=window)

        assert counts() == ({"STAGED_IN": 8, "FAILED": 2}, True)
        assert counts(("site_id", str(site2))) == ({"STAGED_IN": 2, "FAILED": 1}, True)
        assert counts(("app_id", str(app1)), ("state", "FAILED")) == ({"STAGED_IN": 6, "FAILED": 1}, True)
        # one tag (+ site/app/state): the per-tag counters, exact whatever the window
        assert counts(("tags", "k:0")) == ({"STAGED_IN": 3, "FAILED": 2}, True)
        assert counts(("tags", "k:0"), window=4) == ({"STAGED_IN": 3, "FAILED": 2}, True)
        assert counts(("tags", "k:0"), ("site_id", str(site2)), ("state", "FAILED")) == ({"FAILED": 1}, True)
        assert counts(("tags", "k:1"), ("app_id", str(app1))) == ({"STAGED_IN": 3}, True)
        assert counts(("tags", "k:2")) == ({}, True)
        # other filters: a scan of the newest `window` jobs (exact with window=None)
        newest, exact = counts(("workdir__contains", "a/"), window=4)  # the newest 4 jobs: indices 6..9
        assert newest == {"STAGED_IN": 3, "FAILED": 1} and not exact
        assert counts(("workdir__contains", "a/"), window=None) == ({"STAGED_IN": 8, "FAILED": 2}, True)
        assert counts(("tags", "k:0"), ("workdir__contains", "a/"), window=None) == ({"STAGED_IN": 3, "FAILED": 2}, True)


def test_concurrent_bulk_updates_neither_deadlock_nor_drift(api: dict) -> None:
    """Four writers at once (on PostgreSQL the delta appends run concurrently; SQLite serializes them)."""
    client = api["client"]
    _site, app_id = create_site_and_app(client, "busy")
    ids = [j["id"] for j in client.post("/jobs/", json=[{"app_id": app_id, "workdir": f"w/{i}"} for i in range(800)]).json()]
    _patch(client, ids, "PREPROCESSED")
    errors: list[str] = []

    def worker(chunk: list[int]) -> None:
        try:
            for state, data in (("RUNNING", {"num_nodes": 1}), ("RUN_DONE", {}), ("POSTPROCESSED", {})):
                for start in range(0, len(chunk), 25):
                    answer = client.patch("/jobs/", json=[{"id": i, "state": state, "state_data": data}
                                                          for i in chunk[start:start + 25]])
                    if answer.status_code != 200:
                        errors.append(answer.text)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(ids[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    truth = _check(api)
    assert sum(n for (_s, _a, state), n in truth.items() if state == "JOB_FINISHED") == 800
    _check(api, fold=True)
    with api["engine"].connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM job_count_deltas")).scalar() == 0
