"""Packed Perlmutter steps run on the cores balsam gave their jobs, against what real Slurm does.

Recorded on a real Slurm 22.05.8 (Debian 12; ``select/cons_tres``, ``CR_Core``, ``task/affinity``), a
node whose Slurm CPUs are the machine's own, inside one ``salloc --exclusive`` (the driver and the
checks with the real launcher are in tests/platforms/test_perlmutter_slurm_gres_real.py). Each task
printed its ``Cpus_allowed_list`` and ``SLURM_CPUS_PER_TASK`` / ``SLURM_CPUS_ON_NODE``:

- two packed ``-n 1 -c 1 --cpu-bind=cores --overlap`` steps running at once (balsam: cores 1 and 0)
  were both bound to CPU 0: Slurm lays an ``--overlap`` step's tasks out from the node's first
  cores whatever other steps hold (the real launcher's 4 one-core jobs, 2 at a time: all on CPU 0);
- ``--cpu-bind=map_cpu:1`` with ``-c 1``: "CPU binding outside of job step allocation, allocated
  CPUs are: 0x1" (the step has only its first ``-n x -c`` CPUs);
- ``-c <the node's CPUs> --cpu-bind=mask_cpu:0x2`` and ``mask_cpu:0x1`` at once: CPUs 1 and 0;
  ``-n 2 -c <node / 2> --cpu-bind=mask_cpu:0x2,0x1``: task 0 on CPU 1, task 1 on CPU 0 (one mask per
  task, local task order), beside other steps; ``-n 3 -c 42`` on 128 CPUs: a step of 126 CPUs
  (``SLURM_CPUS_ON_NODE``), ``-c 43``: "More processors requested than permitted", ``-n 3 -c 128
  --overcommit``: 128;
- in an allocation of 4 CPUs (no ``--exclusive``, the shared QOS): ``-c 128`` "More processors
  requested than permitted" at once (no wait); srun(1): explicit masks are honoured only for a step
  given every CPU of the node, so a shared allocation keeps Slurm's binding;
- a task's ``SLURM_CPUS_PER_TASK`` is the step's ``-c``, ``SLURM_CPUS_ON_NODE`` the step's CPUs on the
  node (``-n x -c``; the node's with ``--overcommit``).

The test applies those rules to the platform's lines on a Perlmutter GPU node (64 cores; core c's
second hardware thread is CPU c + 64, and Slurm gives a ``--cpu-bind=cores`` task whole cores, both
threads) and runs the part after ``--overlap`` as the task would be run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform

CORES, THREADS = 64, 2


def slurm_order(cores: range) -> list[int]:
    """The allocation's logical CPUs on the node (its ``cores``) as Slurm lays a step out over them:
    core by core, both threads."""
    return [core + t * CORES for core in cores for t in range(THREADS)]


def step_cpus(args: list[str], cores: range) -> set[int]:
    """The CPUs of an ``--overlap`` step on its node (recorded): the first ``-n x -c`` from core 0,
    whatever other steps hold; all of the allocation's with ``--overcommit``; more than the
    allocation has: refused."""
    options = args[:args.index("--overlap")]
    tasks, per_task = int(options[options.index("-n") + 1]), int(options[options.index("--cpus-per-task") + 1])
    order = slurm_order(cores)
    if per_task > len(order) or ("--overcommit" not in options and tasks * per_task > len(order)):
        raise AssertionError(f"More processors requested than permitted: {shlex.join(args)}")
    return set(order if "--overcommit" in options else order[:tasks * per_task])


def slurm_task_cpus(args: list[str], cores: range = range(CORES)) -> list[set[int]]:
    """Each task's CPU affinity (local task order) as real Slurm 22.05 binds an ``--overlap`` step."""
    options = args[:args.index("--overlap")]
    tasks, per_task = int(options[options.index("-n") + 1]), int(options[options.index("--cpus-per-task") + 1])
    bind = next(o for o in options if o.startswith("--cpu-bind="))[len("--cpu-bind="):]
    allocated = step_cpus(args, cores)
    if bind == "cores":  # each task its -c CPUs, whole cores, in Slurm's order from core 0
        order = slurm_order(cores)
        return [set(order[t * per_task:(t + 1) * per_task]) for t in range(tasks)]
    assert bind.startswith("mask_cpu:"), bind
    masks = [int(m, 16) for m in bind[len("mask_cpu:"):].split(",")]
    assert len(masks) == tasks, bind
    cpus = [{c for c in range(CORES * THREADS) if mask >> c & 1} for mask in masks]
    for mine in cpus:
        if not mine <= allocated:
            raise AssertionError(f"CPU binding outside of job step allocation: {shlex.join(args)}")
    return cpus


