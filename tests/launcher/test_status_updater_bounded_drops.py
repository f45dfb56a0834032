"""What BulkStatusUpdater logs and keeps of the updates it drops is bounded: one refused value of
800 KB (a run() result over the API's 512,000 characters) made log lines of 800 KB, and ``dropped``
grew for the life of the process (the site agent's processing module)."""

from __future__ import annotations

import logging
from typing import Any

from balsam.client import status_updater
from balsam.client.status_updater import BulkStatusUpdater

#: Bounds the tests hold the updater to (its MAX_DROPPED_CHARS and MAX_DROPPED_KEPT are within them).
LOG_LINE_MAX = 5000
KEPT_MAX = 1000


class _Refused(Exception):
    status_code = 422


def test_a_refused_huge_update_is_logged_once_as_an_excerpt_and_kept_cut(caplog: Any) -> None:
    def send(chunk: list[dict[str, Any]]) -> None:
        if any(len(str(u.get("serialized_return_value", ""))) > 512_000 for u in chunk):
            raise _Refused("0.serialized_return_value: longer than 512000 characters (800012)")

    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01, name="processing-updates")
    with caplog.at_level(logging.INFO, logger="balsam.client.status_updater"):
        updater.put_update({"id": 3, "state": "POSTPROCESSED", "serialized_return_value": "x" * 800_000})
        updater.put_update({"id": 4, "state": "POSTPROCESSED", "serialized_return_value": "ok"})
        assert updater.flush(10)
        updater.close()
    refused = [r.getMessage() for r in caplog.records if "refused update" in r.getMessage()]
    assert all(len(line) < LOG_LINE_MAX for line in refused), [len(line) for line in refused]
    assert len(refused) == 1, refused
    assert "'id': 3" in refused[0] and "characters in all" in refused[0]
    assert "longer than 512000 characters" in refused[0]
    assert max(len(r.getMessage()) for r in caplog.records) < LOG_LINE_MAX
    [(kept, reason)] = updater.dropped
    assert kept["id"] == 3 and kept["state"] == "POSTPROCESSED" and len(repr(kept)) < LOG_LINE_MAX
    assert "800,000" in kept["serialized_return_value"] or "800,002" in kept["serialized_return_value"]
    assert reason == "0.serialized_return_value: longer than 512000 characters (800012)"
    assert updater.dropped_count == 1 and updater.sent == 1


def test_dropped_keeps_the_most_recent_updates_and_counts_them_all() -> None:
    def send(chunk: list[dict[str, Any]]) -> None:
        if any(u.get("bad") for u in chunk):
            raise _Refused("no")

    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01)
    total = KEPT_MAX + 300
    updater.put_updates([{"id": i, "state": "RUN_DONE", "bad": True} for i in range(total)])
    updater.put_update({"id": total, "state": "RUN_DONE"})
    assert updater.flush(30)
    updater.close()
    assert len(updater.dropped) <= KEPT_MAX and updater.sent == 1
    kept = status_updater.MAX_DROPPED_KEPT
    assert updater.dropped_count == total and kept <= KEPT_MAX
    assert [u["id"] for u, _ in updater.dropped] == list(range(total - kept, total))
    # Small updates are kept as they were put.
    assert updater.dropped[-1] == ({"id": total - 1, "state": "RUN_DONE", "bad": True}, "no")
