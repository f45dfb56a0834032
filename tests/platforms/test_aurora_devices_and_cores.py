"""Aurora: the device hierarchy behind ZE_AFFINITY_MASK, the cores ALCF reserves, and whole-node
bindings that keep each rank on one socket (pure: the driver, the NodeManager and the launcher's
launch_environment over its values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.runner import launch_environment
from balsam.platform import LaunchSpec, cpu_bind_list, parse_id_ranges
from balsam_platform_aurora import AuroraOptions, AuroraPlatform, SunspotPlatform
from balsam_platform_aurora.platform import affinity_mask

HOSTS = ("x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov")
#: ALCF's Aurora "Running jobs" binding for 12 ranks of 8 cores: socket 0 then socket 1, cores 0
#: and 52 left out, no rank on both sockets.
ALCF_12_BY_8 = "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"


@pytest.fixture(autouse=True)
def _no_hierarchy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)


def _nodes(tmp_path: Path, platform: AuroraPlatform, n: int = 1):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{h}\n" for h in HOSTS[:n]))
    return platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})


# -- F1: ZE_AFFINITY_MASK in the numbering of the device hierarchy, set next to it ----------------


def test_unset_hierarchy_is_flat_and_tiles_are_flat_devices() -> None:
    """Level Zero's default (and ALCF's frameworks module) is FLAT: every tile is a root device,
    0 ... 11, and "0.1" (device 0's sub-device 1) names nothing there."""
    platform = AuroraPlatform()
    assert platform.gpu_environment(["0.1"]) == {
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1", "ZE_FLAT_DEVICE_HIERARCHY": "FLAT", "ZE_AFFINITY_MASK": "1"}
    assert platform.gpu_environment(["2.0", "2.1"])["ZE_AFFINITY_MASK"] == "4,5"
    assert platform.gpu_environment(["5.1"])["ZE_AFFINITY_MASK"] == "11"


@pytest.mark.parametrize("launcher_env, hierarchy, mask", [
    ("FLAT", "FLAT", "1,6"),            # `module load frameworks` (the Balsam-on-Aurora guide's step)
    ("COMPOSITE", "COMPOSITE", "0.1,3.0"),
    ("composite", "COMPOSITE", "0.1,3.0"),
    ("COMBINED", "COMBINED", "1,6"),    # tiles are root devices, numbered as in FLAT
])
def test_the_launchers_hierarchy_is_inherited_and_set_with_the_mask(
        monkeypatch: pytest.MonkeyPatch, launcher_env: str, hierarchy: str, mask: str) -> None:
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", launcher_env)
    env = AuroraPlatform().gpu_environment(["0.1", "3.0"])
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == hierarchy and env["ZE_AFFINITY_MASK"] == mask


def test_the_option_sets_the_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    env = AuroraPlatform(options={"device_hierarchy": "composite"}).gpu_environment(["0.1"])
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "COMPOSITE" and env["ZE_AFFINITY_MASK"] == "0.1"
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "COMPOSITE")
    env = SunspotPlatform(options={"device_hierarchy": "flat"}).gpu_environment(["0.1"])
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and env["ZE_AFFINITY_MASK"] == "1"
    # whole GPUs (tiles_per_gpu=1) in FLAT mode are both of their tiles
    env = AuroraPlatform(options={"tiles_per_gpu": 1, "device_hierarchy": "flat"}).gpu_environment(["1"])
    assert env["ZE_AFFINITY_MASK"] == "2,3"


@pytest.mark.parametrize("tiles", [0, 3, 4])
def test_tiles_per_gpu_is_1_or_2(tiles: int) -> None:
    """A Max 1550 has 2 tiles: with tiles_per_gpu=3 the ids 0.2 and 1.0 were both written as flat
    tile 2 ... 3 of the wrong GPUs (GPU 1's tile 0 is flat 2 on the hardware)."""
    message = f"must be 1 (whole GPUs) or 2 (tiles; a Max 1550 has 2), got {tiles}"
    assert AuroraOptions(tiles_per_gpu=tiles).validate() == {"tiles_per_gpu": message}
    with pytest.raises(ValueError, match=rf"^launcher.platform_options.tiles_per_gpu: must be 1 \(whole GPUs\) or 2"):
        AuroraPlatform(options={"tiles_per_gpu": tiles})
    assert AuroraOptions(tiles_per_gpu=1).validate() == {} and AuroraOptions(tiles_per_gpu=2).validate() == {}


def test_flat_ids_count_the_hardware_tiles() -> None:
    assert affinity_mask(["1.0", "1.1", "5.1"], "FLAT") == "2,3,11"
    assert affinity_mask(["0", "3"], "COMBINED") == "0,1,6,7"
    with pytest.raises(ValueError, match=r"GPU id '0.2' is not an Aurora GPU"):
        affinity_mask(["0.2", "1.0"], "FLAT")


def test_a_bad_hierarchy_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "device_hierarchy" in AuroraOptions(device_hierarchy="tiles").validate()
    with pytest.raises(ValueError, match="device_hierarchy: 'tiles' is not one of inherit, flat"):
        AuroraPlatform(options={"device_hierarchy": "tiles"})
    from balsam.config.settings import SettingsError, loads_settings

    with pytest.raises(SettingsError, match=r"settings.yml:4 launcher.platform_options.device_hierarchy"):
        loads_settings("launcher:\n  platform: aurora\n  platform_options:\n    device_hierarchy: tiles\n",
                       only=["launcher"])
    # A value Level Zero does not know, in the launcher's environment: the launcher stops at discovery.
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "flatt")
    with pytest.raises(ValueError) as caught:
        _nodes(tmp_path, AuroraPlatform())
    assert "\n" not in str(caught.value) and "$ZE_FLAT_DEVICE_HIERARCHY='flatt'" in str(caught.value)


