"""The real launcher on a faked Aurora (recording PALS ``mpiexec``, MPICH ranks): the device hierarchy
Balsam sets is the one jobs run under, whatever their shell preamble exports, and the option
``device_hierarchy`` reaches multi-node jobs (with the mask of all of a node's tiles, by ``mpiexec
--env``, which the recording mpiexec applies to the ranks as PALS does).

Found end to end: an app whose ``shell_preamble()`` exported ``ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE``
(as a module may) ran its packed single-tile jobs with the FLAT mask ``0``, ``1``, ``2`` read in
COMPOSITE numbering: whole GPUs 0, 1 and 2, shared with the jobs on their other tiles. And with
``device_hierarchy: composite`` a 2-node job ran in the launcher's FLAT.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from machine_jobs import job_out, make_runnable, site_for, wait_for_states
from platform_harness import finish, start_launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
#: Expanded by every rank (``bash -c``): what the job sees, not the shell that runs its mpiexec line.
SHOW = "bash -c 'echo job {{ n }} MASK=${ZE_AFFINITY_MASK-unset} H=$ZE_FLAT_DEVICE_HIERARCHY'"
ENDED = {"RUN_DONE", "FAILED", "RUN_ERROR"}


def _run(site: tuple[str, Path], machine, mode: str, jobs) -> dict[str, str]:
    """``{workdir: job.out}`` of ``jobs``, all RUN_DONE, after one launcher ran them."""
    ids = make_runnable(jobs)
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="123.aurora-pbs-0001")
    proc = start_launcher(site[1], mode, 10, env)
    try:
        done = wait_for_states(ids, ENDED, timeout=120)
    finally:
        finish(proc, 120)
    assert {str(j.workdir): str(j.state) for j in done.values()} == {str(j.workdir): "RUN_DONE" for j in done.values()}
    return {str(j.workdir): job_out(site, str(j.workdir)) for j in done.values()}


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_a_preamble_cannot_change_the_hierarchy_of_the_mask(mode: str, balsam_env, fake_machine, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import ApplicationDefinition

    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")  # `module load frameworks` before the launcher
    machine = fake_machine(HOSTS[:1])
    site = site_for(tmp_path, "aurora")
    site_name = site[0]

    class Pre(ApplicationDefinition):
        site = site_name
        command_template = SHOW

        def shell_preamble(self):
            return "export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE"

    Pre.sync()
    outs = _run(site, machine, mode, [Pre.submit(workdir=f"pre/{n}", n=n, gpus_per_rank=1, node_packing_count=12,
                                                 save=False) for n in range(3)])
    masks = set()
    for workdir, out in outs.items():
        found = re.fullmatch(r"job \d+ MASK=(\d+) H=(\w+)", out.strip())
        assert found and found.group(2) == "FLAT", (workdir, out)
        masks.add(found.group(1))
    assert len(masks) == 3  # three tiles, one each
    if mode == "mpi":  # mpiexec --envall got the hierarchy balsam set, after the preamble
        records = machine.records("mpiexec")
        assert len(records) == 3 and {r["env"].get("ZE_FLAT_DEVICE_HIERARCHY") for r in records} == {"FLAT"}


def test_the_hierarchy_option_reaches_a_multi_node_job(balsam_env, fake_machine, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import ApplicationDefinition

    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    machine = fake_machine(HOSTS)
    site = site_for(tmp_path, "aurora", platform_options={"device_hierarchy": "composite"})
    site_name = site[0]

    class Show(ApplicationDefinition):
        site = site_name
        command_template = SHOW

    class PreFlat(ApplicationDefinition):
        site = site_name
        command_template = SHOW

        def shell_preamble(self):
            return "export ZE_FLAT_DEVICE_HIERARCHY=FLAT"

    Show.sync()
    PreFlat.sync()
    outs = _run(site, machine, "mpi", [
        Show.submit(workdir="multi/plain", n=1, num_nodes=2, ranks_per_node=2, gpus_per_rank=1, save=False),
        PreFlat.submit(workdir="multi/preamble", n=2, num_nodes=2, ranks_per_node=2, gpus_per_rank=1, save=False),
    ])
    # 4 ranks (2 per node), whole nodes: every tile of a node in the option's hierarchy (GPU.tile ids),
    # from mpiexec --env, over the preamble's FLAT.
    every_tile = ",".join(f"{gpu}.{tile}" for gpu in range(6) for tile in range(2))
    for workdir, out in outs.items():
        lines = out.strip().splitlines()
        assert len(lines) == 4, (workdir, out)
        assert all(line.endswith(f"MASK={every_tile} H=COMPOSITE") for line in lines), (workdir, out)
    records = machine.records("mpiexec")
    assert [r["argv"].count("--env") for r in records] == [3, 3]
    assert {r["env"].get("ZE_FLAT_DEVICE_HIERARCHY") for r in records} == {"COMPOSITE"}
    assert {r["caller_env"].get("ZE_FLAT_DEVICE_HIERARCHY") for r in records} == {"COMPOSITE"}
