"""``status_info_merge``: key-wise changes of a BatchJob's ``status_info``, applied by the server
under the row's lock (routes/batch_jobs.STATUS_INFO_MERGE), on SQLite and PostgreSQL.

Several parties write a BatchJob's ``status_info``: a launcher's notes (one PUT per note), the site
agent's scheduler cycle (a bulk PATCH built from a copy read at the cycle's start, seconds
earlier) and the elastic queue. PUT and PATCH replace ``status_info`` whole (Balsam 0.7's contract,
kept), so each writer lost the other's keys: a launcher's note PUT while the agent PATCHed
``requeue_count`` wiped it, and the agent's PATCH from its older copy put back a stale note.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from balsam.client.rest import RESTClient
from balsam.launcher.batch_job_notes import BatchJobNotes
from test_batch_jobs import bj_body


def _info(api: Any, bj_id: int) -> dict:
    return api.ok("GET", f"/batch-jobs/{bj_id}")["status_info"]


def _notes(api: Any, bj_id: int) -> BatchJobNotes:
    """The launcher's note writer of ``bj_id``, talking to this test's server as its user."""
    return BatchJobNotes(bj_id, client=lambda: RESTClient(api.url, api.token))


def test_a_launcher_note_and_the_agents_patch_from_an_older_copy_keep_both_keys(api):
    """The agent's cycle reads the BatchJob, a launcher's note is written, then the cycle PATCHes
    the keys it changed (its requeue count) from its older copy: both keys stay (before: the
    whole-object PATCH from the copy removed the note; the server now refuses nothing, it merges)."""
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "state": "queued", "scheduler_id": 7,
                                          "status_info": {"submit_token": "t"}}])  # a 0.7-style write
    copy = api.ok("GET", f"/batch-jobs/{bj['id']}")  # the agent's cycle starts
    notes = _notes(api, bj["id"])
    notes.note("disk_full", "paused at T0")
    assert notes.flush(30)
    # The cycle's PATCH: the keys its copy changed (a requeue counted, the token removed), no other.
    api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "status_info_merge": {
        "requeue_count": "1", "submit_token": None}}])
    assert _info(api, bj["id"]) == {"disk_full": "paused at T0", "requeue_count": "1"}, copy


def test_notes_and_bulk_patches_racing_keep_every_key(api):
    """A launcher's note writer and eight agent-style bulk PATCHes (each of its own key, and of
    another BatchJob's too) sent at once: every key of every writer is stored."""
    site = api.site()
    first, second = (api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"])) for _ in range(2))
    notes = _notes(api, first["id"])
    start = threading.Barrier(9)

    def agent(i: int) -> None:
        start.wait(30)
        api.ok("PATCH", "/batch-jobs/", json=[{"id": first["id"], "status_info_merge": {f"agent{i}": str(i)}},
                                              {"id": second["id"], "status_info_merge": {f"agent{i}": str(i)}}])

    def launcher() -> None:
        start.wait(30)
        for i in range(8):
            notes.note(f"note{i}", f"message {i}")
            assert notes.flush(30)

    with ThreadPoolExecutor(9) as pool:
        done = [pool.submit(agent, i) for i in range(8)] + [pool.submit(launcher)]
        for future in done:
            future.result(60)
    assert _info(api, first["id"]) == {**{f"agent{i}": str(i) for i in range(8)},
                                       **{f"note{i}": f"message {i}" for i in range(8)}}
    assert _info(api, second["id"]) == {f"agent{i}": str(i) for i in range(8)}


def test_a_merge_sets_and_removes_keys_and_a_07_put_still_replaces_whole(api):
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"], status_info={"a": "1", "b": "2"}))
    path = f"/batch-jobs/{bj['id']}"
    merged = api.ok("PUT", path, json={"status_info_merge": {"b": None, "c": "3", "gone": None}, "state": "queued"})
    assert merged["status_info"] == {"a": "1", "c": "3"} and merged["state"] == "queued"
    assert api.ok("PUT", path, json={"status_info_merge": {}})["status_info"] == {"a": "1", "c": "3"}
    # Balsam 0.7's update: status_info replaces the whole object, on both routes.
    assert api.ok("PUT", path, json={"status_info": {"only": "this"}})["status_info"] == {"only": "this"}
    (patched,) = api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "status_info": {"x": "y"}}])
    assert patched["status_info"] == {"x": "y"} == _info(api, bj["id"])


def test_a_bad_merge_is_refused_with_one_clear_422_and_nothing_updated(api):
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"], status_info={"a": "1"}))
    other = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    path = f"/batch-jobs/{bj['id']}"

    both = api.http.put(path, json={"status_info": {"b": "2"}, "status_info_merge": {"c": "3"}})
    assert both.status_code == 422, both.text
    assert "status_info_merge" in both.text and "cannot be sent with status_info" in both.text, both.text
    for bad, says in (([["k", "v"]], "must be an object"), ("text", "must be an object"),
                      ({"k": 1}, "must be a string"), ({"k": {"nested": "x"}}, "must be a string")):
        resp = api.http.put(path, json={"status_info_merge": bad})
        assert resp.status_code == 422 and says in resp.text and "status_info_merge" in resp.text, (bad, resp.text)
    # In a bulk PATCH: the item is named, and nothing of the request is applied.
    resp = api.http.patch("/batch-jobs/", json=[{"id": other["id"], "status_info_merge": {"x": "y"}},
                                                {"id": bj["id"], "status_info": {}, "status_info_merge": {}}])
    assert resp.status_code == 422 and '"body",1,"status_info_merge"' in resp.text.replace(" ", ""), resp.text
    assert _info(api, bj["id"]) == {"a": "1"} and _info(api, other["id"]) == {}


def test_a_merge_replayed_with_its_idempotency_key_is_not_applied_again(api):
    """A launcher's note whose answer was lost is sent again with the same Idempotency-Key (as the
    client's retries do): answered from the record, not merged a second time, so a key another
    writer set or removed in between is not put back (nor removed by a replayed null)."""
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    path = f"/batch-jobs/{bj['id']}"
    api.ok("PUT", path, json={"status_info_merge": {"disk_full": "paused at T0", "old": "x"}})
    note = {"status_info_merge": {"disk_full": "resumed at T1", "old": None}}
    first = api.ok("PUT", path, json=note, headers={"Idempotency-Key": "note-1"})
    assert first["status_info"] == {"disk_full": "resumed at T1"}
    # Another writer in between: a newer message, and the removed key written again.
    api.ok("PUT", path, json={"status_info_merge": {"disk_full": "paused at T2", "old": "y"}})
    again = api.ok("PUT", path, json=note, headers={"Idempotency-Key": "note-1"})
    assert again["status_info"] == first["status_info"]  # the recorded answer
    assert _info(api, bj["id"]) == {"disk_full": "paused at T2", "old": "y"}
