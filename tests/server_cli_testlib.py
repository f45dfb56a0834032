"""Helpers of the tests of ``balsam server`` administration commands run in the test's process
(click's CliRunner) on a SQLite database of their own."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from balsam.cli import main
from balsam.server.db import create_db_engine

PASSWORD = "a long enough password"


@contextlib.contextmanager
def server_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               *usernames: str) -> Iterator[tuple[Callable[..., Result], sa.Engine]]:
    """``run(*args, stdin="")`` (the CLI's result) and an engine of the database, which is migrated
    and has ``usernames`` (password :data:`PASSWORD`); the environment names only this test's
    home and database (the caller's BALSAM_ settings are left out)."""
    for key in [k for k in os.environ if k.startswith("BALSAM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("BALSAM_DATABASE_URL", database_url)

    def run(*args: str, stdin: str = "") -> Result:
        return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)

    assert run("server", "migrate").exit_code == 0
    for name in usernames:
        assert run("server", "user", "add", name, "--password-stdin", stdin=PASSWORD + "\n").exit_code == 0
    engine = create_db_engine(database_url)
    try:
        yield run, engine
    finally:
        engine.dispose()
