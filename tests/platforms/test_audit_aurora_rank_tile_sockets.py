"""Aurora: a multi-node GPU job's ranks are bound to cores of the socket of the tiles they take.

A multi-node job gets the mask of all 12 tiles, and ranks narrow it by their local rank
(docs/platforms/aurora.md's tile_per_rank.sh, ALCF's gpu_tile_compact.sh): local rank r takes tile r
(times gpus_per_rank). The binding spread the ranks evenly over the two sockets, so a 2-node
``ranks_per_node=4, gpus_per_rank=1`` job had local ranks 2 and 3 on cores 53-102 (socket 1) while
their tiles 2 and 3 (GPU 1) sit on socket 0. Driven through the real launcher in mpi mode in a faked
PBS allocation; the recording mpiexec applies PALS ``--env NAME=value`` to the ranks, as PALS does.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from machine_jobs import job_out, make_runnable
from platform_harness import docs_tile_wrapper, flat_aurora_app, run_aurora_mpi_job

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "platforms" / "aurora.md"


def socket_of_cores(cores: str) -> set[int]:
    """Sockets of a PALS list entry (``1-12`` or ``1-4,105-108``): cores 0-51 (and their second
    threads 104-155) are socket 0, 52-103 (156-207) socket 1."""
    ids = [int(i) for part in cores.split(",") for i in _range(part)]
    return {(i % 104) // 52 for i in ids}


def _range(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def socket_of_flat_tile(tile: str) -> int:
    return 0 if int(tile) // 2 < 3 else 1  # FLAT tile t is GPU t // 2; GPUs 0-2 on socket 0


def test_two_node_job_ranks_on_their_tiles_socket(balsam_env, fake_machine, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = docs_tile_wrapper(DOCS, tmp_path)
    command = f"{shlex.quote(str(wrapper))} bash -c 'echo local=$PALS_LOCAL_RANKID mask=$ZE_AFFINITY_MASK'"
    machine, site, Wrapped = flat_aurora_app(fake_machine, HOSTS, tmp_path, monkeypatch, "Wrapped", command)
    ids = make_runnable([Wrapped.submit(workdir="mn", num_nodes=2, ranks_per_node=4, gpus_per_rank=1, save=False)])
    record = run_aurora_mpi_job(machine, site[1], ids)
    bind = dict(record["options"])["--cpu-bind"]
    assert bind.startswith("list:")
    per_rank = bind[len("list:"):].split(":")
    assert len(per_rank) == 4
    # The faked ranks of both nodes run here (local ids 0-7); those of one node are local 0-3.
    masks = dict(re.findall(r"local=(\d+) mask=(\S+)", job_out(site, "mn")))
    for rank in range(4):
        tile = masks[str(rank)]
        assert socket_of_cores(per_rank[rank]) == {socket_of_flat_tile(tile)}, (rank, tile, bind)


@pytest.mark.parametrize("ranks,gpus,expected", [
    # ALCF's documented 12-rank layout (and 6 ranks of a whole GPU) stay as they were.
    (12, 1, "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"),
    (6, 2, "list:1-17:18-34:35-51:53-69:70-86:87-103"),
    # 4 ranks of one tile: tiles 0-3 (GPUs 0, 1) are all on socket 0.
    (4, 1, "list:1-12:13-24:25-36:37-48"),
    # 8 ranks: tiles 0-5 on socket 0, tiles 6 and 7 (GPU 3) on socket 1.
    (8, 1, "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68"),
    # A rank whose tiles are near both sockets keeps the even spread: all 12 tiles (its first, tile
    # 0, gave it socket 0 alone, half the cores), tiles 4-7 (GPUs 2 and 3) of rank 1 of 2.
    (1, 12, "list:1-51,53-103"),
    (2, 4, "list:1-51:53-103"),
    (2, 6, "list:1-51:53-103"),
])
def test_multi_node_binding_follows_the_tiles(ranks: int, gpus: int, expected: str) -> None:
    from balsam.platform import LaunchSpec
    from balsam_platform_aurora import AuroraPlatform

    spec = LaunchSpec(cmdline="app", hostnames=HOSTS, ranks_per_node=ranks, gpus_per_rank=gpus, whole_nodes=True)
    assert AuroraPlatform(options={"device_hierarchy": "flat"}).cpu_binding(spec) == expected


@pytest.mark.parametrize("ranks,gpus,expected", [
    # Whole GPUs (ids 0-5, 2 FLAT tiles each): rank 1 of 2 GPUs each takes GPUs 2 and 3, both sockets.
    (2, 2, "list:1-51:53-103"),
    (1, 6, "list:1-51,53-103"),
    (4, 1, "list:1-17:18-34:35-51:53-69"),  # GPUs 0-2 on socket 0, GPU 3 on socket 1
    (6, 1, "list:1-17:18-34:35-51:53-69:70-86:87-103"),
])
def test_multi_node_binding_of_whole_gpus(ranks: int, gpus: int, expected: str) -> None:
    from balsam.platform import LaunchSpec
    from balsam_platform_aurora import AuroraPlatform

    spec = LaunchSpec(cmdline="app", hostnames=HOSTS, ranks_per_node=ranks, gpus_per_rank=gpus, whole_nodes=True)
    aurora = AuroraPlatform(options={"device_hierarchy": "flat", "tiles_per_gpu": 1})
    assert aurora.cpu_binding(spec) == expected