def task_env(args: list[str], name: str) -> str:
    """Run what srun runs (the words after ``--overlap``) with Slurm's step variables set, and
    print ``name`` as the app sees it."""
    options = args[:args.index("--overlap")]
    per_task = int(options[options.index("--cpus-per-task") + 1])
    env = {**os.environ, "SLURM_CPUS_PER_TASK": str(per_task),
           "SLURM_CPUS_ON_NODE": str(len(step_cpus(args, range(CORES))))}
    printer = [sys.executable, "-c", f"import os; print(os.environ.get({name!r}, 'unset'))"]
    done = subprocess.run(args[args.index("--overlap") + 1:] + printer, env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def balsam_rank_cpus(cores: tuple[int, ...], ranks: int) -> list[set[int]]:
    """Each rank's share of the job's cores (in order), with both hardware threads of each core."""
    per = len(cores) // ranks
    return [{c + t * CORES for c in cores[r * per:(r + 1) * per] for t in range(THREADS)} for r in range(ranks)]


# (ranks, threads per rank, gpus per rank, balsam's cores, balsam's GPUs): packed on one node at once.
PACKED = [
    (1, 8, 1, tuple(range(0, 8)), ("0",)),
    (1, 8, 1, tuple(range(8, 16)), ("1",)),
    (1, 8, 0.5, tuple(range(16, 24)), ("2",)),
    (2, 4, 0, tuple(range(24, 32)), ()),
    (3, 2, 0, tuple(range(40, 46)), ()),      # 3 ranks: 128 CPUs do not divide by 3
    (1, 1, 0, (63,), ()),
]


@pytest.mark.parametrize("ranks,threads,gpr,cores,gpus", PACKED, ids=[f"job{n}" for n in range(len(PACKED))])
def test_packed_ranks_run_on_balsams_cores(ranks, threads, gpr, cores, gpus) -> None:
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, threads_per_rank=threads,
                      gpus_per_rank=gpr, cpu_ids=[cores], gpu_ids=[gpus] if gpus else [])
    args = platform.mpi_launch_args(spec)
    assert slurm_task_cpus(args) == balsam_rank_cpus(cores, ranks), shlex.join(args)
    # The app sees its job's own CPU counts (the old line's step), not the step's (the node's).
    job_cpus = platform.cpus_per_task(spec)
    assert task_env(args, "SLURM_CPUS_PER_TASK") == str(job_cpus), shlex.join(args)
    assert task_env(args, "SLURM_CPUS_ON_NODE") == str(job_cpus * ranks), shlex.join(args)
    if gpus:
        assert task_env(args, "CUDA_VISIBLE_DEVICES") == ",".join(gpus), shlex.join(args)


def test_packed_jobs_share_no_cpu() -> None:
    platform = PerlmutterGPUPlatform()
    seen: set[int] = set()
    for ranks, threads, gpr, cores, gpus in PACKED:
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, threads_per_rank=threads,
                          gpus_per_rank=gpr, cpu_ids=[cores], gpu_ids=[gpus] if gpus else [])
        mine = set().union(*slurm_task_cpus(platform.mpi_launch_args(spec)))
        assert not mine & seen, (cores, sorted(mine & seen))
        seen |= mine


def test_shared_qos_allocation_keeps_slurms_binding() -> None:
    """An allocation of 32 cores of the node (shared QOS, SLURM_JOB_CPUS_PER_NODE=64): srun(1) honours
    explicit masks only for a step given every CPU of the node, and the allocation's CPUs need not
    start at 0 (balsam's ids there are 0-31 whatever the node's are): the line stays the one before
    masks, the job's own -c and --cpu-bind=cores."""
    platform = PerlmutterGPUPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": "nid001234", "SLURM_JOB_CPUS_PER_NODE": "64"})
    assert len(nodes[0].cpu_ids) == 32
    for cores, ranks in (((0, 1, 2, 3), 1), ((4, 5, 6, 7), 2), ((8, 9, 10), 3)):
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks,
                          threads_per_rank=len(cores) // ranks, cpu_ids=[cores])
        args = platform.mpi_launch_args(spec)
        assert "--cpu-bind=cores" in args and "--overcommit" not in args, shlex.join(args)
        assert not any(a.startswith("--cpu-bind=mask_cpu") or a.startswith("SLURM_CPUS") for a in args), shlex.join(args)
        assert int(args[args.index("--cpus-per-task") + 1]) == platform.cpus_per_task(spec), shlex.join(args)


def test_jobs_with_their_nodes_or_their_own_binding_keep_the_line() -> None:
    platform = PerlmutterGPUPlatform()
    whole = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=4, gpus_per_rank=1,
                       threads_per_rank=8, cpu_ids=[tuple(range(64))], gpu_ids=[("0", "1", "2", "3")], whole_nodes=True)
    assert platform.mpi_command_line(whole) == (
        "srun -n 4 --ntasks-per-node 4 --gpus-per-task 1 --nodelist nid001234 --nodes 1 --cpus-per-task 32 "
        "--cpu-bind=cores --overlap ./app")
    multi = LaunchSpec(cmdline="./app", hostnames=("nid001234", "nid001235"), ranks_per_node=2, threads_per_rank=4)
    assert platform.mpi_command_line(multi) == (
        "srun -n 4 --ntasks-per-node 2 --nodelist nid001234,nid001235 --nodes 2 --cpus-per-task 64 "
        "--cpu-bind=cores --overlap ./app")
    for params in ({"cpu-bind": "cores"}, {"--cpu-bind": "threads"}, {"c": "8"}):
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), threads_per_rank=4, cpu_ids=[(4, 5, 6, 7)],
                          launch_params=params)
        assert "mask_cpu" not in platform.mpi_command_line(spec) and "env" not in platform.mpi_launch_args(spec), params
