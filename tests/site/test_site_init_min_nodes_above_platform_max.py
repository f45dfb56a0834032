"""``balsam site init`` merges the queue limits a scheduler reports with the platform's: when the
two node ranges have no size in common (the server's ``min_nodes`` above the platform's
``max_nodes``, or the server's ``max_nodes`` below the platform's ``min_nodes``), the written queue
must still be consistent (``min_nodes <= max_nodes``: settings.yml's loader refuses anything else,
and ``check_batch_job`` would refuse every BatchJob). The platform's own range is written, and one
warning names the queue and both ranges.

It used to keep a discovered ``min_nodes`` (PBS ``resources_min.nodect``, Slurm sinfo ``%s``)
above a smaller platform ``max_nodes`` when the platform stated no minimum: Polaris' debug queue
(platform 1..2) with a server minimum of 4 was written as ``min_nodes: 4, max_nodes: 2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from balsam.site.site_ops import stricter_queue_limits

QSTAT_Q = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "pbs" / "qstat_Qf_json.txt"


def test_discovered_min_above_the_platforms_max_leaves_a_usable_range() -> None:
    platform = {"debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 100}}
    discovered = {"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 1, "min_nodes": 4}}
    merged = stricter_queue_limits(discovered, platform)
    # min_nodes 1 is stated so that init_site's deep_merge does not bring the server's 4 back in.
    assert merged["debug"] == {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1, "min_nodes": 1}
    warnings: list[str] = []
    stricter_queue_limits(discovered, platform, warn=warnings.append)
    assert len(warnings) == 1 and "debug" in warnings[0] and "4..8" in warnings[0] and "1..2" in warnings[0]


def test_discovered_max_below_the_platforms_min_keeps_the_platforms_range() -> None:
    platform = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}}
    discovered = {"prod": {"max_nodes": 5, "max_walltime": 1440, "max_queued_jobs": 100}}
    merged = stricter_queue_limits(discovered, platform)
    assert merged["prod"]["min_nodes"] <= merged["prod"]["max_nodes"]
    assert (merged["prod"]["min_nodes"], merged["prod"]["max_nodes"]) == (10, 496)
    warnings: list[str] = []
    stricter_queue_limits(discovered, platform, warn=warnings.append)
    assert len(warnings) == 1 and "prod" in warnings[0]


def test_agreeing_ranges_merge_silently() -> None:
    platform = {"small": {"max_nodes": 24, "max_walltime": 60, "max_queued_jobs": 5}}
    discovered = {"small": {"max_nodes": 16, "max_walltime": 60, "max_queued_jobs": 5, "min_nodes": 10}}
    warnings: list[str] = []
    merged = stricter_queue_limits(discovered, platform, warn=warnings.append)
    assert merged["small"] == {"max_nodes": 16, "max_walltime": 60, "max_queued_jobs": 5}
    assert warnings == []


def _fake_qstat(tmp_path: Path) -> Path:
    """The recorded Polaris ``qstat -Q -f -F json`` with debug taking 4 to 8 nodes (the Polaris
    platform says debug takes up to 2 and states no minimum)."""
    doc = json.loads(QSTAT_Q.read_text())
    doc["Queue"]["debug"]["resources_max"]["nodect"] = 8
    doc["Queue"]["debug"]["resources_min"] = {"nodect": 4, "walltime": "00:05:00"}
    recorded = tmp_path / "qstat_Q.json"
    recorded.write_text(json.dumps(doc, indent=4))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {recorded}\n")
    qstat.chmod(0o755)
    return fake_bin


def test_polaris_site_init_writes_a_consistent_debug_queue(balsam_env, client, tmp_path: Path, monkeypatch) -> None:
    from balsam.config import load_settings
    from balsam.site.site_ops import init_site

    monkeypatch.setenv("PATH", f"{_fake_qstat(tmp_path)}:{__import__('os').environ['PATH']}")
    said: list[str] = []
    path = tmp_path / "polaris-debug"
    init_site(path, "polaris-debug", "polaris", client, echo=said.append)
    queues = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_queues"]
    assert queues["debug"]["max_nodes"] == 2 and queues["debug"].get("min_nodes", 1) == 1
    load_settings(path / "settings.yml")  # the loader accepts what was written
    warnings = [line for line in said if line.startswith("Warning:") and "debug" in line]
    assert len(warnings) == 1 and "pbs" in warnings[0] and "polaris" in warnings[0], said
    # prod's minimum (server and platform agree on 10) is untouched.
    assert queues["prod"]["min_nodes"] == 10


def test_a_platform_minimum_without_a_maximum_is_checked_against_the_discovered_maximum() -> None:
    """A platform stating ``min_nodes`` but no ``max_nodes``: init_site's merge takes the scheduler's
    ``max_nodes``, so that is the maximum the platform's minimum must fit. The range check was
    skipped (no platform maximum) and ``min_nodes: 10, max_nodes: 4`` was written (the loader
    refuses it: ``must be between 1 and max_nodes 4``). The platform has no range to write: the
    scheduler's is written, with the warning."""
    from balsam.models import AllowedQueue
    from balsam.site.site_ops import deep_merge

    discovered = {"prod": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": None}}
    platform = {"prod": {"min_nodes": 10, "max_walltime": 1440, "max_queued_jobs": 100}}
    warnings: list[str] = []
    merged = stricter_queue_limits(discovered, platform, warn=warnings.append)
    written = deep_merge({"allowed_queues": discovered}, {"allowed_queues": merged})["allowed_queues"]["prod"]
    assert (written["min_nodes"], written["max_nodes"]) == (1, 4), written
    assert AllowedQueue(**written).validate() == {}
    assert len(warnings) == 1 and "prod" in warnings[0] and "1..4" in warnings[0] and "10..?" in warnings[0], warnings
    assert "the scheduler's 1..4" in warnings[0]
    # One that fits the discovered maximum is kept, silently.
    warnings.clear()
    merged = stricter_queue_limits({"prod": {**discovered["prod"], "max_nodes": 40}}, platform, warn=warnings.append)
    assert merged["prod"]["min_nodes"] == 10 and "max_nodes" not in merged["prod"] and warnings == []
