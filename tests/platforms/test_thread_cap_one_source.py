"""The threads_per_core cap has one source, ``Platform.hardware_threads_per_core``: both job modes
hand it to their node manager (as they hand ``cpu_ids_are_cores``), the same attribute the binding,
the serial pinning and the launcher's warning read. It was read from ``NodeInfo`` as well, which
each platform's ``discover_nodes`` had to fill in: a platform that set only its class attribute
warned "placed ... at threads_per_core=2" while its node manager counted the cores uncapped (8
threads at 4 per core: 2 cores, on 2-thread cores that hold only 4 of the threads)."""

from __future__ import annotations

import json
import socket
import types
from pathlib import Path
from typing import Any, Mapping

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config import SiteConfig
from balsam.config.schema import LauncherSettings
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.mpi import MPIMode
from balsam.launcher.modes.serial import SerialMode
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import NodeInfo


class TwoThreadCores(DefaultPlatform):
    """A plugin's platform whose CPU ids are cores of 2 hardware threads, declared on the class only:
    its discover_nodes copies the cap nowhere."""

    cpu_ids_are_cores = True
    hardware_threads_per_core = 2

    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        return [NodeInfo(node_id="0", hostname=socket.gethostname(), cpu_ids=range(8))]


#: 8 threads at 4 per core: capped at 2 per core, 4 cores (uncapped: 2)
OVER_CAP = Demand(threads_per_rank=8, threads_per_core=4, node_packing_count=2)


def _context(tmp_path: Path, job_mode: str, settings: Any = None, site_config: Any = None) -> LauncherContext:
    platform = TwoThreadCores()
    return LauncherContext(site_config=site_config, settings=settings, site_id=1, data_path=tmp_path / "data",
                           log_path=tmp_path / "log", platform=platform, nodes=platform.discover_nodes({}),
                           wall_time_min=10, job_mode=job_mode)


def test_mpi_mode_counts_cores_at_the_platforms_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_SPAWNER", "0")  # an in-process pool: no spawner to end
    settings = types.SimpleNamespace(launcher=LauncherSettings())
    mode = MPIMode(_context(tmp_path, "mpi", settings))
    assert mode.node_manager.max_threads_per_core == 2
    assert mode.node_manager.assign(1, OVER_CAP).cpu_ids == ((0, 1, 2, 3),)


def test_serial_mode_workers_count_cores_at_the_platforms_cap(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text("launcher:\n  platform: default\n")
    site_config = SiteConfig(site)
    context = _context(tmp_path, "serial", site_config.launcher_settings, site_config)
    config = json.loads(json.dumps(SerialMode(context).worker_config()))  # as the ranks read it

    class Built(Exception):
        pass

    def stop_at_the_node_manager(nodes: Any, **kwargs: Any) -> None:
        raise Built(NodeManager(nodes, **kwargs))  # the rest of build_master is not needed here

    monkeypatch.setattr(serial_worker, "NodeManager", stop_at_the_node_manager)
    with pytest.raises(Built) as built:
        serial_worker.build_master(config, None, [0], None, None, lambda: context.platform)  # type: ignore[arg-type]
    node_manager = built.value.args[0]
    assert node_manager.max_threads_per_core == 2
    assert node_manager.assign(1, OVER_CAP).cpu_ids == ((0, 1, 2, 3),)


def test_node_info_no_longer_carries_a_second_copy() -> None:
    with pytest.raises(TypeError):
        NodeInfo(node_id="0", hostname="h", cpu_ids=range(8), hardware_threads_per_core=2)  # type: ignore[call-arg]
    # without the platform's cap (0: not known), threads_per_core is counted as asked
    assert NodeManager([NodeInfo(node_id="0", hostname="h", cpu_ids=range(8))]).assign(1, OVER_CAP).cpu_ids == ((0, 1),)
