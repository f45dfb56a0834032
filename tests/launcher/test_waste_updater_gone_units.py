"""The launcher's status updater reads a 404 naming a job of its PATCH as that job deleted: its
updates dropped with one INFO line per call, the ids handed to ``on_gone`` once per call (the
launcher then ends the runs: tests/launcher/test_waste_deleted_before_start.py runs it against the
real server and launchers). Here the sender refuses as the server does (all or nothing, a 404
naming every missing job: ``balsam.server.errors.not_found_ids``), to count the calls and lines."""

from __future__ import annotations

import logging

from balsam.client.rest import APIError
from balsam.client.status_updater import BulkStatusUpdater


def not_found(ids: list[int], named: bool = True) -> APIError:
    """The server's answer to a PATCH with deleted jobs (balsam.server.errors.not_found_ids)."""
    return APIError("PATCH", "http://server/jobs/", 404, f"Job not found: {', '.join(map(str, ids))}",
                    frozenset(ids) if named else None)


class Server:
    """Applies the updates of the jobs it has, refuses a call with any other job as the real one does
    (all or nothing: 404 naming every missing job). Counts the calls."""

    def __init__(self, existing: set[int]) -> None:
        self.existing = existing
        self.calls: list[list[dict]] = []
        self.applied: list[dict] = []

    def __call__(self, updates: list[dict]) -> None:
        self.calls.append(list(updates))
        missing = sorted({u["id"] for u in updates} - self.existing)
        if missing:
            raise not_found(missing)
        self.applied.extend(updates)


def test_a_404_naming_jobs_hands_them_over_once_and_logs_info(caplog) -> None:
    server = Server(existing={1, 2})
    gone: list[list[int]] = []
    updater = BulkStatusUpdater(send=server, max_wait_sec=0.05, on_gone=gone.append)
    caplog.set_level(logging.INFO, logger="balsam.client.status_updater")
    try:
        updater.put_updates([{"id": i, "state": "RUNNING"} for i in (1, 7, 2, 8, 9)])
        assert updater.flush(10)
    finally:
        updater.close()
    assert gone == [[7, 8, 9]]  # one hand-over for the call, however many jobs
    assert sorted(u["id"] for u in server.applied) == [1, 2]
    assert len(server.calls) == 2  # the refused call, then the others at once (named: no halving)
    records = [r for r in caplog.records if r.name == "balsam.client.status_updater"]
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    assert any("jobs 7, 8, 9 were deleted on the server (HTTP 404): 3 updates dropped" in r.getMessage()
               for r in records), [r.getMessage() for r in records]
    assert updater.dropped_count == 3


def test_without_on_gone_or_a_named_job_a_404_is_a_refusal_as_before(caplog) -> None:
    caplog.set_level(logging.INFO, logger="balsam.client.status_updater")
    # An updater without on_gone (the processing module): an ERROR, as always.
    updater = BulkStatusUpdater(send=Server(existing=set()), max_wait_sec=0.05)
    try:
        updater.put(5, "RUN_DONE")
        assert updater.flush(10)
    finally:
        updater.close()
    assert any(r.levelno == logging.ERROR and "server refused update" in r.getMessage() for r in caplog.records)

    # A 404 that names no job (a proxy's, a wrong path): not a deleted job.
    caplog.clear()
    gone: list[list[int]] = []

    def proxy(updates: list[dict]) -> None:
        raise not_found([], named=False)

    updater = BulkStatusUpdater(send=proxy, max_wait_sec=0.05, on_gone=gone.append)
    try:
        updater.put(6, "RUNNING")
        assert updater.flush(10)
    finally:
        updater.close()
    assert gone == []
    assert any(r.levelno == logging.ERROR and "server refused update" in r.getMessage() for r in caplog.records)
