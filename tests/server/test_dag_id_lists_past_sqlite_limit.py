"""Two more id lists that went past SQLite's default bound-parameter limit (32,766), each failing
the same way on every retry ("too many SQL variables", answered 500): the stage-out items a bulk
PATCH to POSTPROCESSED starts (5,000 jobs of an app with 7 stage-out slots: 35,000 items), and the
jobs an expired Session held RUNNING (``set_states``, which the session sweep calls with all of
them at once). Both now send their ids as one parameter (``id_in``), as the parent check does
(test_dag_many_distinct_parents.py, whose connection limit this test uses: the same on any build)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from test_dag_many_distinct_parents import SECRET, _default_sqlite_limit

from balsam.models import JobState
from balsam.server import jobs_logic
from server_testlib import create_site_and_app, logged_in_test_client

JOBS = 5_000
SLOTS = 7  # 35,000 stage-out items


def _jobs(client: Any, app_id: int, count: int, **fields: Any) -> list[int]:
    ids: list[int] = []
    for start in range(0, count, 5_000):
        body = [{"workdir": f"w/{i}", "app_id": app_id, **fields.get("per_job", lambda i: {})(i)}
                for i in range(start, min(count, start + 5_000))]
        answer = client.post("/jobs/", json=body)
        assert answer.status_code == 201, answer.text[:300]
        ids += [job["id"] for job in answer.json()]
    return ids


def _patch(client: Any, ids: list[int], *states: str) -> None:
    for state in states:
        for start in range(0, len(ids), 5_000):
            answer = client.patch("/jobs/", json=[{"id": i, "state": state} for i in ids[start:start + 5_000]])
            assert answer.status_code == 200, (state, answer.text[:300])


def test_a_bulk_postprocessed_starting_more_stage_outs_than_the_limit(tmp_path: Path) -> None:
    with logged_in_test_client(f"sqlite:///{tmp_path / 'b.db'}", SECRET) as (client, app):
        _default_sqlite_limit(app.state.engine)
        site = client.post("/sites/", json={"name": "s", "path": str(tmp_path / "s"),
                                            "transfer_locations": {"aps": "globus://aps"}}).json()
        slots = {f"o{k}": {"required": True, "direction": "out", "local_path": f"o{k}.dat"} for k in range(SLOTS)}
        made = client.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "", "source_code": "",
                                           "parameters": {}, "transfers": slots, "description": ""}).json()
        ids = _jobs(client, made["id"], JOBS,
                    per_job=lambda i: {"transfers": {f"o{k}": f"aps:/out/{i}/{k}" for k in range(SLOTS)}})
        _patch(client, ids, "PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED")
        pending = client.get("/transfers/", params={"state": "pending", "direction": "out", "limit": 1}).json()
        assert pending["count"] == JOBS * SLOTS


def test_set_states_of_more_running_jobs_than_the_limit(tmp_path: Path) -> None:
    count = 33_000
    with logged_in_test_client(f"sqlite:///{tmp_path / 'b.db'}", SECRET) as (client, app):
        _default_sqlite_limit(app.state.engine)
        _, app_id = create_site_and_app(client)
        ids = _jobs(client, app_id, count)
        _patch(client, ids, "PREPROCESSED", "RUNNING")
        with app.state.engine.begin() as conn:
            jobs_logic.set_states(conn, {i: (JobState.running.value, JobState.run_timeout) for i in ids},
                                  dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), {"message": "expired"})
        timed_out = client.get("/jobs/", params={"state": "RUN_TIMEOUT", "limit": 1}).json()
        assert timed_out["count"] == count
