"""The local queue's look at the user's processes (LocalQueue._live_wrappers: psutil, every process
of the user), counted: tests that a poll of an idle state directory does not pay for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.builtin import local_queue


def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The state directories scanned from now on, one entry per scan (the scan still runs)."""
    scans: list[Path] = []
    real_scan = local_queue.LocalQueue._live_wrappers

    def counted(self: local_queue.LocalQueue) -> list[tuple[int, int]]:
        scans.append(self.state_dir)
        return real_scan(self)

    monkeypatch.setattr(local_queue.LocalQueue, "_live_wrappers", counted)
    return scans
