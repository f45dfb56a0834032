"""What the CLI tests share: a clean API client state per test, and ``balsam(...)`` through click's runner.

A test module takes both with ``from cli_test_utils import balsam, fresh_api_state  # noqa: F401``
(the fixture is autouse: importing it into the module applies it to the module's tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import CliRunner, Result


@pytest.fixture(autouse=True)
def fresh_api_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """No site selected from the environment, the working directory outside any site, and no
    client or app class cached from another test."""
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client

    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_default_client()
    ApplicationDefinition.clear_cache()
    yield
    reset_default_client()


def balsam(*args: str, input: Optional[str] = None) -> Result:
    """Run ``balsam ARGS...`` in this process (exceptions propagate)."""
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
