"""The vendored uPlot files are the ones VENDORED.md names: sha256 of each against its record."""

import hashlib
import re
from pathlib import Path

import balsam.server.dashboard as dashboard

VENDOR = Path(dashboard.__file__).parent / "static" / "vendor" / "uplot"
FILES = ("uPlot.iife.min.js", "uPlot.min.css")


def recorded_checksums() -> dict[str, str]:
    text = (VENDOR / "VENDORED.md").read_text()
    found = dict(re.findall(r"`([^`\s]+\.(?:js|css))`\s*\(sha256\s+`([0-9a-f]{64})`\)", text))
    assert set(found) == set(FILES), f"VENDORED.md records {sorted(found)}, expected {sorted(FILES)}"
    return found


def test_vendored_files_match_recorded_sha256():
    for name, expected in recorded_checksums().items():
        actual = hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()
        assert actual == expected, f"{name}: sha256 {actual}, VENDORED.md says {expected}"


def test_license_is_vendored():
    assert "MIT" in (VENDOR / "LICENSE").read_text()
