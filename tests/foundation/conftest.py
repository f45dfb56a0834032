"""Fixtures of the foundation tests: a clean plugin manager per test."""

from __future__ import annotations

from typing import Iterator

import pytest

from balsam.plugins.manager import reset_plugin_manager

from foundation_helpers import PLUGIN_ENV


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process-wide plugin manager built from scratch for this test (and forgotten after it)."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
