"""Ranks whose threads do not fill whole cores (threads_per_core=2, an odd threads_per_rank) get all
their threads in the PALS ``list:`` binding.

A packed Aurora job of 2 ranks of 3 threads at 2 threads per core is given 3 cores (6 hardware
threads) by the launcher; the binding cut those cores per rank (1 core each: 2 hardware threads for
3 threads, with ``-d 3``) and left the third core idle. Driven through the real launcher in mpi mode
in a faked PBS allocation (recording PALS mpiexec); the cut itself (``cpu_bind_list``) is shared with
Polaris, checked there on the LaunchSpec the launcher builds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from machine_jobs import job_out, make_runnable
from platform_harness import flat_aurora_app, run_aurora_mpi_job

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]


def ids_of(entry: str) -> list[int]:
    out: list[int] = []
    for part in entry.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def test_packed_job_of_odd_threads_gets_all_its_threads(balsam_env, fake_machine, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    machine, site, Threads = flat_aurora_app(fake_machine, HOSTS, tmp_path, monkeypatch, "Threads",
                                             "echo threads=$OMP_NUM_THREADS")
    ids = make_runnable([Threads.submit(workdir="odd", node_packing_count=4, ranks_per_node=2, threads_per_rank=3,
                                        threads_per_core=2, save=False)])
    record = run_aurora_mpi_job(machine, site[1], ids)
    options = dict(record["options"])
    assert options["-d"] == "3"
    ranks = [ids_of(entry) for entry in options["--cpu-bind"][len("list:"):].split(":")]
    assert len(ranks) == 2
    for threads in ranks:
        assert len(threads) >= 3, options["--cpu-bind"]  # a hardware thread for every thread of the rank
    assert not set(ranks[0]) & set(ranks[1])
    # Only the 3 cores the job was given (cores 1-51, 53-103; their second threads are core + 104).
    cores = {t % 104 for rank in ranks for t in rank}
    assert len(cores) == 3 and not cores & {0, 52}


def test_polaris_cut_of_odd_threads() -> None:
    from balsam.platform import LaunchSpec
    from balsam_platform_polaris import PolarisPlatform

    polaris = PolarisPlatform(options={"gpu_list_dir": "", "discover_mig": False})
    spec = LaunchSpec(cmdline="app", hostnames=["x3006c0s13b0n0"], ranks_per_node=2, threads_per_rank=3,
                      threads_per_core=2, cpu_ids=[[4, 5, 6]])
    assert polaris.cpu_binding(spec) == "list:4,36,5:37,6,38"


def socket_of(cpu: int) -> int:
    """Aurora: cores 0-51 (second threads 104-155) are socket 0, 52-103 (156-207) socket 1."""
    return (cpu % 104) // 52


def test_odd_threads_of_tile_ranks_stay_on_their_tiles_socket(balsam_env, fake_machine, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """12 ranks of one tile and 3 threads at 2 per core are given cores 1-6 (near tiles 0-5, socket
    0) and 53-64 (tiles 6-11, socket 1), in rank order: cutting those cores' hardware threads 3 by
    3 put ranks 4 and 5 (tiles 4 and 5, GPU 2, socket 0) on cores 53-55. Each rank's CPUs must be
    on its tile's socket (the cut of one core per rank, as before the thread cut, is)."""
    machine, site, Tiles = flat_aurora_app(fake_machine, HOSTS, tmp_path, monkeypatch, "Tiles",
                                           "echo mask=$ZE_AFFINITY_MASK")
    ids = make_runnable([Tiles.submit(workdir="tiles", ranks_per_node=12, gpus_per_rank=1, threads_per_rank=3,
                                      threads_per_core=2, save=False)])
    record = run_aurora_mpi_job(machine, site[1], ids)
    bind = dict(record["options"])["--cpu-bind"]
    ranks = [ids_of(entry) for entry in bind[len("list:"):].split(":")]
    assert len(ranks) == 12, bind
    (mask,) = set(re.findall(r"mask=(\S+)", job_out(site, "tiles")))
    tiles = mask.split(",")
    assert len(tiles) == 12
    for rank, cpus in enumerate(ranks):
        tile_socket = 0 if int(tiles[rank]) // 2 < 3 else 1  # FLAT tile t is GPU t // 2; GPUs 0-2 on socket 0
        assert {socket_of(c) for c in cpus} == {tile_socket}, (rank, tiles[rank], bind)
    assert len({c for cpus in ranks for c in cpus}) == sum(len(cpus) for cpus in ranks), bind  # no CPU twice
