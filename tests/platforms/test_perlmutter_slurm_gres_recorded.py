"""Packed Perlmutter GPU steps see the GPUs balsam gave their jobs, against what real Slurm does.

Recorded on a real Slurm 22.05.8 (Debian 12) with GRES (``GresTypes=gpu``, a node of ``Gres=gpu:4``,
``select/cons_tres``, ``task/affinity``), inside one ``salloc --exclusive --gpus=4``, running the
plugin's own lines concurrently, each srun started with balsam's ``CUDA_VISIBLE_DEVICES`` for its job
(the driver is tests/platforms/test_perlmutter_slurm_gres_real.py). Each task printed its
``CUDA_VISIBLE_DEVICES`` and ``SLURM_STEP_GPUS``:

- four ``--gpus-per-task 1 ... --overlap`` steps (balsam: GPUs 0, 1, 2, 3) all got ``0``: ``--overlap``
  shares GRES, so Slurm gives every step the first GPU, and slurmstepd writes the task's
  ``CUDA_VISIBLE_DEVICES`` over srun's; two more steps (6 on 4 GPUs) started at once on GPU 0 too;
- two ``--gpus-per-task 2`` steps (balsam: 0,1 and 2,3) both got ``0,1``;
- a fractional job's step (no GPU request; balsam: GPU 0) got ``0,1,2,3``: all the allocation's;
- ``--gres=none`` unsets it; ``--gres=gpu:0`` is all GPUs again; ``--gpu-bind=map_gpu:N`` or
  ``mask_gpu`` is ignored for a one-task step; a step ``env CUDA_VISIBLE_DEVICES=2 app`` got ``2``
  (``SLURM_STEP_GPUS=0,1,2,3``).

So Slurm, not balsam, chose the GPU of every packed step. The test applies those recorded rules
to the platform's line and runs the part after ``--overlap`` as the task would be run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform

NODE_GPUS = ("0", "1", "2", "3")


def slurm_task_cvd(args: list[str]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` real Slurm 22.05 gave the task of an ``--overlap`` step of a
    4-GPU allocation (recorded above): the first N GPUs for ``--gpus-per-task N``, whatever other
    steps hold; all of the allocation's for a step without a GPU request."""
    options = args[:args.index("--overlap")]
    if "--gpus-per-task" in options:
        return ",".join(NODE_GPUS[:int(options[options.index("--gpus-per-task") + 1])])
    return ",".join(NODE_GPUS)


def task_sees(args: list[str], balsam_cvd: str) -> str:
    """Run what srun runs (the words after ``--overlap``, with a program printing the variable) in
    the environment the task gets: balsam's value as srun inherited it, then Slurm's over it."""
    program = args[args.index("--overlap") + 1:]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": balsam_cvd}
    env["CUDA_VISIBLE_DEVICES"] = slurm_task_cvd(args)  # slurmstepd's gres/gpu plugin, after srun's env
    printer = [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"]
    done = subprocess.run(program + printer, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def packed(gpus_per_rank: float, gpu_ids: tuple[str, ...], first_core: int, **kw) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=1, gpus_per_rank=gpus_per_rank,
                      threads_per_rank=8, cpu_ids=[tuple(range(first_core, first_core + 8))], gpu_ids=[gpu_ids], **kw)


@pytest.mark.parametrize("jobs", [
    [(1, (g,)) for g in NODE_GPUS],                           # 4 concurrent one-GPU jobs
    [(2, ("0", "1")), (2, ("2", "3"))],                       # 2 concurrent two-GPU jobs
    [(0.5, ("0",)), (0.5, ("0",)), (1, ("1",)), (1, ("2",)), (1, ("3",))],  # fractions and whole GPUs
], ids=["one-gpu-x4", "two-gpu-x2", "half-and-whole"])
def test_packed_steps_see_balsams_gpus(jobs) -> None:
    platform = PerlmutterGPUPlatform()
    for n, (gpr, ids) in enumerate(jobs):
        args = platform.mpi_launch_args(packed(gpr, ids, 8 * n))
        balsam = ",".join(ids)
        assert task_sees(args, balsam) == balsam, shlex.join(args)
        # The step asks Slurm for no GPU: it has the allocation's (visible under a device cgroup too).
        assert not any(a.startswith("--gpus") for a in args), shlex.join(args)


def test_jobs_with_their_nodes_and_slurm_gpu_requests_keep_slurms_gpus() -> None:
    platform = PerlmutterGPUPlatform()
    # A whole node: Slurm's GPUs are all free, and --gpus-per-task binds each rank to its own
    # (recorded: -n 4 --gpus-per-task 1 gave tasks 0-3 CUDA_VISIBLE_DEVICES 0, 1, 2, 3).
    whole = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=4, gpus_per_rank=1,
                       threads_per_rank=8, cpu_ids=[tuple(range(64))], gpu_ids=[NODE_GPUS], whole_nodes=True)
    assert platform.mpi_command_line(whole) == (
        "srun -n 4 --ntasks-per-node 4 --gpus-per-task 1 --nodelist nid001234 --nodes 1 --cpus-per-task 32 "
        "--cpu-bind=cores --overlap ./app")
    # The job's own GPU request: Slurm places its GPUs, as asked.
    for params in ({"gpus-per-task": "1"}, {"--gpu-bind": "none"}, {"gres": "gpu:1"}, {"gpus": "1"}):
        args = platform.mpi_launch_args(packed(1, ("2",), 16, launch_params=params))
        # Changed deliberately: the packed step's wrapper now sets the job's SLURM_CPUS_* (its -c
        # is the node's, for the core mask: test_perlmutter_packed_cpus_recorded.py), but no GPU ids.
        tail = args[args.index("--overlap") + 1:]
        assert not any(a.startswith("CUDA_VISIBLE_DEVICES=") for a in tail), (params, args)
    # A serial-mode worker (no GPU ids: its tasks set their own) keeps its GPU request.
    worker = LaunchSpec(cmdline="w", hostnames=("nid001234",), ranks_per_node=1, gpus_per_rank=4.0)
    assert platform.mpi_launch_args(worker)[-1] == "--overlap"


@pytest.mark.parametrize("ranks,threads,cores", [(4, 16, range(64)), (4, 8, range(0, 32))],
                         ids=["every-core-and-gpu", "every-gpu-half-the-cores"])
def test_packed_job_holding_every_gpu_keeps_slurms_one_gpu_per_rank(ranks, threads, cores) -> None:
    """A packed job (node_packing_count 2: not whole_nodes) holding all the node's GPUs, or all its
    cores: no other step holds a GPU, so --gpus-per-task 1 gives each rank its own (recorded:
    -n 4 --gpus-per-task 1 gave tasks 0-3 GPUs 0-3); balsam's ids set in the task gave every rank
    all four."""
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, gpus_per_rank=1,
                      threads_per_rank=threads, cpu_ids=[tuple(cores)], gpu_ids=[NODE_GPUS])
    args = platform.mpi_launch_args(spec)
    assert args[args.index("--gpus-per-task") + 1] == "1", shlex.join(args)
    assert "CUDA_VISIBLE_DEVICES" not in " ".join(args[args.index("--overlap"):]), shlex.join(args)
    # Every core: the job has its node (no masks, Slurm's --cpu-bind=cores), as a whole-node job.
    if len(cores) == 64:
        assert args[-1] == "--overlap" and "--cpu-bind=cores" in args, shlex.join(args)
