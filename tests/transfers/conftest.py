"""Fixtures of the DAG stage-in tests of this folder (their helpers are in transfer_test_utils.py).

Nothing here is autouse: a test module asks for ``fresh_plugin_manager`` (``pytestmark``), so the
other tests of the folder run as before."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from transfer_test_utils import slow_first_copy


@pytest.fixture
def fresh_plugin_manager() -> Iterator[None]:
    """A plugin manager of the test's own (the backends found for its site's locations)."""
    from balsam.plugins.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    """A fresh user on the live server, on SQLite and on PostgreSQL."""
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def stale_first_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The first copy made (the pre-hold task's) reads its source at once and lands only when the
    returned event is set; the other copies are the real ones."""
    gate = slow_first_copy(monkeypatch, tmp_path / "old-inode")
    yield gate
    gate.set()


@pytest.fixture
def cancels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every LocalTransfer.cancel_task call (the real one still runs)."""
    import balsam.builtin.local_transfer as lt

    calls: list[str] = []
    real = lt.LocalTransfer.cancel_task

    def cancel_task(self: Any, task_id: str) -> Any:
        calls.append(task_id)
        return real(self, task_id)

    monkeypatch.setattr(lt.LocalTransfer, "cancel_task", cancel_task)
    return calls
