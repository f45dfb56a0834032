"""Ranks that share a list of MIG instances are warned about, once per job.

CUDA shows a process only the first MIG instance of its CUDA_VISIBLE_DEVICES: a job of several
ranks per node given several instances runs every rank on the first unless its command narrows the
list per rank (docs/platforms/polaris.md). A multi-node job owns whole nodes and gets no list (MIG
UUIDs differ on every node and its ranks share one environment): the doc shows how each rank picks
its own node's instance. The node manager is pure accounting over NodeInfo values (the recorded
``nvidia-smi -L`` of a Polaris node split into eight 3g.20gb instances); the launch environment is
built by the launcher's own ``launch_environment``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.runner import launch_environment
from balsam.platform import NodeInfo, parse_nvidia_smi_list

RECORDED = Path(__file__).resolve().parents[1] / "platforms" / "recorded"
MIG_IDS = tuple(parse_nvidia_smi_list((RECORDED / "polaris-mig-3g.20gb-nvidia-smi-L.txt").read_text()).mig_ids(
    ["3", "2", "1", "0"]))


def mig_node(name: str, ids: tuple[str, ...] = MIG_IDS) -> NodeInfo:
    return NodeInfo(name, f"{name}.host", range(32), ids)


class NoHook:
    """A ``balsam_launch_environment`` hook relay with no plugin implementing it."""

    @staticmethod
    def get_hookimpls() -> list:
        return []


def _prepared(job_id: int, demand: Demand) -> PreparedJob:
    return PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={}, demand=demand)


def test_the_launch_environment_lists_them_and_warns_when_ranks_share_mig_instances(caplog) -> None:
    platform = DefaultPlatform()
    nm = NodeManager([mig_node("a"), mig_node("b")])
    multi = Demand(num_nodes=2, ranks_per_node=4, gpus_per_rank=1)
    four = Demand(ranks_per_node=4, gpus_per_rank=1, node_packing_count=2)
    one = Demand(gpus_per_rank=1, node_packing_count=8)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        env = launch_environment(_prepared(1, multi), nm.assign(1, multi), platform, NoHook())
        assert "CUDA_VISIBLE_DEVICES" not in env  # whole nodes: no list (their UUIDs differ)
        nm.free(1)
        env = launch_environment(_prepared(2, four), nm.assign(2, four), platform, NoHook())
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(MIG_IDS[:4])
        env = launch_environment(_prepared(3, one), nm.assign(3, one), platform, NoHook())
        assert env["CUDA_VISIBLE_DEVICES"] == MIG_IDS[4]
    warned = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in warned] == ["job 2"]  # one line per job; none for one rank
    assert "gpu_per_rank.sh in docs/platforms/polaris.md" in warned[0] and "its 4 ranks per node" in warned[0]
    # Whole GPUs, one per rank: no MIG instance shared, nothing to say.
    caplog.clear()
    plain = NodeManager([NodeInfo("p", "p", range(32), ["3", "2", "1", "0"])])
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        env = launch_environment(_prepared(4, four), plain.assign(4, four), platform, NoHook())
    assert env["CUDA_VISIBLE_DEVICES"] == "3,2,1,0" and not caplog.records
