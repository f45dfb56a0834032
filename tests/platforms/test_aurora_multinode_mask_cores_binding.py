"""Aurora: a multi-node GPU job gets the mask of all of a node's tiles (so the docs' per-rank wrapper
narrows it), cpu_ids refuses hardware-thread ids, and a relative --cpu-bind (depth, core) on part of
a node is warned once per app and binding."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_aurora import AuroraOptions, AuroraPlatform

HOSTS = ("x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "platforms" / "aurora.md"
ALL_FLAT_TILES = ",".join(map(str, range(12)))


@pytest.fixture(autouse=True)
def _no_hierarchy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)


def _multi_node(gpus_per_rank: float = 1, **kw) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=4, gpus_per_rank=gpus_per_rank,
                      cpu_ids=[(), ()], gpu_ids=[(), ()], **kw)


def _env_options(line: str) -> dict[str, str]:
    words = shlex.split(line)
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--env")


# -- 1: multi-node GPU jobs get every tile of a node --------------------------------------------------


def test_two_node_gpu_job_gets_the_twelve_tile_mask() -> None:
    platform = AuroraPlatform()
    env = platform.whole_node_environment(_multi_node())
    assert env == {"ZE_AFFINITY_MASK": ALL_FLAT_TILES, "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
                   "ZE_FLAT_DEVICE_HIERARCHY": "FLAT"}
    # On the line as PALS --env, the same on every node, after --envall.
    assert _env_options(platform.mpi_command_line(_multi_node())) == env


def test_whole_node_mask_follows_the_hierarchy_and_tiles_per_gpu() -> None:
    composite = AuroraPlatform({"device_hierarchy": "composite"})
    assert composite.whole_node_environment(_multi_node())["ZE_AFFINITY_MASK"] == \
        "0.0,0.1,1.0,1.1,2.0,2.1,3.0,3.1,4.0,4.1,5.0,5.1"
    whole_gpus = AuroraPlatform({"device_hierarchy": "composite", "tiles_per_gpu": 1})
    assert whole_gpus.whole_node_environment(_multi_node())["ZE_AFFINITY_MASK"] == "0,1,2,3,4,5"
    # FLAT numbers the hardware's tiles whatever tiles_per_gpu: a whole GPU is its two tiles.
    flat_whole_gpus = AuroraPlatform({"tiles_per_gpu": 1})
    assert flat_whole_gpus.whole_node_environment(_multi_node(2))["ZE_AFFINITY_MASK"] == ALL_FLAT_TILES


def test_no_whole_node_mask_for_cpu_only_single_node_or_assigned_tiles() -> None:
    platform = AuroraPlatform()
    assert platform.whole_node_environment(_multi_node(0)) == {}
    assert _env_options(platform.mpi_command_line(_multi_node(0))) == {}
    single = LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=4, gpus_per_rank=1,
                        cpu_ids=[(1, 2, 3, 4)], gpu_ids=[("0.0", "0.1", "1.0", "1.1")])
    assert _env_options(platform.mpi_command_line(single)) == {}  # its mask is in its environment


def _docs_wrapper(tmp_path: Path) -> Path:
    text = DOCS.read_text()
    (script,) = [s for s in re.findall(r"```bash\n(.*?)```", text, re.S) if "tile_per_rank.sh" in s]
    path = tmp_path / "tile_per_rank.sh"
    path.write_text(script)
    path.chmod(0o755)
    return path


def test_docs_wrapper_gives_each_rank_of_a_two_node_job_one_tile(tmp_path: Path) -> None:
    """The docs' wrapper run as PALS runs it for each rank: the --env of the line over the launcher's
    environment, PALS_LOCAL_RANKID 0-3 on each of the two nodes."""
    wrapper = _docs_wrapper(tmp_path)
    line_env = _env_options(AuroraPlatform().mpi_command_line(_multi_node()))
    seen: dict[int, list[str]] = {}
    for node in range(2):
        for local in range(4):
            out = subprocess.run([str(wrapper), "bash", "-c", "echo ${ZE_AFFINITY_MASK-unset}"],
                                 env={"PATH": "/usr/bin:/bin", **line_env, "PALS_LOCAL_RANKID": str(local)},
                                 capture_output=True, text=True, check=True).stdout.strip()
            seen.setdefault(node, []).append(out)
    for node, masks in seen.items():
        assert masks == ["0", "1", "2", "3"], (node, masks)


# -- 2: cpu_ids are cores, not hardware threads -------------------------------------------------------


def test_cpu_ids_with_hardware_threads_are_refused() -> None:
    errors = AuroraOptions(cpu_ids="0-207").validate()
    assert "104-207 are hardware threads" in errors["cpu_ids"] and "0-103" in errors["cpu_ids"]
    assert "0 and 52" in errors["cpu_ids"]
    with pytest.raises(ValueError, match=r"launcher.platform_options.cpu_ids: 104-207 are hardware threads"):
        AuroraPlatform({"cpu_ids": "0-207"})
    assert AuroraOptions(cpu_ids="0-103").validate() == {}
    AuroraPlatform({"cpu_ids": "0-103"})


# -- 3: relative bindings on part of a node -------------------------------------------------------------


def _packed(cores: range, app_id: int, **launch_params: str) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=1, threads_per_rank=3,
                      cpu_ids=[tuple(cores)], launch_params=launch_params, job_id=app_id * 10, app_id=app_id)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PALS binds" in r.getMessage()]


def test_depth_binding_of_a_packed_job_is_warned_once_per_app_and_binding(caplog) -> None:
    platform = AuroraPlatform()
    caplog.set_level(logging.WARNING)
    first = platform.mpi_command_line(_packed(range(4, 7), 7701, cpu_bind="depth", depth="3"))
    platform.mpi_command_line(_packed(range(7, 10), 7701, cpu_bind="depth", depth="3"))
    assert "--cpu-bind depth -d 3" in first  # passed as asked
    (warning,) = _warnings(caplog)
    assert "job 77010 (app 7701)" in warning and "4-6" in warning and "core 0" in warning
    platform.mpi_command_line(_packed(range(4, 7), 7701, cpu_bind="core"))
    assert len(_warnings(caplog)) == 2  # the same app, another binding
    platform.mpi_command_line(_packed(range(4, 7), 7702, cpu_bind="depth"))
    assert len(_warnings(caplog)) == 3  # another app


def test_default_first_cores_are_not_the_nodes_first_cores(caplog) -> None:
    """Cores 1-3 are the first the default cpu_ids gives, but PALS lays depth out from core 0."""
    platform = AuroraPlatform()
    caplog.set_level(logging.WARNING)
    platform.mpi_command_line(_packed(range(1, 4), 7703, cpu_bind="depth", depth="3"))
    assert len(_warnings(caplog)) == 1
    every_core = AuroraPlatform({"cpu_ids": "0-103"})
    every_core.mpi_command_line(_packed(range(0, 3), 7704, cpu_bind="depth", depth="3"))
    assert len(_warnings(caplog)) == 1  # cores 0-2: where PALS puts it


def test_no_binding_warning_for_lists_or_whole_nodes(caplog) -> None:
    platform = AuroraPlatform()
    caplog.set_level(logging.WARNING)
    assert "--cpu-bind list:4-6 " in platform.mpi_command_line(_packed(range(4, 7), 7705))
    platform.mpi_command_line(_multi_node(0, launch_params={"cpu_bind": "depth", "depth": "8"}, app_id=7706))
    assert _warnings(caplog) == []
