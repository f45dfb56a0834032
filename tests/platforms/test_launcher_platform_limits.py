"""The launcher with a platform's limits, through the real launcher on a faked Aurora allocation:

- the platform's cap on MPI launches per batch job (Aurora: 1,000; here 3): the mpi mode stops
  acquiring, says why in its log and in the BatchJob's status_info, and the rest wait;
- a job that can never fit the allocation (more nodes than it has; more tiles per node than a node
  has) ends FAILED with the reason, in mpi and in serial mode;
- OMP_NUM_THREADS is exported to every job (= threads_per_rank).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from platform_harness import finish, start_launcher
from launcher_harness import make_site
from launcher_helpers import make_runnable, wait_for_states

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

HOSTS = ["x1000c0s0b0n0", "x1000c0s1b0n0"]


def aurora_site(tmp_path: Path, **platform_options) -> tuple[str, Path]:
    name = f"limits-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": "aurora", "idle_ttl_sec": 2,
                                             "platform_options": {"cpu_ids": "0-23", **platform_options}})
    return name, path


def test_launch_limit_stops_acquiring_and_says_why(balsam_env, fake_machine, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = aurora_site(tmp_path, max_mpiexec_per_batch_job=3)

    class Sleeper(ApplicationDefinition):
        site = name
        command_template = "echo ran {{ n }}"

    Sleeper.sync()
    ids = make_runnable(Sleeper.submit(workdir=f"lim/{n}", n=n, save=False) for n in range(5))
    bj = BatchJob.objects.create(site_id=Sleeper.resolve_site_id(), project="p", queue="q", num_nodes=2,
                                 wall_time_min=10, job_mode="mpi")
    machine = fake_machine(HOSTS)
    proc = start_launcher(path, "mpi", 10, machine.env(PBS_NODEFILE=str(machine.node_file), BALSAM_BATCH_JOB_ID=str(bj.id)))
    assert finish(proc) == 0
    jobs = wait_for_states(ids, {"RUN_DONE", "PREPROCESSED"}, timeout=30)
    states = sorted(str(j.state) for j in jobs.values())
    assert states == ["PREPROCESSED"] * 2 + ["RUN_DONE"] * 3
    assert len(machine.records("mpiexec")) == 3
    log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    assert "stopped acquiring jobs after 3 MPI launches: aurora allows 3 mpiexec launches per batch job" in log
    info = BatchJob.objects.get(id=bj.id).status_info
    assert "aurora allows 3 mpiexec launches per batch job" in info["launcher"]


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_job_that_can_never_fit_fails_with_the_reason(mode: str, balsam_env, fake_machine, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = aurora_site(tmp_path)

    class Env(ApplicationDefinition):
        site = name
        command_template = "printenv OMP_NUM_THREADS"

    Env.sync()
    fits = Env.submit(workdir="fits", threads_per_rank=1, gpus_per_rank=1, save=False)
    threads = Env.submit(workdir="threads", threads_per_rank=3, save=False)
    too_many_tiles = Env.submit(workdir="tiles", gpus_per_rank=13, save=False)  # a node has 12 tiles
    jobs = [fits, threads, too_many_tiles]
    if mode == "mpi":
        jobs.append(Env.submit(workdir="nodes", num_nodes=3, save=False))  # the allocation has 2
    ids = make_runnable(jobs)
    machine = fake_machine(HOSTS)
    proc = start_launcher(path, mode, 10, machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="77.aurora-pbs"))
    done = wait_for_states(ids, {"RUN_DONE", "FAILED"}, timeout=60)
    assert finish(proc) == 0
    by_dir = {str(j.workdir): j for j in done.values()}
    assert str(by_dir["fits"].state) == "RUN_DONE" and str(by_dir["threads"].state) == "RUN_DONE"
    assert (path / "data" / "fits" / "job.out").read_text().strip() == "1"
    assert (path / "data" / "threads" / "job.out").read_text().strip() == "3"
    assert str(by_dir["tiles"].state) == "FAILED"
    failed = {str(j.workdir) for j in Job.objects.filter(id=ids, state="FAILED")}
    from balsam.api import EventLog

    reasons = {e.job_id: (e.data or {}).get("error", "") for e in EventLog.objects.filter(job_id=ids) if e.to_state == "FAILED"}
    assert "13 GPUs" in reasons[by_dir["tiles"].id] and "12 GPUs" in reasons[by_dir["tiles"].id]
    if mode == "mpi":
        assert "nodes" in failed
        assert "asks for 3 nodes" in reasons[by_dir["nodes"].id]


def test_job_for_a_larger_waiting_batch_job_is_left_for_it(balsam_env, fake_machine, tmp_path: Path) -> None:
    """A 3-node job is not failed by a 2-node launcher while a 4-node BatchJob of the site waits."""
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = aurora_site(tmp_path)

    class Big(ApplicationDefinition):
        site = name
        command_template = "echo big"

    Big.sync()
    (big,) = make_runnable([Big.submit(workdir="big", num_nodes=3, save=False)])
    BatchJob.objects.create(site_id=Big.resolve_site_id(), project="p", queue="q", num_nodes=4, wall_time_min=10,
                            job_mode="mpi")
    machine = fake_machine(HOSTS)
    proc = start_launcher(path, "mpi", 10, machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="78.aurora-pbs"))
    assert finish(proc) == 0  # idle exit, after at least one probe turn
    log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    assert "mpi mode done (idle)" in log
    (job,) = wait_for_states([big], {"PREPROCESSED"}, timeout=10).values()
    assert str(job.state) == "PREPROCESSED" and machine.records() == []


def test_launch_limit_is_shared_by_the_mpi_partitions(balsam_env, fake_machine, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = aurora_site(tmp_path, max_mpiexec_per_batch_job=4)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo ran {{ n }}"

    Echo.sync()
    ids = make_runnable(Echo.submit(workdir=f"part/{n}", n=n, save=False) for n in range(6))
    bj = BatchJob.objects.create(site_id=Echo.resolve_site_id(), project="p", queue="q", num_nodes=2,
                                 wall_time_min=10, job_mode="mpi")
    machine = fake_machine(HOSTS)
    proc = start_launcher(path, "mpi", 10, machine.env(PBS_NODEFILE=str(machine.node_file), BALSAM_BATCH_JOB_ID=str(bj.id)),
                          "--part", "mpi:1", "--part", "mpi:1")
    assert finish(proc) == 0
    jobs = wait_for_states(ids, {"RUN_DONE", "PREPROCESSED"}, timeout=30)
    assert sorted(str(j.state) for j in jobs.values()) == ["PREPROCESSED"] * 2 + ["RUN_DONE"] * 4
    assert len(machine.records("mpiexec")) == 4  # 2 per partition: the batch job's 4 in all
    log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    assert log.count("stopped acquiring jobs after 2 MPI launches") == 2 and "shared by 2 mpi partitions" in log
