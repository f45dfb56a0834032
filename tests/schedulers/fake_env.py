"""Put a fake batch system (tests/fixtures/fake_pbs or fake_cobalt) on PATH for a test."""

from __future__ import annotations

from pathlib import Path

from typing import Optional

from balsam.scheduler import JobHistory
from balsam.states import BatchJobState
from balsam.testing.fakebatch import FAKE_NODES, fake_batch_env as _engine_env, wait_for

__all__ = ["FAKE_NODES", "FIXTURES", "ended", "fake_batch_env", "wait_for"]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fake_batch_env(kind: str, state_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of the fake commands in tests/fixtures/<kind> (fake_pbs, fake_cobalt)."""
    return _engine_env(FIXTURES / kind, state_dir, **settings)


def ended(history: Optional[JobHistory]) -> Optional[JobHistory]:
    """``history`` once it records the job's end (a history may say "still queued or running")."""
    return history if history is not None and history.state in (BatchJobState.finished, BatchJobState.submit_failed) else None
