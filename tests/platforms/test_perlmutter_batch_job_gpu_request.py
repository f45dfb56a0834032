"""A Perlmutter GPU site's BatchJobs ask Slurm for the nodes' GPUs (``--gpus-per-node=4``), as Balsam
0.7's template did. Without a GPU request the allocation holds the GPUs only implicitly
(``--exclusive``), and real Slurm (22.05, GPU GRES) gives a step that asks for no GPU none of them:
``CUDA_VISIBLE_DEVICES`` unset in the step (with ``--gpus-per-node=4``: ``0,1,2,3``), under a device
cgroup no device. Packed and fractional GPU jobs and the serial-mode workers run in such steps."""

from __future__ import annotations

from pathlib import Path

from balsam.batch_job_rules import check_batch_job
from balsam.scheduler import SubmitRequest
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from balsam_scheduler_slurm.scheduler import SlurmScheduler


def _sbatch(platform, tmp_path: Path, **given: str) -> list[str]:
    scheduler = platform.settings_defaults()["scheduler"]
    defaults = scheduler["optional_batch_job_params"]
    check_batch_job({"queue": "regular", "project": "m1", "num_nodes": 2, "wall_time_min": 10, "optional_params": given},
                    scheduler["allowed_queues"], [], defaults)
    slurm = SlurmScheduler(user="me", options=scheduler["options"])
    return list(slurm.render_submit(SubmitRequest(
        script_path=tmp_path / "qlaunch1.sh", project="m1", queue="regular", num_nodes=2, wall_time_min=10,
        optional_params={**defaults, **given})).args)


def test_gpu_nodes_ask_for_their_gpus(tmp_path: Path) -> None:
    args = _sbatch(PerlmutterGPUPlatform(), tmp_path)
    assert "--gpus-per-node=4" in args and "--constraint=gpu" in args
    # A shared-QOS BatchJob asks for its own count, or none (its own sbatch_flags).
    assert "--gpus-per-node=1" in _sbatch(PerlmutterGPUPlatform(), tmp_path, gpus_per_node="1", exclusive="no")
    assert not any(a.startswith("--gpus") for a in _sbatch(PerlmutterGPUPlatform(), tmp_path, gpus_per_node=""))
    assert not any(a.startswith("--gpus") for a in _sbatch(PerlmutterCPUPlatform(), tmp_path))
