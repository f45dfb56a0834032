"""The backfill keys of ``elastic_queue`` (nodes, wall times, waits, use_backfill) under
``strategy: simple``, which reads none of them: they were accepted and silently did nothing. Now
one warning line names those set away from their defaults: ``balsam site check-settings`` prints
it, and the module logs it once when it starts (an audit of settings keys)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

SIMPLE = """scheduler:
  name: local
  allowed_queues: {local: {max_nodes: 8, max_walltime: 600, max_queued_jobs: 10}}
elastic_queue:
  strategy: simple
  strategy_options: {nodes_per_block: 4, wall_time_min: 60}
  max_num_nodes: 1
  max_wall_time_min: 40
  min_wall_time_min: 36
  use_backfill: false
  max_queue_wait_time_min: 1
"""
NAMED = "strategy 'simple' ignores max_num_nodes: 1, min_wall_time_min: 36, max_wall_time_min: 40, " \
        "max_queue_wait_time_min: 1, use_backfill: false"


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site"
    (path / "data").mkdir(parents=True)
    (path / ".balsam-site").write_text("1\n")
    (path / "settings.yml").write_text(text)
    return path


def _check_settings(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "site", "check-settings", str(path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_check_settings_names_the_keys_the_simple_strategy_ignores(tmp_path) -> None:
    site = _site(tmp_path, SIMPLE)
    proc = _check_settings(site)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ignores" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Warning: {site / 'settings.yml'}:5 elastic_queue.strategy: {NAMED} ")
    # Keys left at their defaults, and the backfill strategy (which reads them), draw nothing.
    for text in ("elastic_queue:\n  strategy: simple\n  max_num_nodes: 127\n",
                 SIMPLE.replace("strategy: simple", "strategy: backfill").replace(
                     "  strategy_options: {nodes_per_block: 4, wall_time_min: 60}\n", "").replace(
                     "  use_backfill: false\n", "")):
        (site / "settings.yml").write_text(text)
        proc = _check_settings(site)
        assert proc.returncode == 0 and "ignores" not in proc.stderr, proc.stderr


def test_the_agent_logs_the_ignored_keys_once_at_start(tmp_path, caplog) -> None:
    """The agent's start logs the section's warnings (one place for every module's); the module
    itself no longer logs them too."""
    from types import SimpleNamespace

    from balsam.config import SiteConfig
    from balsam.site.agent import Agent
    from balsam_elastic.module import ElasticQueueModule

    site = SiteConfig(_site(tmp_path, SIMPLE))
    caplog.set_level(logging.WARNING)
    section = site.settings.elastic_queue  # read as the agent reads it: not logged there
    assert [r for r in caplog.records if "ignores" in r.getMessage()] == []
    assert len(site.settings.warnings) == 1 and NAMED in site.settings.warnings[0]
    ElasticQueueModule(site, section, client=None)
    assert [r for r in caplog.records if "ignores" in r.getMessage()] == []
    agent = Agent(site, client=SimpleNamespace(), modules=[])
    agent.start()
    agent.shutdown("signal", join_timeout=5)
    warned = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{site.settings_path}:5 elastic_queue.strategy: {NAMED}"), warned


def test_a_strategy_that_does_not_say_what_it_reads_draws_no_warning() -> None:
    from balsam_elastic import ElasticQueueOptions, Strategy
    from balsam_elastic.strategy import STRATEGY_SECTION_KEYS

    assert Strategy.reads_section_keys is None
    options = ElasticQueueOptions(strategy="simple", max_num_nodes=1, regular_queue_after_min=5)
    assert options.ignored_keys() == ["max_num_nodes", "regular_queue_after_min"]
    assert ElasticQueueOptions(strategy="backfill", max_num_nodes=1).warnings() == {}
    import attrs

    assert set(STRATEGY_SECTION_KEYS) <= set(attrs.fields_dict(ElasticQueueOptions))
    with pytest.MonkeyPatch.context() as mp:
        from balsam_elastic.simple import SimpleStrategy

        mp.setattr(SimpleStrategy, "reads_section_keys", None)
        assert options.warnings() == {}


BACKFILL_OFF = """scheduler:
  name: local
  allowed_queues: {local: {max_nodes: 8, max_walltime: 600, max_queued_jobs: 10}}
elastic_queue:
  max_num_nodes: 4
  min_wall_time_min: 20
  use_backfill: false
  max_queue_wait_time_min: 3
  regular_queue_after_min: 30
"""
OFF_NAMED = "use_backfill: false ignores min_wall_time_min: 20, max_queue_wait_time_min: 3, regular_queue_after_min: 30"


def test_keys_the_backfill_strategy_reads_only_for_windows_are_named_under_use_backfill_false(tmp_path) -> None:
    """use_backfill: false: every request is max_num_nodes x (max_wall_time_min - pad) in the regular
    queue, so min_wall_time_min (the shortest window), max_queue_wait_time_min (a window-fitted
    request's staleness) and regular_queue_after_min (taken when no window fits) did nothing, without
    a word. Now one warning, on use_backfill's line, names those set away from their defaults."""
    from balsam_elastic import ElasticQueueOptions

    site = _site(tmp_path, BACKFILL_OFF)
    proc = _check_settings(site)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ignores" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Warning: {site / 'settings.yml'}:7 elastic_queue.use_backfill: {OFF_NAMED} "), lines
    # The keys it does read without windows (nodes, the longest wall time, the pad) draw nothing,
    # nor do the window keys at their defaults or with use_backfill: true.
    assert ElasticQueueOptions(use_backfill=False, max_num_nodes=2, min_num_nodes=2, max_wall_time_min=90,
                               wall_time_pad_min=2).warnings() == {}
    assert ElasticQueueOptions(use_backfill=True, min_wall_time_min=20, regular_queue_after_min=30).warnings() == {}
    assert ElasticQueueOptions(use_backfill=False, regular_queue_after_min=30).ignored_keys() == ["regular_queue_after_min"]
    # Under simple, which reads none of them, the strategy warning names them all (once, not twice).
    simple = ElasticQueueOptions(strategy="simple", use_backfill=False, min_wall_time_min=20)
    assert list(simple.warnings()) == ["strategy"] and simple.ignored_keys() == ["min_wall_time_min", "use_backfill"]