def test_the_launched_job_sees_a_mask_and_a_mode_that_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment mpi and serial mode start a job with (runner.launch_environment): the job's
    own variables, then the platform's GPU variables. A job or module that set another hierarchy
    no longer reads the mask in another numbering."""
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    platform = AuroraPlatform()
    placement = NodeManager(_nodes(tmp_path, platform)).assign(1, Demand(gpus_per_rank=2, node_packing_count=6))

    class Hook:
        def get_hookimpls(self) -> list:
            return []

    prepared = PreparedJob(job=None, id=1, workdir=tmp_path, cmdline="app", preamble="", demand=Demand(),
                           env={"ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE"}, launch_params={})
    env = launch_environment(prepared, placement, platform, Hook())
    assert placement.gpu_ids == (("0.0", "0.1"),)
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and env["ZE_AFFINITY_MASK"] == "0,1"


# -- F2: cores 0 and 52 are left to the system ----------------------------------------------------


def test_default_cores_leave_the_first_core_of_each_socket(tmp_path: Path) -> None:
    assert AuroraOptions().cpu_ids == "1-51,53-103"
    platform = AuroraPlatform()
    (node,) = _nodes(tmp_path, platform)
    assert node.cpu_ids == parse_id_ranges("1-51,53-103")
    near = dict(node.gpu_cpus)
    assert near["0.0"] == near["2.1"] == tuple(range(1, 52)) and near["3.0"] == near["5.1"] == tuple(range(53, 104))
    nm = NodeManager([node])
    placed = [nm.assign(i, Demand(threads_per_rank=8, gpus_per_rank=1, node_packing_count=12)) for i in range(12)]
    taken = {c for p in placed for c in p.cpu_ids[0]}
    assert not taken & {0, 52} and len(taken) == 96
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS[:1], cpu_ids=placed[0].cpu_ids, threads_per_rank=8)
    assert platform.cpu_binding(spec) == "list:1-8"


def test_explicit_cpu_ids_keep_working(tmp_path: Path) -> None:
    platform = AuroraPlatform(options={"cpu_ids": "0-103"})
    (node,) = _nodes(tmp_path, platform)
    assert node.cpu_ids == tuple(range(104))
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS, ranks_per_node=2, threads_per_rank=52)
    assert platform.cpu_binding(spec) == "list:0-51:52-103"


# -- F3: whole-node ranks spread over the sockets, none on both -----------------------------------


def test_two_node_job_of_12_ranks_by_8_threads_binds_as_alcf_does() -> None:
    platform = AuroraPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=12, threads_per_rank=8, gpus_per_rank=1)
    args = platform.mpi_launch_args(spec)
    assert args[args.index("--cpu-bind") + 1] == ALCF_12_BY_8
    # 5 ranks per node: 3 on socket 0, 2 on socket 1, 17 cores each
    spec = LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=5)
    assert platform.cpu_binding(spec) == "list:1-17:18-34:35-51:53-69:70-86"
    # hyperthreads follow their cores
    spec = LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=12, threads_per_rank=16, threads_per_core=2)
    assert platform.cpu_binding(spec).split(":")[7] == "53-60,157-164"


def test_bindings_that_span_no_socket_are_unchanged() -> None:
    platform = AuroraPlatform()
    # one rank: every core of the node, as before
    assert platform.cpu_binding(LaunchSpec(cmdline="a", hostnames=HOSTS, ranks_per_node=1)) == "list:1-51,53-103"
    # 6 ranks of 17: the id-order cut already keeps each rank on one socket
    assert platform.cpu_binding(LaunchSpec(cmdline="a", hostnames=HOSTS, ranks_per_node=6)) == \
        "list:1-17:18-34:35-51:53-69:70-86:87-103"
    # 3 ranks of 34 threads: a socket cut would give a rank 25 cores; the id-order cut stands
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS, ranks_per_node=3, threads_per_rank=34)
    assert platform.cpu_binding(spec) == "list:1-34:35-51,53-69:70-103"
    # no sockets declared (gpu_cpus: ""): cut in id order as before
    plain = AuroraPlatform(options={"gpu_cpus": ""})
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS, ranks_per_node=12, threads_per_rank=8)
    assert plain.cpu_binding(spec).split(":")[7] == "49-51,53-57"


def test_cpu_bind_list_over_domains_is_generic() -> None:
    from balsam.platform import cpu_domains_of

    cores = parse_id_ranges("1-51,53-103")
    spec = LaunchSpec(cmdline="a", hostnames=("h1", "h2"), ranks_per_node=12, threads_per_rank=8)
    assert cpu_bind_list(spec, cores).split(":")[7] == "49-51,53-57"  # no domains: id order, as before
    domains = cpu_domains_of(cores, [("g0", range(0, 52)), ("g1", range(52, 104))])
    assert domains == (tuple(range(1, 52)), tuple(range(53, 104)))
    assert cpu_bind_list(spec, cores, cpu_domains=domains) == ALCF_12_BY_8
    # a packed job's assigned cores keep their order (the launcher lists rank i's GPU's cores i-th)
    spec = LaunchSpec(cmdline="a", hostnames=("h1",), ranks_per_node=2, threads_per_rank=4,
                      cpu_ids=[[53, 54, 55, 56, 1, 2, 3, 4]])
    assert cpu_bind_list(spec, cores, cpu_domains=domains) == "list:53-56:1-4"
