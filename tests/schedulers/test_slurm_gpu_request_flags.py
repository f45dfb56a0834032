"""A site's default ``gpus_per_node`` (Perlmutter GPU sites: '4') gives way to a BatchJob's own GPU
request, as the driver's --exclusive gives way to its own sharing flags (test_slurm_exclusive.py).

Beside the default, on real Slurm 22.05 with GPU GRES: ``--gpus=1`` and ``-G 1`` were refused by
sbatch ("Failed to ensure --gpus >= --gres=gpu/--gpus-per-node >= --gpus-per-socket"), and
``-x exclusive=no -x sbatch_flags=--gres=gpu:2`` got GPUs 0,1 but exported SLURM_GPUS_PER_NODE=4,
so every srun step failed ("Step requested gres_per_node=gpu:4 is more than the job's
gres_per_node=gpu:2")."""

from __future__ import annotations

import pytest

from balsam.scheduler import SubmitRequest
from balsam_scheduler_slurm import SlurmScheduler

DEFAULTS = {"constraint": "gpu", "gpus_per_node": "4", "exclusive": "", "sbatch_flags": ""}


def _args(tmp_path, **given) -> list[str]:
    request = SubmitRequest(script_path=tmp_path / "qlaunch00007.sh", project="m1", queue="shared", num_nodes=1,
                            wall_time_min=10, job_name="qlaunch00007", optional_params={**DEFAULTS, **given})
    return list(SlurmScheduler(user="me").render_submit(request).args)


@pytest.mark.parametrize("given, own", [
    ({"sbatch_flags": "--gres=gpu:2", "exclusive": "no"}, ["--gres=gpu:2"]),
    ({"sbatch_flags": "--gres gpu:a100:2", "exclusive": "no"}, ["--gres", "gpu:a100:2"]),
    ({"sbatch_flags": "--gres=craynetwork:1,gpu:2", "exclusive": "no"}, ["--gres=craynetwork:1,gpu:2"]),
    ({"sbatch_flags": "--gpus=1", "exclusive": "no"}, ["--gpus=1"]),
    ({"sbatch_flags": "-G 1"}, ["-G", "1"]),
    ({"sbatch_flags": "-G1"}, ["-G1"]),
    ({"sbatch_flags": "--ntasks=2 --gpus-per-task=1", "exclusive": "no"}, ["--gpus-per-task=1"]),
    ({"sbatch_flags": "--ntasks-per-node=1 --gpus-per-task=1"}, ["--gpus-per-task=1"]),
    ({"sbatch_flags": "--ntasks-per-node 2 --gpus-per-task 1"}, ["--gpus-per-task", "1"]),
    # a count that does not divide the default: sbatch refused the two ("not multiple of --gpus-per-task")
    ({"sbatch_flags": "--gpus-per-task=3"}, ["--gpus-per-task=3"]),
    ({"sbatch_flags": "-n1 --gpus-per-task=3"}, ["--gpus-per-task=3"]),
    ({"sbatch_flags": "--gpus-per-node=2"}, ["--gpus-per-node=2"]),
    ({"sbatch_flags": "--gpus-per-socket=1"}, ["--gpus-per-socket=1"]),
    ({"sbatch_flags": "--tres-per-task=gres/gpu:1", "exclusive": "no"}, ["--tres-per-task=gres/gpu:1"]),
    ({"gpus": "2"}, ["--gpus=2"]),
    ({"gres": "gpu:2", "exclusive": "no"}, ["--gres=gpu:2"]),
])
def test_a_batch_jobs_own_gpu_request_replaces_the_default(tmp_path, given, own) -> None:
    args = _args(tmp_path, **given)
    assert "--gpus-per-node=4" not in args, args
    assert all(a in args for a in own), args


@pytest.mark.parametrize("given", [{}, {"sbatch_flags": "--gres=craynetwork:1 --mail-type=END"},
                                   {"gres": "craynetwork:1"}, {"sbatch_flags": "--gpu-bind=closest"},
                                   # values, not flags (sbatch takes them as the comment, the job name)
                                   {"sbatch_flags": "--comment -Gx"}, {"sbatch_flags": "--job-name --gpus"},
                                   {"sbatch_flags": "-J --gpus=1 --comment=--gres=gpu:2"}])
def test_the_default_stays_without_an_own_gpu_request(tmp_path, given) -> None:
    assert _args(tmp_path, **given).count("--gpus-per-node=4") == 1


@pytest.mark.parametrize("flags", ["--ntasks-per-node=4 --gpus-per-task=1", "--ntasks-per-node 2 --gpus-per-task=2",
                                   "-n2 --gpus-per-task=1", "--gpus-per-task 1", "--exclusive -n 1 --gpus-per-task=1",
                                   "--ntasks-per-node=4 --tres-per-task=gres/gpu:1", "--gres=gpu:2",
                                   "--gres gpu:4 --ntasks-per-node=4"])
def test_whole_nodes_keep_the_default_beside_a_per_task_or_gres_request(tmp_path, flags) -> None:
    """Steps inherit a job's own --gpus-per-task as their request: under ``--exclusive
    --ntasks-per-node=4 --gpus-per-task=1`` alone (NERSC's usual flags) every single-rank packed
    step held GPU 0 while balsam gave jobs 1-3 (real Slurm 22.05); with --gpus-per-node=4 beside
    it (accepted by sbatch) the node's 4. ``--exclusive --gres=gpu:2`` beside it: accepted, steps
    held the node's 4; without it a single-rank step's --gres=craynetwork:0 held none."""
    args = _args(tmp_path, sbatch_flags=flags)
    assert args.count("--gpus-per-node=4") == 1 and "--exclusive" in args, args


def test_the_batch_jobs_own_gpus_per_node_is_kept(tmp_path) -> None:
    assert "--gpus-per-node=1" in _args(tmp_path, gpus_per_node="1", exclusive="no")
    assert not any(a.startswith("--gpus") for a in _args(tmp_path, gpus_per_node=""))
