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

import json
import os
import socket
import sys
import threading
from unittest import mock

import pytest

from balsam.launcher.modes.serial_worker import Worker, drop_rank_bootstrap_environment, launcher_slurm_environment

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states

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


def test_a_worker_starts_its_tasks_without_its_step_identity() -> None:
    """The path main() takes: the drop on os.environ after MPI_Init, then the Worker's base
    environment, which every task of this rank starts from. The whole environ is restored after:
    the drop also removes whatever PMI_*/SLURM_* this test process had."""
    with mock.patch.dict(os.environ, WORKER_STEP_TASK_ENV):
        drop_rank_bootstrap_environment()
        worker = Worker(transport=None, wake=threading.Event(), stop=None, pool=None)  # type: ignore[arg-type]
        environ_after = dict(os.environ)
    env = worker._env({"env": {"BALSAM_JOB_ID": "7"}, "unset": []})
    assert env["BALSAM_JOB_ID"] == "7" and env["SLURM_JOB_ID"] == "41" and env["SLURM_JOB_NUM_NODES"] == "2"
    assert not STEP_NAMES & env.keys()
    assert not any(name.startswith("PMI_") for name in env)
    assert environ_after["SLURM_NODELIST"] == "node[1-2]" and "SLURM_PROCID" not in environ_after


#: A job script's environment (``sbatch -N 2 --ntasks-per-node 2 --exclusive``, Slurm 22.05.8),
#: as ``env`` printed it in the batch shell: what the launcher, run from the script, has.
BATCH_SHELL_ENV = dict(line.split("=", 1) for line in """\
SLURMD_NODENAME=node1
SLURM_CLUSTER_NAME=ci
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_CPUS_ON_NODE=2
SLURM_GTIDS=0
SLURM_JOBID=58
SLURM_JOB_ACCOUNT=root
SLURM_JOB_CPUS_PER_NODE=2(x2)
SLURM_JOB_GID=0
SLURM_JOB_ID=58
SLURM_JOB_NAME=job.sh
SLURM_JOB_NODELIST=node[1-2]
SLURM_JOB_NUM_NODES=2
SLURM_JOB_PARTITION=debug
SLURM_JOB_QOS=normal
SLURM_JOB_UID=0
SLURM_JOB_USER=root
SLURM_LOCALID=0
SLURM_NNODES=2
SLURM_NODEID=0
SLURM_NODELIST=node[1-2]
SLURM_NODE_ALIASES=(null)
SLURM_NPROCS=4
SLURM_NTASKS=4
SLURM_NTASKS_PER_NODE=2
SLURM_PRIO_PROCESS=0
SLURM_PROCID=0
SLURM_SUBMIT_DIR=/tmp/fixslurmvars/rec
SLURM_SUBMIT_HOST=vm
SLURM_TASKS_PER_NODE=2(x2)
SLURM_TASK_PID=13324
SLURM_TOPOLOGY_ADDR=node1
SLURM_TOPOLOGY_ADDR_PATTERN=node
SLURM_WORKING_CLUSTER=ci:localhost:6817:9728:109""".splitlines())

#: Task 1 of ``srun -N 2 -n 2 --ntasks-per-node 1 --cpus-per-task 2 --overcommit
#: --threads-per-core 1 --overlap`` started from that batch shell (same job), as ``env`` printed it.
WORKER_TASK_OF_BATCH_ENV = dict(line.split("=", 1) for line in """\
PMI_FD=11
PMI_JOBID=58.0
PMI_RANK=1
PMI_SIZE=2
SLURMD_NODENAME=node2
SLURM_CLUSTER_NAME=ci
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_CPUS_ON_NODE=2
SLURM_CPUS_PER_TASK=2
SLURM_CPU_BIND=quiet,threads
SLURM_CPU_BIND_LIST=
SLURM_CPU_BIND_TYPE=threads
SLURM_CPU_BIND_VERBOSE=quiet
SLURM_DISTRIBUTION=cyclic
SLURM_GTIDS=1
SLURM_JOBID=58
SLURM_JOB_ACCOUNT=root
SLURM_JOB_CPUS_PER_NODE=2(x2)
SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0=2(x2)
SLURM_JOB_GID=0
SLURM_JOB_ID=58
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
SLURM_OVERCOMMIT=1
SLURM_PRIO_PROCESS=0
SLURM_PROCID=1
SLURM_SRUN_COMM_HOST=127.0.0.1
SLURM_SRUN_COMM_PORT=39327
SLURM_STEPID=0
SLURM_STEP_ID=0
SLURM_STEP_LAUNCHER_PORT=39327
SLURM_STEP_NODELIST=node[1-2]
SLURM_STEP_NUM_NODES=2
SLURM_STEP_NUM_TASKS=2
SLURM_STEP_TASKS_PER_NODE=1(x2)
SLURM_SUBMIT_DIR=/tmp/fixslurmvars/rec
SLURM_SUBMIT_HOST=vm
SLURM_TASKS_PER_NODE=1(x2)
SLURM_TASK_PID=13355
SLURM_THREADS_PER_CORE=1
SLURM_TOPOLOGY_ADDR=node2
SLURM_TOPOLOGY_ADDR_PATTERN=node
SLURM_UMASK=0022
SLURM_WORKING_CLUSTER=ci:localhost:6817:9728:109
SRUN_DEBUG=3""".splitlines())

