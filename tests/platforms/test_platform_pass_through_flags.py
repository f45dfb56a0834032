"""Every shipped platform's site accepts its scheduler driver's documented pass-through key out of
the box (``-x qsub_flags=...`` on PBS and Cobalt, ``-x sbatch_flags=...`` on Slurm): docs/schedulers
document them, and a key not in ``optional_batch_job_params`` is refused. Only Theta listed it."""

from __future__ import annotations

import importlib

import pytest

from balsam.batch_job_rules import check_batch_job
from balsam.plugins.manager import get_plugin_manager

#: The driver module of each scheduler and its pass-through key, read from the driver itself.
PASS_THROUGH = {
    name: importlib.import_module(f"balsam_scheduler_{name}.scheduler").RAW_FLAGS_PARAM
    for name in ("pbs", "slurm", "cobalt")
}


def _platforms() -> list[str]:
    """Every installed platform whose site defaults name a scheduler with a pass-through key (the
    test fixtures' platforms use the local scheduler, which has none)."""
    manager = get_plugin_manager()
    return sorted(name for name in manager.list_drivers("platform") if name != "default"
                  and manager.load_driver("platform", name)().settings_defaults()["scheduler"]["name"] in PASS_THROUGH)


@pytest.mark.parametrize("name", _platforms())
def test_the_site_defaults_accept_the_drivers_pass_through_flags(name: str) -> None:
    platform = get_plugin_manager().load_driver("platform", name)()
    scheduler = platform.settings_defaults()["scheduler"]
    key = PASS_THROUGH[scheduler["name"]]
    queue, limits = next(iter(scheduler["allowed_queues"].items()))
    project = (scheduler.get("allowed_projects") or ["p"])[0]
    check_batch_job({"queue": queue, "project": project, "num_nodes": 1, "wall_time_min": 1,
                     "optional_params": {key: "--x"}},
                    scheduler["allowed_queues"], scheduler.get("allowed_projects") or [],
                    scheduler["optional_batch_job_params"])
