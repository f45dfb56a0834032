"""A note key the server refused once, then written under a newer note, is not reported dropped.

The launcher's note writer (balsam.launcher.batch_job_notes) drops a key the server refuses (a
4xx on its value) and names the keys dropped since the last flush at the next flush, which then
returns False. Before, a key dropped and later written under a new note (the next node take-out's
text) was still named as dropped at the next flush, and the flush returned False, though the
BatchJob held that key's latest note: the launcher's exit said a note was lost that was not.

Real components: a uvicorn server (tests' ``balsam_env``) and the RESTClient; one wrapper makes
chosen values ones the server refuses (a NUL, which the real server answers 422), as
tests/launcher/test_batch_job_notes.py does for a whole key.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from balsam.client.rest import RESTClient
from balsam.launcher.batch_job_notes import BatchJobNotes

#: A note whose text starts so is sent spoiled (refused by the server).
SPOIL = "spoil:"


class SpoilsValues:
    """The writer's REST client: a value starting with :data:`SPOIL` is sent with a NUL (the server
    refuses it, 422). Counts the writes answered (refused or not) for the test to wait on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cond = threading.Condition()
        self.answered = 0

    def put(self, path: str, json: dict, **kw: Any) -> Any:
        merge = {k: (v + "\x00" if v.startswith(SPOIL) else v) for k, v in json["status_info_merge"].items()}
        try:
            return self.inner.put(path, json={"status_info_merge": merge}, **kw)
        finally:
            with self.cond:
                self.answered += 1
                self.cond.notify_all()

    def wait_answered(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.answered >= count, 30), self.answered


@pytest.fixture
def batch_job(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import BatchJob, Site

    site = Site.objects.create(name=f"dropped-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "site"))
    return BatchJob.objects.create(site_id=site.id, project="p", queue="q", num_nodes=1, wall_time_min=10, job_mode="mpi")


def _writer(balsam_env: Any, batch_job_id: int) -> tuple[BatchJobNotes, SpoilsValues, threading.Event]:
    """A writer whose client is made (its first write starts) once the returned event is set: the
    notes made before it go in one request."""
    client = SpoilsValues(RESTClient(balsam_env.url, balsam_env.token))
    go = threading.Event()

    def make() -> SpoilsValues:
        assert go.wait(30)
        return client

    return BatchJobNotes(batch_job_id, client=make), client, go


def _status_info(balsam_env: Any, batch_job_id: int) -> dict[str, str]:
    return RESTClient(balsam_env.url, balsam_env.token).get(f"/batch-jobs/{batch_job_id}")["status_info"]


def _dropped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "were dropped" in r.getMessage()]


def test_a_key_refused_alone_then_written_anew_is_not_named_dropped(balsam_env: Any, batch_job: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    notes, client, go = _writer(balsam_env, batch_job.id)
    go.set()
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.batch_job_notes"):
        notes.note("nodes_out", f"{SPOIL} node x taken out")
        client.wait_answered(1)  # refused: the key is dropped
        notes.note("nodes_out", "node y taken out")  # the next take-out's note, accepted
        assert notes.flush(10), _dropped_lines(caplog)
        assert _dropped_lines(caplog) == []
        assert _status_info(balsam_env, batch_job.id) == {"nodes_out": "node y taken out"}
        # A key refused and not written since is still named, once.
        notes.note("nodes_out", f"{SPOIL} node z taken out")
        assert not notes.flush(10)
    assert _dropped_lines(caplog) == [f"BatchJob {batch_job.id}: notes nodes_out were dropped (refused by the "
                                      "server, see above)"]
    assert _status_info(balsam_env, batch_job.id) == {"nodes_out": "node y taken out"}


def test_a_key_refused_in_a_batch_then_written_anew_is_not_named_dropped(balsam_env: Any, batch_job: Any,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The batch refused, its keys written one by one (nodes_out and launcher refused); nodes_out
    written later under a new note: only launcher is named."""
    notes, client, go = _writer(balsam_env, batch_job.id)
    notes.note("error", "launcher failed: real reason")
    notes.note("nodes_out", f"{SPOIL} node x taken out")
    notes.note("launcher", f"{SPOIL} stopped acquiring")
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.batch_job_notes"):
        go.set()
        client.wait_answered(4)  # the batch, then each of its 3 keys
        notes.note("nodes_out", "node y taken out")
        assert not notes.flush(10)
    assert _dropped_lines(caplog) == [f"BatchJob {batch_job.id}: notes launcher were dropped (refused by the "
                                      "server, see above)"]
    assert _status_info(balsam_env, batch_job.id) == {"error": "launcher failed: real reason",
                                                      "nodes_out": "node y taken out"}
