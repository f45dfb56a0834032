"""A bulk PATCH the server refuses for many of its updates is logged in one ERROR line, not one per
job: a user moving 1,000 jobs the processing session held made 1,000 ERROR lines (~930 characters
each), each repeating the same 409. The ids of every refused update are at DEBUG."""

from __future__ import annotations

import logging
from typing import Any

from balsam.client.rest import APIError
from balsam.client.status_updater import BulkStatusUpdater

LOGGER = "balsam.client.status_updater"
REASON = "no longer held by session 7 (the job was moved)"


def _moved(ids: set[int]):
    """A server that refuses a PATCH holding any job of ``ids`` (409, naming them all)."""
    calls: list[int] = []

    def send(chunk: list[dict[str, Any]]) -> None:
        calls.append(len(chunk))
        named = frozenset(u["id"] for u in chunk if u["id"] in ids)
        if named:
            raise APIError("PATCH", "http://api/jobs/", 409, REASON, named)

    return send, calls


def test_a_chunk_refused_for_a_thousand_jobs_is_one_error_line(caplog: Any) -> None:
    moved = set(range(1000, 2000))
    send, calls = _moved(moved)
    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01, name="processing-updates")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        updater.put_updates([{"id": i, "state": "POSTPROCESSED", "session_id": 7} for i in range(990, 2000)])
        assert updater.flush(30)
        updater.close()
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert len(errors) == 1, (len(errors), errors[:3])
    line = errors[0]
    assert "processing-updates" in line and "1000 of the 1010" in line
    assert "1000, 1001, 1002, 1003, 1004 and 995 more" in line
    assert line.count(REASON) == 1 and len(line) < 1000
    debug = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert any(str(sorted(moved)) in message for message in debug)  # every id, at DEBUG
    # Nothing else changed: the refused updates are dropped, the others sent, in two calls.
    assert updater.dropped_count == 1000 and updater.sent == 10 and len(calls) == 2


def test_one_refused_update_keeps_its_line_and_distinct_reasons_are_each_given_once(caplog: Any) -> None:
    def send(chunk: list[dict[str, Any]]) -> None:
        named = frozenset(u["id"] for u in chunk if u["id"] in (3, 4, 5, 6, 7))
        if named:
            first = min(named)  # a different reason for each job: all are named, in one line
            raise APIError("PATCH", "http://api/jobs/", 409, f"job {first} refused" if len(named) == 1 else "several",
                           named)

    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        updater.put_update({"id": 3, "state": "RUN_DONE"})
        assert updater.flush(10)
        updater.put_updates([{"id": i, "state": "RUN_DONE"} for i in (1, 4, 5, 6, 7)])
        assert updater.flush(10)
        updater.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert "server refused update {'id': 3, 'state': 'RUN_DONE'}" in errors[0] and "job 3 refused" in errors[0]
    assert "4 of the 5 of one call (jobs 4, 5, 6, 7)" in errors[1] and errors[1].count("several") == 1
    assert updater.dropped_count == 5 and updater.sent == 1
