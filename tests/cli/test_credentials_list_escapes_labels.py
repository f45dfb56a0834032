"""`balsam server credentials` prints a label with control characters written out: labels stored
before the server escaped them (or by an older server) could clear the admin's screen or hide a
credential's row (ESC sequences, carriage returns)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from balsam.cli.server import _format_credential


def _row(label):
    return SimpleNamespace(id=7, username="mallory", kind="login", revoked=False,
                           expires=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc), site_id=None,
                           batch_job_id=None, label=label)


def test_a_label_with_escape_sequences_prints_on_one_line_without_them():
    line = _format_credential(_row("laptop\x1b[2J\x1b[H\rroot  admin   active\n"))
    assert "\x1b" not in line and "\r" not in line and "\n" not in line
    assert "laptop\\x1b[2J" in line


def test_an_ordinary_label_and_none_print_as_they_are():
    assert _format_credential(_row("my laptop")).endswith(" my laptop")
    assert _format_credential(_row(None)).endswith("all sites                ")
