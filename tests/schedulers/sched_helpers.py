"""Shared helpers of the scheduler driver tests: the recorded outputs of tests/schedulers/data.

The replaying runner and the result helpers are balsam.testing's (what third-party plugins use).
"""

from __future__ import annotations

from pathlib import Path

from balsam.testing.replay import ReplayRunner, load_recorded, result, utc

__all__ = ["DATA", "FIXTURES", "REPO", "ReplayRunner", "load_recorded", "recorded", "result", "utc"]

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def recorded(scheduler: str, name: str) -> str:
    """The text of one recorded file (a missing file fails the test rather than reading as empty)."""
    return (DATA / scheduler / name).read_bytes().decode("utf-8", errors="replace")
