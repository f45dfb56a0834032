"""Fixtures of the platform tests: a faked machine (node file, recording MPI launcher first on PATH,
``nvidia-smi`` stand-in), API clients and site agents.

The machines themselves (Aurora, Polaris, Perlmutter, Theta) cannot run here; what runs is the real
launcher (``python -m balsam.launcher``), the real site agent and real MPICH ranks, with the
machine's environment faked as its batch system would set it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "site"))
sys.path.insert(0, str(HERE.parent / "launcher"))

from platform_harness import FakeMachine  # noqa: E402
from site_test_utils import api_client  # noqa: E402


@pytest.fixture
def fake_machine(tmp_path: Path) -> Callable[..., FakeMachine]:
    def make(hosts: list[str]) -> FakeMachine:
        return FakeMachine(tmp_path / "machine", hosts)

    return make


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
def agent_daemon(client: Any) -> Iterator[Callable[[Path], int]]:
    """Start a site agent (``balsam site start``); stopped at teardown."""
    from balsam.site.site_ops import start_agent, stop_agent

    started: list[Path] = []

    def start(site_path: Path) -> int:
        pid = start_agent(Path(site_path))
        started.append(Path(site_path))
        return pid

    yield start
    for site_path in started:
        stop_agent(site_path, timeout=30, force=True)
