"""``elastic_queue.max_queued_jobs`` above the submit queue's ``max_queued_jobs``
(``scheduler.allowed_queues``): the agent caps it and says so when it starts, but ``balsam site
check-settings`` printed OK and nothing else (an audit on the real Slurm: 50 set, 2 allowed). Now
check-settings prints the same warning, on the key's line, as it does the other elastic warnings.
The module's message also read ``queue 'debug''s`` (a quoted name followed by 's)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from balsam.config import loads_settings
from balsam_elastic.module import ElasticQueueModule

from elastic_test_utils import needs_module_sections

SETTINGS = """scheduler:
  name: local
  allowed_queues: {debug: {max_nodes: 4, max_walltime: 60, max_queued_jobs: 2}}
elastic_queue:
  submit_queue: debug
  max_num_nodes: 2
  max_wall_time_min: 15
  min_wall_time_min: 10
  wall_time_pad_min: 2
  max_queued_jobs: 50
"""
CAPPED = ("max_queued_jobs 50 capped to the max_queued_jobs 2 of queue 'debug' "
          "(settings.yml scheduler.allowed_queues)")


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site"
    (path / "data").mkdir(parents=True)
    (path / ".balsam-site").write_text("1\n")
    (path / "settings.yml").write_text(text)
    return path


def _check_settings(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "check-settings", str(path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@needs_module_sections
def test_check_settings_warns_that_max_queued_jobs_is_capped_by_the_queue(tmp_path) -> None:
    site = _site(tmp_path, SETTINGS)
    proc = _check_settings(site)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "capped" in line]
    assert lines == [f"Warning: {site / 'settings.yml'}:10 elastic_queue.max_queued_jobs: {CAPPED}"], proc.stderr
    # At or under the queue's limit, a queue without one, or the key left at its default (not in
    # the file; the module still says it caps it when it starts): nothing to say.
    for text in (SETTINGS.replace("max_queued_jobs: 50", "max_queued_jobs: 2"),
                 SETTINGS.replace("  max_queued_jobs: 50\n", ""),
                 SETTINGS.replace(", max_queued_jobs: 2}", ", max_queued_jobs: 0}")):
        (site / "settings.yml").write_text(text)
        proc = _check_settings(site)
        assert proc.returncode == 0 and "capped" not in proc.stderr, proc.stderr


@needs_module_sections
def test_the_module_says_the_same_when_it_starts_and_caps(caplog) -> None:
    """Set in the file, the cap is a settings warning, which the agent logs once at its start (the
    module saying it too made two lines); left at its default, the module says it caps it."""
    settings = loads_settings(SETTINGS)
    assert [w for w in settings.warnings if "capped" in w] == [f"settings.yml:10 elastic_queue.max_queued_jobs: {CAPPED}"]
    assert [w for w in settings.agent_warnings() if "capped" in w] == [f"settings.yml:10 elastic_queue.max_queued_jobs: {CAPPED}"]
    caplog.set_level(logging.WARNING)
    module = ElasticQueueModule(SimpleNamespace(settings=settings, settings_path="settings.yml", site_id=1),
                                settings.sections["elastic_queue"], client=None)
    assert module.strategy.settings.max_queued_jobs == 2
    assert [r.getMessage() for r in caplog.records if "capped" in r.getMessage()] == []
    default = loads_settings(SETTINGS.replace("  max_queued_jobs: 50\n", ""))
    assert not [w for w in default.warnings if "capped" in w]
    module = ElasticQueueModule(SimpleNamespace(settings=default, settings_path="settings.yml", site_id=1),
                                default.sections["elastic_queue"], client=None)
    assert module.strategy.settings.max_queued_jobs == 2
    assert [r.getMessage() for r in caplog.records if "capped" in r.getMessage()] == [
        CAPPED.replace("max_queued_jobs 50", "max_queued_jobs 20")]
