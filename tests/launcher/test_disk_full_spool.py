"""A launcher's spool on a full or over-quota site directory (the API gone at its end, ENOSPC where
the unsent updates are written; fault injected at the write, as a real full tmpfs showed it).

Before: the partly written ``.tmp`` was left in the spool directory (taking room the next try needs,
never read by a replay), and the ERROR said only ``cannot spool 50 job updates to DIR: [Errno 28] ...``:
not that they are lost, nor which jobs. Now the ``.tmp`` is removed and the line names the jobs.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from balsam.client import status_updater
from balsam.client.status_updater import BulkStatusUpdater, write_spool


def _fsync_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of a spool file fails as on a full disk (its data written into the page cache first)."""

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(status_updater.os, "fsync", full)


def test_a_spool_file_that_cannot_be_written_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fsync_full(monkeypatch)
    with pytest.raises(OSError):
        write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE"}])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE"}])  # space back: written as before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_updates_the_spool_cannot_hold_are_reported_lost_by_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def unreachable(batch: list[Any]) -> None:
        raise ConnectionError("the API is gone")

    _fsync_full(monkeypatch)
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(send=unreachable, close_timeout=0.2, spool_dir=spool, name="launcher-updater")
    for job_id in (11, 12, 13):
        updater.put(job_id, "RUN_DONE")
    with caplog.at_level(logging.ERROR, logger="balsam.client.status_updater"):
        updater.close()
    assert updater.spooled == 0
    assert not spool.exists() or list(spool.iterdir()) == []
    lines = [r.getMessage() for r in caplog.records if "cannot spool" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert f"to {spool}: No space left on device; lost (jobs 11, 12, 13 " in lines[0], lines[0]
