"""Launcher test fixtures: a live server with a short session expiry and per-test sites.

``live_server`` is overridden for this folder so that the shared ``balsam_env`` fixture (a fresh
user with its login file) points at a server whose sessions expire after 4 s without a heartbeat:
the lease-loss tests need expiry to happen within a test.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from launcher_harness import make_site  # noqa: E402
from launcher_helpers import SESSION_EXPIRE_SEC  # noqa: E402


@pytest.fixture(scope="session")
def _launcher_live_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": str(SESSION_EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_launcher_live_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _launcher_live_server
    return _launcher_live_server.url


@pytest.fixture
def new_site(balsam_env: Any, tmp_path: Path) -> Callable[..., tuple[str, Path]]:
    """``new_site(**launcher_settings) -> (site_name, site_path)`` registered as the test's user."""

    def factory(**launcher: Any) -> tuple[str, Path]:
        name = f"site-{uuid.uuid4().hex[:8]}"
        return name, make_site(tmp_path / name, name, launcher)

    return factory
