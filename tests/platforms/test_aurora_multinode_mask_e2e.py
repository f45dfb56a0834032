"""Aurora, end to end: the docs' tile_per_rank.sh wrapper on a 2-node job (ranks_per_node=4,
gpus_per_rank=1) gives each rank one tile, different ranks of a node different tiles, as on one
node. The real launcher in mpi mode in a faked PBS allocation; the recording mpiexec is wrapped to
apply PALS ``--env NAME=value`` to the ranks, as PALS does."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from machine_jobs import job_out, make_runnable, site_for, wait_for_states
from platform_harness import FAKES, PYTHON, finish, start_launcher

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "platforms" / "aurora.md"
ENDED = {"RUN_DONE", "FAILED", "RUN_ERROR"}
#: PALS gives the ranks each --env NAME=value over the environment --envall passes.
PALS_ENV = ('for ((i = 1; i < $#; i++)); do [ "${!i}" = --env ] && { j=$((i + 1)); export "${!j}"; }; done\n'
            f'exec {PYTHON} {FAKES / "recording_launcher.py"} mpiexec "$@"')


def test_docs_wrapper_on_a_two_node_job(balsam_env, fake_machine, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import ApplicationDefinition

    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    (script,) = [s for s in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S) if "tile_per_rank.sh" in s]
    wrapper = tmp_path / "tile_per_rank.sh"
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    machine = fake_machine(HOSTS)
    machine._wrapper("mpiexec", PALS_ENV)
    site_name, site_path = site_for(tmp_path, "aurora")

    class Wrapped(ApplicationDefinition):
        site = site_name
        command_template = (f"{shlex.quote(str(wrapper))} bash -c "
                            "'echo rank local=$PALS_LOCAL_RANKID mask=${ZE_AFFINITY_MASK-unset}'")

    Wrapped.sync()
    ids = make_runnable([Wrapped.submit(workdir="mn", num_nodes=2, ranks_per_node=4, gpus_per_rank=1, save=False)])
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="123.aurora-pbs-0001")
    proc = start_launcher(site_path, "mpi", 2, env)
    try:
        done = wait_for_states(ids, ENDED, timeout=120)
    finally:
        finish(proc, 60)
    assert [str(j.state) for j in done.values()] == ["RUN_DONE"]
    (record,) = machine.records("mpiexec")
    assert record["env"]["ZE_AFFINITY_MASK"] == ",".join(map(str, range(12)))
    assert record["env"]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
    # The faked ranks all run here with local ids 0-7; on Aurora each node's are 0-3, the same
    # wrapper arithmetic: rank L gets tile L of its node's 12.
    masks = dict(re.findall(r"local=(\d+) mask=(\S+)", job_out((site_name, site_path), "mn")))
    assert masks == {str(rank): str(rank) for rank in range(8)}
