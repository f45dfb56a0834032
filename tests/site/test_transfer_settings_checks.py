"""settings.yml's ``transfers:`` section is checked when it is read (`balsam site check-settings`,
the agent's start), each problem one line with file, line and key: the values of
``backend_options`` against each backend's typed options (as ``scheduler.options`` are), and
location aliases that jobs could not write as ``alias:/path``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balsam.config import SettingsError, loads_settings


def errors_of(text: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    return info.value.errors


def test_backend_option_values_are_type_checked_with_their_lines() -> None:
    """They passed (only unknown keys were refused): threads: many failed when the backend was
    first built, extra_args: '--bwlimit=5m' reached rsync one character per argument, and a
    negative timeout_sec stopped every rsync at once."""
    text = ("transfers:\n"
            "  backend_options:\n"
            "    local: {threads: many}\n"
            "    rsync:\n"
            "      extra_args: '--bwlimit=5m'\n"
            "      timeout_sec: -5\n"
            "      threads: 0\n")
    assert errors_of(text) == [
        "settings.yml:3 transfers.backend_options.local.threads: expected an integer, got 'many'",
        "settings.yml:5 transfers.backend_options.rsync.extra_args: expected a list of strings, got '--bwlimit=5m' "
        "(write ['--bwlimit=5m'])",
        "settings.yml:6 transfers.backend_options.rsync.timeout_sec: must be more than 0, got -5",
        "settings.yml:7 transfers.backend_options.rsync.threads: must be at least 1, got 0",
    ]
    assert errors_of("transfers:\n  backend_options:\n    rsync: {extra_args: ['-v', 3]}\n") == [
        "settings.yml:3 transfers.backend_options.rsync.extra_args: expected a list of strings, got ['-v', 3]"]
    good = loads_settings("transfers:\n  backend_options:\n    rsync: {extra_args: ['--bwlimit=5m'], timeout_sec: 60}\n")
    assert good.transfers.backend_options == {"rsync": {"extra_args": ["--bwlimit=5m"], "timeout_sec": 60}}


def test_a_plugin_backends_option_validator_is_reported_on_its_line() -> None:
    """Globus' sync_level: fast was a raw ValueError with neither file nor line."""
    pytest.importorskip("balsam_transfer_globus")
    assert errors_of("transfers:\n  backend_options:\n    globus:\n      sync_level: fast\n") == [
        "settings.yml:4 transfers.backend_options.globus.sync_level: expected one of exists, size, mtime, checksum, "
        "got 'fast'"]


@pytest.mark.parametrize("alias", ["aps:dtn", "my dtn", "a/b", ""])
def test_location_aliases_jobs_cannot_write_are_refused(alias: str) -> None:
    """'aps:dtn' was accepted, but a job's 'aps:dtn:/data/x' names location 'aps'."""
    errors = errors_of(f"transfers:\n  transfer_locations:\n    ok: local://\n    '{alias}': local://\n")
    assert errors == [f"settings.yml:4 transfers.transfer_locations.{alias}: bad location alias {alias!r}: use letters, "
                      "digits, '_', '.' and '-' only (jobs write it as 'alias:/path', so ':', '/' and spaces cannot "
                      "be in it)"]
    loads_settings("transfers:\n  transfer_locations:\n    APS_dtn-2.v1: local://\n")


def test_task_timeout_sec_is_checked() -> None:
    assert errors_of("transfers:\n  task_timeout_sec: 0\n") == [
        "settings.yml:2 transfers.task_timeout_sec: must be more than 0, got 0.0"]
    assert loads_settings("transfers:\n  task_timeout_sec: 7200\n").transfers.task_timeout_sec == 7200


def test_check_settings_refuses_the_auditors_file(make_site) -> None:
    """`balsam site check-settings` printed OK for this backend_options line."""
    site = make_site()
    path = Path(site.site_path) / "settings.yml"
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("backend_options:"))
    lines[number - 1] = "  backend_options: {local: {threads: many}, rsync: {extra_args: '--bwlimit=5m', timeout_sec: -5}}"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "check-settings",
                           str(site.site_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith(f"Error: {path}:{number} transfers.backend_options.local.threads: expected an integer, "
                                  "got 'many'"), proc.stderr
    assert "extra_args: expected a list of strings" in proc.stderr and "timeout_sec: must be more than 0" in proc.stderr
