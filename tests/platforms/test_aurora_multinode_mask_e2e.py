"""Aurora, end to end: the docs' tile_per_rank.sh wrapper on a 2-node job (ranks_per_node=4,
gpus_per_rank=1) gives each rank one tile, different ranks of a node different tiles, as on one
node. The real launcher in mpi mode in a faked PBS allocation; the recording mpiexec applies PALS
``--env NAME=value`` to the ranks, as PALS does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from machine_jobs import job_out, make_runnable
from platform_harness import docs_tile_wrapper, flat_aurora_app, run_aurora_mpi_job

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "platforms" / "aurora.md"


def test_docs_wrapper_on_a_two_node_job(balsam_env, fake_machine, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = docs_tile_wrapper(DOCS, tmp_path)
    command = (f"{shlex.quote(str(wrapper))} bash -c "
               "'echo rank local=$PALS_LOCAL_RANKID mask=${ZE_AFFINITY_MASK-unset}'")
    machine, site, Wrapped = flat_aurora_app(fake_machine, HOSTS, tmp_path, monkeypatch, "Wrapped", command)
    ids = make_runnable([Wrapped.submit(workdir="mn", num_nodes=2, ranks_per_node=4, gpus_per_rank=1, save=False)])
    record = run_aurora_mpi_job(machine, site[1], ids)
    assert record["env"]["ZE_AFFINITY_MASK"] == ",".join(map(str, range(12)))
    assert record["env"]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
    # The faked ranks all run here with local ids 0-7; on Aurora each node's are 0-3, the same
    # wrapper arithmetic: rank L gets tile L of its node's 12.
    masks = dict(re.findall(r"local=(\d+) mask=(\S+)", job_out(site, "mn")))
    assert masks == {str(rank): str(rank) for rank in range(8)}