#: Every name srun sets or changes for a step's task (SLURM_STEP_NAMES and the step's outputs),
#: spelled out: the carrier must hold the launcher's value, or null, for each.
SRUN_STEP_NAMES = STEP_NAMES | {
    "SLURM_STEP_GPUS", "SLURM_STEP_RESV_PORTS", "SLURM_PTY_PORT", "SLURM_PTY_WIN_COL", "SLURM_PTY_WIN_ROW",
    "SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_VERBOSE", "SLURM_MEM_BIND",
    "SLURM_MEM_BIND_LIST", "SLURM_MEM_BIND_PREFER", "SLURM_MEM_BIND_SORT", "SLURM_MEM_BIND_TYPE",
    "SLURM_MEM_BIND_VERBOSE", "SLURM_PMIX_MAPPING_SERV", "SLURM_PMIXP_ABORT_AGENT_PORT",
    "SLURM_OVERCOMMIT", "SLURM_THREADS_PER_CORE", "SLURM_CPU_FREQ_REQ", "SLURM_CPUS_ON_NODE",
}
CARRIER = "BALSAM_LAUNCHER_SLURM_ENV"


def test_a_task_sees_the_job_scripts_slurm_variables_not_its_workers_step() -> None:
    """Dropping the step's variables also took the job script's own SLURM_NNODES, SLURM_NTASKS,
    SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE (``srun -N "$SLURM_NNODES"`` failed in a task, a
    bare srun ran 2 processes where the job script's runs 4), and left SLURM_OVERCOMMIT and
    SLURM_THREADS_PER_CORE as the workers' srun set them. The launcher passes its values (the
    batch shell's, JSON, null for a name it lacks); the task gets exactly those."""
    carried = {name: BATCH_SHELL_ENV.get(name) for name in sorted(SRUN_STEP_NAMES)}
    environ = {**WORKER_TASK_OF_BATCH_ENV, CARRIER: json.dumps(carried), "PATH": "/usr/bin"}
    drop_rank_bootstrap_environment(environ)
    assert CARRIER not in environ and not any(name.startswith("PMI_") for name in environ)
    for name in SRUN_STEP_NAMES:
        assert environ.get(name) == BATCH_SHELL_ENV.get(name), name
    assert {n: environ[n] for n in ("SLURM_NNODES", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_TASKS_PER_NODE",
                                    "SLURM_NTASKS_PER_NODE", "SLURM_PROCID")} == {
        "SLURM_NNODES": "2", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0"}
    # srun's step outputs the batch shell has not: gone, as in a command of the job script
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_OVERCOMMIT", "SLURM_THREADS_PER_CORE", "SLURM_STEP_ID",
                 "SLURM_DISTRIBUTION", "SLURM_CPU_BIND", "SLURM_SRUN_COMM_PORT"):
        assert name not in environ, name
    # the allocation's, the node's own, user settings: as they were
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NODELIST", "SLURMD_NODENAME", "SLURM_MPI_TYPE"):
        assert environ[name] == WORKER_TASK_OF_BATCH_ENV[name], name
    assert environ["PATH"] == "/usr/bin"


