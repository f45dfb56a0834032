"""settings.yml keys that were accepted but silently did nothing (an audit of settings keys):

- ``launcher.sort_by`` in serial mode (serial mode leases by id): its help said "null (by id)",
  which is mpi mode's packing order in fact; a serial-mode launcher now says at start that it
  ignores the key;
- ``transfers.backend_options.file`` (``file`` is another name of ``local``): never applied to the
  ``local`` backend that serves ``file://`` locations; now it is, and ``file:`` with ``local:`` is
  refused;
- ``transfers.globus_endpoint_id`` and ``backend_options.globus.endpoint_id`` (and the site paths)
  set to different values: the backend used one, ``balsam site sync`` sent the other to the Site
  record; now refused when settings.yml is read.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _site(tmp_path: Path, settings_text: str, name: str = "site") -> Path:
    path = tmp_path / name
    (path / "data").mkdir(parents=True)
    (path / "log").mkdir()
    (path / ".balsam-site").write_text("1\n")
    (path / "settings.yml").write_text(settings_text)
    return path


def _check_settings(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "check-settings", str(path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# -- launcher.sort_by -------------------------------------------------------------------------------


def _start_launcher(monkeypatch, site_path: Path, job_mode: str) -> str:
    """One launcher start through the real entry (site, settings, logging, the mode chosen), with a
    fake platform and a job mode that returns at once; the launcher's log file and stderr."""
    from balsam.config import SiteConfig
    from balsam.launcher import service_calls, entry
    from balsam.platform import NodeInfo

    class Mode:
        def __init__(self, context) -> None:
            self.context = context

        def run(self) -> int:
            return 0

        def request_stop(self, reason: str = "") -> None:
            pass

    class Platform:
        name = "fake"

        def discover_nodes(self, env):
            return [NodeInfo(node_id="0", hostname="n0", cpu_ids=[0, 1])]

    monkeypatch.setattr(entry, "_platform", lambda settings: Platform())
    monkeypatch.setattr(entry, "_job_mode_class", lambda name: Mode)
    monkeypatch.setattr(service_calls, "find_batch_job_id", lambda site_id, env, platform: 7)
    monkeypatch.delenv(entry.NODES_ENV, raising=False)
    for name in ("BALSAM_LAUNCHER_NODES", "BALSAM_JOB_MODE"):
        monkeypatch.setenv(name, "")
    site_config = SiteConfig(site_path)
    settings = entry._load_settings(site_config)
    root = logging.getLogger("balsam")
    try:
        code = entry._run_with_site(site_config, settings, None, [entry.Partition(job_mode, 0)], {}, 10.0, time.time(), 0,
                                    None, lambda callback: None)
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_balsam_launcher", False):
                root.removeHandler(handler)
                handler.close()
    assert code == 0
    logs = sorted((site_path / "log").glob(f"{job_mode}_mode_*.log"))
    assert logs, list((site_path / "log").iterdir())
    return logs[-1].read_text()


def test_a_serial_launcher_says_once_at_start_that_it_ignores_sort_by(monkeypatch, tmp_path, capfd) -> None:
    site = _site(tmp_path, "launcher:\n  sort_by: long_large_first\n")
    log = _start_launcher(monkeypatch, site, "serial")
    warnings = [line for line in log.splitlines() if "WARNING" in line and "sort_by" in line]
    assert len(warnings) == 1, log
    assert "launcher.sort_by: 'long_large_first' is ignored in serial mode" in warnings[0]
    assert "by id" in warnings[0] and "mpi mode" in warnings[0] and str(site / "settings.yml") in warnings[0]
    assert "sort_by" in capfd.readouterr().err  # and on the launcher's stderr (the batch job's output)


@pytest.mark.parametrize("job_mode,text", [("mpi", "launcher:\n  sort_by: long_large_first\n"), ("serial", "launcher: {}\n")])
def test_no_sort_by_warning_where_it_is_used_or_not_set(monkeypatch, tmp_path, job_mode, text) -> None:
    log = _start_launcher(monkeypatch, _site(tmp_path, text), job_mode)
    assert "launcher.sort_by" not in log and "WARNING" not in log, log


