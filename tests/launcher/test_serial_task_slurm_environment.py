"""A serial-mode task does not inherit its worker's place in the worker's srun step.

Under Slurm every serial-mode rank is a task of an srun step: the one the serial line starts
(``srun -N k --ntasks-per-node 1 ... serial_worker``), or the one hydra's ``mpiexec`` starts its
proxies with (real Slurm here: ``mpiexec -n 2 -ppn 1`` in an sbatch job gives rank 1
``SLURM_PROCID=1 SLURM_STEP_ID=0 SLURM_NTASKS=2``). Before, a task of worker k inherited
``SLURM_PROCID=k`` and the step's shape, and its own ``srun`` took the workers' layout. The real
check (a task's own ``srun -n 2`` with the scrubbed environment) is in
tests/schedulers/test_slurm_real.py.
"""

from __future__ import annotations

import os
import threading

from balsam.launcher.modes.serial_worker import Worker, drop_rank_bootstrap_environment

#: The environment of task 1 of ``srun -N 2 -n 2 --ntasks-per-node 1 --cpus-per-task 2 --overlap``
#: in ``sbatch -N 2 --exclusive`` (Slurm 22.05.8, MpiDefault=pmi2), recorded as ``env`` printed it.
WORKER_STEP_TASK_ENV = dict(line.split("=", 1) for line in """\
PMI_FD=11
PMI_JOBID=41.0
PMI_RANK=1
PMI_SIZE=2
SLURMD_NODENAME=node2
SLURM_CLUSTER_NAME=ci
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_CPUS_ON_NODE=2
SLURM_CPUS_PER_TASK=2
SLURM_DISTRIBUTION=cyclic
SLURM_GTIDS=1
SLURM_JOBID=41
SLURM_JOB_ACCOUNT=root
SLURM_JOB_CPUS_PER_NODE=2(x2)
SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0=2(x2)
SLURM_JOB_GID=0
SLURM_JOB_ID=41
SLURM_JOB_NAME=job.sh
SLURM_JOB_NODELIST=node[1-2]
SLURM_JOB_NUM_NODES=2
SLURM_JOB_PARTITION=debug
SLURM_JOB_QOS=normal
SLURM_JOB_UID=0
SLURM_JOB_USER=root
SLURM_LAUNCH_NODE_IPADDR=127.0.0.1
SLURM_LOCALID=0
SLURM_MPI_TYPE=pmi2
SLURM_NNODES=2
SLURM_NODEID=1
SLURM_NODELIST=node[1-2]
SLURM_NODE_ALIASES=(null)
SLURM_NPROCS=2
SLURM_NTASKS=2
SLURM_NTASKS_PER_NODE=1
SLURM_PRIO_PROCESS=0
SLURM_PROCID=1
SLURM_SRUN_COMM_HOST=127.0.0.1
SLURM_SRUN_COMM_PORT=36707
SLURM_STEPID=0
SLURM_STEP_ID=0
SLURM_STEP_LAUNCHER_PORT=36707
SLURM_STEP_NODELIST=node[1-2]
SLURM_STEP_NUM_NODES=2
SLURM_STEP_NUM_TASKS=2
SLURM_STEP_TASKS_PER_NODE=1(x2)
SLURM_SUBMIT_DIR=/tmp/slurmvars/exp1
SLURM_SUBMIT_HOST=vm
SLURM_TASKS_PER_NODE=1(x2)
SLURM_TASK_PID=4549
SLURM_TOPOLOGY_ADDR=node2
SLURM_TOPOLOGY_ADDR_PATTERN=node
SLURM_UMASK=0022
SLURM_WORKING_CLUSTER=ci:localhost:6817:9728:109
SRUN_DEBUG=3""".splitlines())

#: This task's rank and the step's shape: what a task must not see.
STEP_NAMES = {
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_GTIDS",
    "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_LAUNCHER_PORT", "SLURM_SRUN_COMM_HOST", "SLURM_SRUN_COMM_PORT",
    "SLURM_LAUNCH_NODE_IPADDR", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NNODES", "SLURM_TASKS_PER_NODE",
    "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_DISTRIBUTION",
}


def test_a_tasks_environment_keeps_the_allocation_and_loses_the_workers_rank_and_step() -> None:
    environ = {**WORKER_STEP_TASK_ENV, "PATH": "/usr/bin", "OMP_NUM_THREADS": "4"}
    dropped = drop_rank_bootstrap_environment(environ)
    pmi = {"PMI_FD", "PMI_JOBID", "PMI_RANK", "PMI_SIZE"}
    assert dropped == sorted(STEP_NAMES | pmi)
    # What a job script's srun reads to lay out a step in the allocation, node facts, user settings.
    assert environ == {name: value for name, value in WORKER_STEP_TASK_ENV.items() if name not in STEP_NAMES | pmi} | {
        "PATH": "/usr/bin", "OMP_NUM_THREADS": "4"}
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_CPUS_PER_NODE",
                 "SLURM_NODELIST", "SLURM_CONF", "SLURM_CLUSTER_NAME", "SLURM_WORKING_CLUSTER", "SLURM_MPI_TYPE",
                 "SLURMD_NODENAME", "SLURM_CPUS_ON_NODE"):
        assert environ[name] == WORKER_STEP_TASK_ENV[name], name


def test_binding_and_pmix_step_variables_go_and_user_step_settings_stay() -> None:
    """srun(1) lists SLURM_CPU_BIND*/SLURM_MEM_BIND* among what it sets for the tasks (the
    worker's ``--cpu-bind``, masks included, which a task's own srun would read back as its own);
    ``--mpi=pmix`` adds the step's process map. SLURM_STEP_GRES and SRUN_CPUS_PER_TASK are inputs
    that only a user or sbatch sets: theirs."""
    step = {name: "x" for name in (
        "SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_VERBOSE", "SLURM_MEM_BIND",
        "SLURM_MEM_BIND_TYPE", "SLURM_STEP_GPUS", "SLURM_PMIX_MAPPING_SERV", "SLURM_PMIXP_ABORT_AGENT_PORT",
        "PMIX_RANK", "PMIX_NAMESPACE")}
    kept = {"SLURM_STEP_GRES": "none", "SRUN_CPUS_PER_TASK": "4", "SLURM_GPUS_PER_TASK": "1", "PMIX_MCA_gds": "hash"}
    environ = {**step, **kept}
    assert drop_rank_bootstrap_environment(environ) == sorted(step)
    assert environ == kept


def test_a_worker_starts_its_tasks_without_its_step_identity(monkeypatch) -> None:
    """The path main() takes: the drop on os.environ after MPI_Init, then the Worker's base
    environment, which every task of this rank starts from."""
    for name, value in WORKER_STEP_TASK_ENV.items():
        monkeypatch.setenv(name, value)
    drop_rank_bootstrap_environment()
    worker = Worker(transport=None, wake=threading.Event(), stop=None, pool=None)  # type: ignore[arg-type]
    env = worker._env({"env": {"BALSAM_JOB_ID": "7"}, "unset": []})
    assert env["BALSAM_JOB_ID"] == "7" and env["SLURM_JOB_ID"] == "41" and env["SLURM_JOB_NUM_NODES"] == "2"
    assert not STEP_NAMES & env.keys()
    assert not any(name.startswith("PMI_") for name in env)
    assert os.environ["SLURM_NODELIST"] == "node[1-2]" and "SLURM_PROCID" not in os.environ