def test_the_launchers_carrier_holds_every_step_name_present_or_absent() -> None:
    """What serial mode's launcher passes to its ranks: its own value of each name, null where
    it has none (so that a task has none either), its node's name, and nothing else."""
    carried = json.loads(launcher_slurm_environment({**BATCH_SHELL_ENV, "PATH": "/usr/bin"}))
    assert carried == {**{name: BATCH_SHELL_ENV.get(name) for name in SRUN_STEP_NAMES},
                       "SLURMD_NODENAME": BATCH_SHELL_ENV.get("SLURMD_NODENAME")}
    environ = {**WORKER_TASK_OF_BATCH_ENV, CARRIER: launcher_slurm_environment(BATCH_SHELL_ENV)}
    drop_rank_bootstrap_environment(environ)
    # The worker task ran on node2, the batch shell on node1: the batch shell's own node and
    # process identity is not restored there (see the test below).
    per_node = {"SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_TASK_PID", "SLURM_GTIDS", "SLURM_CPUS_ON_NODE"}
    assert {n: v for n, v in environ.items() if n in SRUN_STEP_NAMES - per_node} == {
        n: v for n, v in BATCH_SHELL_ENV.items() if n in SRUN_STEP_NAMES - per_node}
    assert not {"SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_TASK_PID", "SLURM_GTIDS"} & set(environ)


def test_a_malformed_carrier_is_one_error_naming_it() -> None:
    environ = {"SLURM_PROCID": "1", CARRIER: "[1, 2]"}
    with pytest.raises(ValueError, match=f"^{CARRIER}: not a JSON object"):
        drop_rank_bootstrap_environment(environ)


@pytest.mark.slow
@pytest.mark.mpi
def test_serial_mode_tasks_get_the_launchers_slurm_step_variables(new_site) -> None:
    """End to end: the launcher's SLURM_NNODES/SLURM_NTASKS (a job script's -N/-n) reach the
    tasks of both ranks, and SLURM_PROCID, which the launcher has not, is absent (real mpiexec:
    its ranks get the launcher's environment; 7bf7fc1 dropped them all)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class SlurmEnv(ApplicationDefinition):
        site = name
        command_template = ("bash -c 'echo nnodes=${SLURM_NNODES-unset} ntasks=${SLURM_NTASKS-unset} "
                            "procid=${SLURM_PROCID-unset} carrier=${BALSAM_LAUNCHER_SLURM_ENV-unset}'")

    SlurmEnv.sync()
    ids = make_runnable(SlurmEnv.submit(workdir=f"s/{i}", node_packing_count=2, save=False) for i in range(4))
    host = socket.gethostname()
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(2)]
    env = {"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes), "SLURM_NNODES": "3", "SLURM_NTASKS": "6"}
    with mock.patch.dict(os.environ):
        os.environ.pop("SLURM_PROCID", None)
        proc = start_launcher(path, "serial", 1, env=env)
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"})
    assert finish(proc) == 0
    outputs = [(path / "data" / f"s/{i}" / "job.out").read_text() for i in range(4)]
    assert {str(job.state) for job in jobs.values()} == {"RUN_DONE"}, outputs
    assert outputs == ["nnodes=3 ntasks=6 procid=unset carrier=unset\n"] * 4


def test_a_rank_on_another_node_keeps_no_identity_of_the_launchers_node() -> None:
    """The batch shell's node id, local id, task pid and CPU count describe the launcher's node:
    a task on node2 read SLURM_NODEID=0, SLURM_CPUS_ON_NODE=2 (node1's) and a task pid of node1
    (sbatch -N 2 -n 3, real Slurm, by a reviewer). There they are restored; elsewhere the identity
    names go and the CPU count stays as srun set it for that node."""
    batch = {"SLURMD_NODENAME": "node1", "SLURM_NNODES": "2", "SLURM_NTASKS": "3", "SLURM_PROCID": "0",
             "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_TASK_PID": "21527", "SLURM_GTIDS": "0",
             "SLURM_CPUS_ON_NODE": "2", "SLURM_JOB_ID": "94"}
    carrier = launcher_slurm_environment(batch)
    step = {"SLURM_JOB_ID": "94", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
            "SLURM_GTIDS": "1", "BALSAM_LAUNCHER_SLURM_ENV": carrier}
    node2 = {**step, "SLURMD_NODENAME": "node2", "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_LOCALID": "0",
             "SLURM_TASK_PID": "4242", "SLURM_CPUS_ON_NODE": "1"}
    drop_rank_bootstrap_environment(node2)
    assert node2 == {"SLURM_JOB_ID": "94", "SLURM_NNODES": "2", "SLURM_NTASKS": "3", "SLURMD_NODENAME": "node2",
                     "SLURM_CPUS_ON_NODE": "1"}
    node1 = {**step, "SLURMD_NODENAME": "node1", "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
             "SLURM_TASK_PID": "777", "SLURM_CPUS_ON_NODE": "1"}
    drop_rank_bootstrap_environment(node1)
    assert node1 == batch
