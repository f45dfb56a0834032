"""Text checked as digits before ``int()`` is checked with ``str.isdecimal``: ``str.isdigit``
accepts superscripts and circled digits ('²', '①') that ``int()`` refuses, so a check meant to give
a one-line error (or to read a site name, a scheduler's field) raised a ValueError instead. A scan
of the shipped code keeps ``isdigit`` out of it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_int_refuses_what_isdigit_accepts():
    assert "²".isdigit() and not "²".isdecimal()
    with pytest.raises(ValueError):
        int("²")


def test_no_shipped_module_reads_digits_with_isdigit():
    sources = [*REPO.joinpath("core").rglob("*.py"), *REPO.joinpath("plugins").rglob("*.py")]
    found = [f"{path.relative_to(REPO)}:{number}" for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ".isdigit()" in line]
    assert found == [], f"use str.isdecimal() (int() refuses some of what isdigit() accepts): {found}"