def test_check_settings_accepts_sort_by_and_its_help_says_what_it_does(tmp_path) -> None:
    from balsam.config.schema import LauncherSettings

    site = _site(tmp_path, "launcher:\n  sort_by: long_large_first\n")
    proc = _check_settings(site)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr  # a BatchJob's job mode is not known there
    import attrs

    help_text = attrs.fields_dict(LauncherSettings)["sort_by"].metadata["help"]
    doc = (REPO / "docs" / "settings.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `sort_by` |"))
    for text in (help_text, row):
        assert "null (by id)" not in text
        assert "mpi mode only" in text and "fewest nodes first" in text and "Serial mode ignores it" in text
    from balsam.config import render_sample_settings

    assert "mpi mode only" in render_sample_settings()


# -- transfers.backend_options.file ----------------------------------------------------------------


def test_backend_options_file_apply_to_file_locations(tmp_path) -> None:
    from balsam.config import SiteConfig
    from balsam.site.modules.transfers import TransfersModule

    site = _site(tmp_path, f"transfers:\n  transfer_locations: {{scratch: \"file://{tmp_path}/remote\"}}\n"
                           "  backend_options:\n    file: {threads: 1}\n")
    config = SiteConfig(site)
    module = TransfersModule(config, config.settings.transfers, client=None)
    location = module.locations["scratch"]
    assert (location.protocol, location.backend_name) == ("file", "local")
    backend = module.backend(location.backend_name)
    try:
        assert backend.options.threads == 1
    finally:
        module.close()


def test_backend_options_file_and_local_together_are_refused_in_one_line(tmp_path) -> None:
    from balsam.config import SettingsError, loads_settings

    text = ("transfers:\n  transfer_locations: {scratch: \"file:///tmp/x\"}\n  backend_options:\n"
            "    file: {threads: 1}\n    local: {threads: 2}\n")
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    assert len(info.value.errors) == 1
    line = info.value.errors[0]
    assert "\n" not in line and line.startswith("settings.yml:4 transfers.backend_options.file:")
    assert "backend_options.file and backend_options.local" in line
    # A bad option under the other name is reported where it is written.
    with pytest.raises(SettingsError, match=r"settings.yml:4 transfers.backend_options.file.thread: unknown option"):
        loads_settings("transfers:\n  transfer_locations: {}\n  backend_options:\n    file: {thread: 1}\n")


# -- globus endpoint: section key vs backend option -----------------------------------------------


def test_globus_section_keys_and_backend_options_that_differ_are_refused(tmp_path) -> None:
    pytest.importorskip("balsam_transfer_globus")
    from balsam.config import SettingsError, loads_settings

    text = ("transfers:\n"
            "  globus_endpoint_id: 11111111-1111-1111-1111-111111111111\n"
            "  globus_endpoint_site_path: /~/from-section-key\n"
            "  transfer_locations: {dtn: \"globus://22222222-2222-2222-2222-222222222222\"}\n"
            "  backend_options:\n"
            "    globus:\n"
            "      endpoint_id: 33333333-3333-3333-3333-333333333333\n"
            "      endpoint_site_path: /~/from-backend-options\n")
    with pytest.raises(SettingsError) as info:
        loads_settings(text, source=str(tmp_path / "settings.yml"))
    errors = info.value.errors
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{tmp_path / 'settings.yml'}:7 transfers.backend_options.globus.endpoint_id: ")
    assert "transfers.globus_endpoint_id" in errors[0] and "balsam site sync" in errors[0]
    assert errors[1].startswith(f"{tmp_path / 'settings.yml'}:8 transfers.backend_options.globus.endpoint_site_path: ")
    assert "transfers.globus_endpoint_site_path" in errors[1]
    # The same value twice, or one of the two, is fine.
    same = text.replace("33333333-3333-3333-3333-333333333333", "11111111-1111-1111-1111-111111111111") \
               .replace("/~/from-backend-options", "/~/from-section-key")
    assert loads_settings(same).transfers.backend_options["globus"]["endpoint_id"].startswith("1111")
    loads_settings(text.split("  backend_options:")[0])
