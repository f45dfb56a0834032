"""Aurora: an app's own ``ZE_AFFINITY_MASK`` on a multi-node GPU job is named in the launcher's
warning, as on a one-node job (docs/platforms/aurora.md: "replaced by the launcher's for GPU jobs ...
with one warning per job").

Found end to end on the faked Aurora (recording PALS ``mpiexec``, which applies ``--env`` to the
ranks as PALS does): an app with ``environment_variables={"ZE_AFFINITY_MASK": "0"}`` run as a 2-node
job (``ranks_per_node=2, gpus_per_rank=1``) had its ranks print ``MASK=0,1,...,11`` (the whole-node
mask of the mpiexec line replaces the app's value) and the launcher logged nothing; the same job on
one node got ``job 2: its app's ZE_AFFINITY_MASK=0 is replaced by ... ZE_AFFINITY_MASK=0,1``. The
whole-node variables lived only on the mpiexec line (``Platform.whole_node_environment``), which the
warning never saw.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import balsam.util
from balsam.launcher.node_manager import Demand
from balsam.launcher.runner import launch_environment
from balsam_platform_aurora import AuroraPlatform

from machine_jobs import job_out, make_runnable, site_for
from platform_harness import finish, start_launcher
from launcher_helpers import wait_for_states
from test_job_environment_and_thread_cap import AURORA_HOSTS, NoHook, aurora_nodes, manager, prepared

EVERY_TILE = ",".join(map(str, range(12)))
#: Expanded by every rank: what the job runs with.
SHOW = "bash -c 'echo MASK=${ZE_AFFINITY_MASK-unset} H=$ZE_FLAT_DEVICE_HIERARCHY'"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")  # `module load frameworks` before the launcher
    monkeypatch.delenv("ZE_AFFINITY_MASK", raising=False)
    balsam.util._warned.clear()  # the warnings are given once per app and value in a process


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_multi_node_jobs_own_mask_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform))
    two_nodes = Demand(num_nodes=2, ranks_per_node=2, gpus_per_rank=1)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        job = prepared(tmp_path, two_nodes, own={"ZE_AFFINITY_MASK": "0"}, job_id=7)
        launch_environment(job, nm.assign(7, two_nodes), platform, NoHook())
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"job 7: its app's ZE_AFFINITY_MASK=0 is replaced by the platform's GPU visibility "
                              f"variables: ZE_AFFINITY_MASK={EVERY_TILE} (set on its MPI launcher line for its ranks"), warning


def test_multi_node_jobs_without_an_own_mask_or_without_gpus_are_not_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform))
    gpus, cpu_only = Demand(num_nodes=2, ranks_per_node=2, gpus_per_rank=1), Demand(num_nodes=2, ranks_per_node=2)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        env = launch_environment(prepared(tmp_path, gpus, job_id=1), nm.assign(1, gpus), platform, NoHook())
        nm.free(1)
        # A CPU-only multi-node job gets no mask on its line: its app's own is what its ranks see.
        own = launch_environment(prepared(tmp_path, cpu_only, own={"ZE_AFFINITY_MASK": "3"}, job_id=2),
                                 nm.assign(2, cpu_only), platform, NoHook())
    assert _warnings(caplog) == []
    # The job's own environment (its shell line) is as before: the mask is given to the ranks by the line.
    assert "ZE_AFFINITY_MASK" not in env and own["ZE_AFFINITY_MASK"] == "3"


@pytest.mark.slow
@pytest.mark.mpi
def test_the_real_launcher_warns_for_a_two_node_jobs_own_mask(balsam_env, fake_machine, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition

    machine = fake_machine(list(AURORA_HOSTS))
    site_name, site_path = site_for(tmp_path, "aurora")

    class OwnMask(ApplicationDefinition):
        site = site_name
        command_template = SHOW
        environment_variables = {"ZE_AFFINITY_MASK": "0"}

    OwnMask.sync()
    (job_id,) = make_runnable([OwnMask.submit(workdir="mn", num_nodes=2, ranks_per_node=2, gpus_per_rank=1,
                                              save=False)])
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="123.aurora-pbs-0001")
    proc = start_launcher(site_path, "mpi", 10, env)
    try:
        done = wait_for_states([job_id], {"RUN_DONE", "FAILED", "RUN_ERROR"}, timeout=120)
        proc.terminate()  # the job is done: the launcher need not wait out its idle time
    finally:
        finish(proc, 120)
    assert [str(j.state) for j in done.values()] == ["RUN_DONE"]
    # PALS --env gives the ranks the whole-node mask, over the app's 0 ...
    assert job_out((site_name, site_path), "mn").split() == [f"MASK={EVERY_TILE}", "H=FLAT"] * 4
    # ... and the launcher says so, naming the job and both values.
    logged = Path(proc.console_path).read_text() + "".join(
        p.read_text(errors="replace") for p in (site_path / "log").glob("*.log"))
    assert re.search(rf"job {job_id}: its app's ZE_AFFINITY_MASK=0 is replaced by the platform's GPU visibility "
                     rf"variables: ZE_AFFINITY_MASK={EVERY_TILE} ", logged), logged[-3000:]
