"""A Perlmutter GPU site's BatchJobs ask Slurm for the nodes' GPUs (``--gpus-per-node=4``), as Balsam
0.7's template did. Without a GPU count the allocation holds the GPUs only implicitly
(``--exclusive``), and real Slurm (22.05, GPU GRES) gives a step that asks for no GPU none of them:
``CUDA_VISIBLE_DEVICES`` unset in the step (with ``--gpus-per-node=4``: ``0,1,2,3``), under a device
cgroup no device. Packed GPU jobs (their steps ask for no GPU: balsam sets their ids) and fractional
ones run in such steps; serial-mode workers ask for the node's GPUs (``--gpus-per-task 4``) and had them.

The sbatch line is built as the agent builds it: the new site's settings (``settings_defaults()``
through the settings loader), the BatchJob checked by the scheduler module's rules, its
``SubmitRequest`` from the module's own ``_submit_request`` (the defaults overlaid with the
BatchJob's params), rendered by the site's Slurm driver."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from balsam.config import parse_settings
from balsam.config.drivers import site_scheduler
from balsam.site.modules.scheduler import SchedulerModule, validate_batch_job
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform


def _sbatch(platform, tmp_path: Path, **given: str) -> list[str]:
    defaults = platform.settings_defaults()
    defaults["scheduler"]["allowed_projects"] = ["m1"]  # site init's sacctmgr lookup
    settings = parse_settings(defaults)
    batch_job = {"id": 1, "queue": "regular", "project": "m1", "num_nodes": 2, "wall_time_min": 10,
                 "optional_params": given}
    validate_batch_job(batch_job, settings.scheduler)
    module = SimpleNamespace(options=settings.scheduler)  # _submit_request reads only the module's settings
    request = SchedulerModule._submit_request(module, batch_job, tmp_path / "qlaunch00001.sh")
    return list(site_scheduler(settings).render_submit(request).args)


def _gpu_flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith(("--gpus", "--gres", "-G"))]


def test_gpu_nodes_ask_for_their_gpus(tmp_path: Path) -> None:
    args = _sbatch(PerlmutterGPUPlatform(), tmp_path)
    assert "--gpus-per-node=4" in args and "--constraint=gpu" in args and "--exclusive" in args
    # A shared-QOS BatchJob asks for its own count, or none (its own sbatch_flags).
    assert _gpu_flags(_sbatch(PerlmutterGPUPlatform(), tmp_path, gpus_per_node="1", exclusive="no")) == [
        "--gpus-per-node=1"]
    assert not _gpu_flags(_sbatch(PerlmutterGPUPlatform(), tmp_path, gpus_per_node=""))
    assert not _gpu_flags(_sbatch(PerlmutterCPUPlatform(), tmp_path))


@pytest.mark.parametrize("flags, own", [("--gres=gpu:2", ["--gres=gpu:2"]), ("--gpus=1", ["--gpus=1"]),
                                        ("-G 1", ["-G"]), ("--gpus-per-node=2", ["--gpus-per-node=2"])])
def test_a_batch_jobs_own_gpu_flags_go_without_the_default(tmp_path: Path, flags: str, own: list[str]) -> None:
    """Beside the default, real Slurm refused --gpus=1 / -G 1 at sbatch, and --gres=gpu:2 exported
    SLURM_GPUS_PER_NODE=4 into a 2-GPU job: every srun step failed."""
    args = _sbatch(PerlmutterGPUPlatform(), tmp_path, exclusive="no", sbatch_flags=flags)
    assert _gpu_flags(args) == own, args


NODES = {"SLURM_JOB_NODELIST": "nid[001-002]", "SLURM_JOB_ID": "123"}


def test_a_job_without_a_gpu_count_is_said_in_the_launchers_log(caplog) -> None:
    """A site made before the default (no gpus_per_node in settings.yml): its BatchJobs ask for no
    GPU count, and the launcher says so, with the settings key to add."""
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert "asked for no GPU count" in caplog.text and "gpus_per_node: '4'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "SLURM_GPUS_PER_NODE": "4"})
        PerlmutterGPUPlatform().discover_nodes({**NODES, "SLURM_JOB_NODELIST": "nid001", "SLURM_GPUS": "1",
                                                "CUDA_VISIBLE_DEVICES": "0"})  # the shared QOS, one node
        PerlmutterCPUPlatform().discover_nodes(NODES)
    assert not caplog.records, caplog.text


@pytest.mark.parametrize("env, kept", [
    ({"SLURM_GPUS_PER_NODE": "2"}, ("0", "1")),
    ({"SLURM_GPUS_PER_NODE": "a100:1"}, ("0",)),
    ({"SLURM_GPUS_PER_NODE": "4"}, ("0", "1", "2", "3")),
    # over 2 nodes every single-node step asks for the job's 2 (real Slurm 22.05: 0,1 on either node)
    ({"SLURM_GPUS": "2"}, ("0", "1")),
])
def test_whole_nodes_with_fewer_gpus_per_node_give_jobs_the_gpus_their_steps_get(env, kept, caplog) -> None:
    """Real Slurm 22.05, ``--exclusive --gpus-per-node=2``: the job holds the node's 4 GPUs
    (``CUDA_VISIBLE_DEVICES=0,1,2,3``) but every step gets 0,1; balsam gave packed jobs GPU 2 and 3."""
    nodes = PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", **env})
    assert [n.gpu_ids for n in nodes] == [kept, kept]
    one = PerlmutterGPUPlatform().discover_nodes({"SLURM_JOB_NODELIST": "nid001", "SLURM_JOB_ID": "1",
                                                  "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS": "1"})
    assert one[0].gpu_ids == ("0",)


DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_docs_perlmutter_examples_use_params_a_new_gpu_site_accepts() -> None:
    """docs/schedulers/slurm.md showed Perlmutter's shared QOS with ``-x gpus=1``: refused by a new
    site (``gpus`` is not in its optional_batch_job_params) and, as --gpus=1 beside the default,
    by sbatch."""
    accepted = PerlmutterGPUPlatform().settings_defaults()["scheduler"]["optional_batch_job_params"]
    texts = [(DOCS / "platforms" / "perlmutter.md").read_text()]
    texts += [p for p in (DOCS / "schedulers" / "slurm.md").read_text().split("\n\n") if "Perlmutter" in p]
    keys = {key for text in texts for key in re.findall(r"-x (\w+)=", text)}
    assert "gpus_per_node" in keys and keys <= set(accepted), sorted(keys - set(accepted))


def test_gpus_over_several_nodes_are_said_in_the_launchers_log(caplog) -> None:
    """``-N2 --exclusive --gpus=8`` (real Slurm 22.05): every single-node step asked for the job's 8
    GPUs and was refused ('Invalid generic resource (gres) specification'); ``--gpus=2``: a
    single-node step held 0,1 of its node, a two-node one was refused."""
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        nodes = PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS": "8"})
    assert [n.gpu_ids for n in nodes] == [("0", "1", "2", "3")] * 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "--gpus=8 over 2 nodes" in errors[0].getMessage(), caplog.text
    assert "Invalid generic resource" in errors[0].getMessage() and "gpus_per_node" in errors[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS": "2"})
    assert "--gpus=2 over 2 nodes" in caplog.text and not [r for r in caplog.records if r.levelno == logging.ERROR]


def test_narrowing_keeps_the_gpus_steps_hold_not_the_first_of_gpu_ids() -> None:
    """Slurm gives a step the first GPUs in its own order (0,1 under --gpus-per-node=2), whatever
    order launcher.platform_options.gpu_ids lists them in."""
    platform = PerlmutterGPUPlatform({"gpu_ids": "3,2,1,0"})
    nodes = platform.discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_PER_NODE": "2"})
    assert [sorted(n.gpu_ids) for n in nodes] == [["0", "1"], ["0", "1"]]
    no_cvd = platform.discover_nodes({**NODES, "SLURM_GPUS_PER_NODE": "2"})
    assert [sorted(n.gpu_ids) for n in no_cvd] == [["0", "1"], ["0", "1"]]


def test_a_per_task_gpu_count_alone_is_said_in_the_launchers_log(caplog) -> None:
    """``--exclusive --ntasks-per-node=4 --gpus-per-task=1`` without --gpus-per-node (real Slurm
    22.05): every single-rank packed step inherited SLURM_GPUS_PER_TASK=1 and held GPU 0 while
    balsam gave jobs 1-3."""
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_PER_TASK": "1"})
    assert "SLURM_GPUS_PER_TASK=1" in caplog.text and "gpus_per_node=4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_PER_TASK": "1",
                                                "SLURM_GPUS_PER_NODE": "4"})
    assert not caplog.records, caplog.text


def test_the_no_count_advice_fits_a_gres_batch_job(caplog) -> None:
    """A ``--gres=gpu:N`` BatchJob sets no GPU count either; the advice was ``--gpus-per-node=4`` in
    sbatch_flags, which beside a shared job's --gres=gpu:2 broke every step."""
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        PerlmutterGPUPlatform().discover_nodes({**NODES, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert "--gres=gpu:N" in caplog.text and "sbatch_flags=--gpus-per-node" not in caplog.text, caplog.text


@pytest.mark.parametrize("flags", ["--ntasks-per-node=4 --gpus-per-task=1", "-n 8 --gpus-per-task=1"])
def test_nersc_per_task_flags_keep_the_nodes_gpus(tmp_path: Path, flags: str) -> None:
    """NERSC's usual GPU job flags at a new site: the default stays (sbatch took both; alone, each
    single-rank packed step held only GPU 0)."""
    args = _sbatch(PerlmutterGPUPlatform(), tmp_path, sbatch_flags=flags)
    assert "--gpus-per-node=4" in args and "--exclusive" in args, args
