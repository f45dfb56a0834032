"""Fixtures of the elastic-queue tests: a live API server user (balsam_env), sites on it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "site"))
sys.path.insert(0, str(Path(__file__).parent.parent / "schedulers"))

from site_test_utils import FAST_SETTINGS, api_client, end_agent_daemons  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Iterator[None]:
    from balsam.plugins.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def client(balsam_env: Any) -> Any:
    from balsam._api.model import reset_default_client

    reset_default_client()
    return api_client()


@pytest.fixture
def make_site(balsam_env: Any, client: Any, tmp_path: Path) -> Callable[..., Any]:
    from balsam.config import SiteConfig
    from balsam.site.site_ops import deep_merge, init_site

    def make(name: str | None = None, overrides: dict | None = None) -> Any:
        name = name or f"elastic-{uuid.uuid4().hex[:8]}"
        path = tmp_path / name
        init_site(path, name, "default", client, settings_overrides=deep_merge(FAST_SETTINGS, overrides or {}))
        return SiteConfig(path)

    return make


@pytest.fixture
def agent_daemon(client: Any) -> Iterator[Callable[[Any], int]]:
    """Start a site's agent; at teardown stop it, then delete its BatchJobs' scheduler jobs."""
    import os

    from balsam.site.site_ops import start_agent

    started: list[Any] = []

    def start(site_config: Any) -> int:
        os.environ["BALSAM_SITE_PATH"] = str(site_config.site_path)
        pid = start_agent(Path(site_config.site_path))
        started.append(site_config)
        return pid

    yield start
    end_agent_daemons(client, started)
