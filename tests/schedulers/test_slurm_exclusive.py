"""The Slurm driver asks for whole nodes (sbatch --exclusive) unless told not to.

A launcher places jobs on every core and GPU of its allocation's nodes. On a partition that shares
nodes (SelectType cons_tres, as the CI's Slurm and many centres' shared partitions), sbatch without
--exclusive put two 2-node BatchJobs on the same node[1-2] while node3/node4 stayed idle, and both
launchers ran whole-node jobs there (test_slurm_real.py shows it on the real Slurm)."""

from __future__ import annotations

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.scheduler import SubmitRequest
from balsam_scheduler_slurm import SlurmScheduler


def _args(tmp_path, options=None, **params) -> list[str]:
    request = SubmitRequest(script_path=tmp_path / "qlaunch00003.sh", project="root", queue="debug", num_nodes=2,
                            wall_time_min=10, job_name="qlaunch00003", optional_params=params)
    return list(SlurmScheduler(user="root", options=options).render_submit(request).args)


def test_sbatch_asks_for_whole_nodes_by_default(tmp_path) -> None:
    args = _args(tmp_path)
    assert args.count("--exclusive") == 1, args
    assert args[-1] == str(tmp_path / "qlaunch00003.sh")  # a flag, before the script


@pytest.mark.parametrize("params", [{"exclusive": "yes"}, {"exclusive": "true"}])
def test_a_batch_job_asking_for_exclusive_gets_the_flag_once(tmp_path, params) -> None:
    assert _args(tmp_path, **params).count("--exclusive") == 1
    assert _args(tmp_path, {"exclusive": False}, **params).count("--exclusive") == 1


def test_the_option_and_a_batch_job_turn_it_off(tmp_path) -> None:
    assert not any(a.startswith("--exclusive") for a in _args(tmp_path, {"exclusive": False}))
    assert not any(a.startswith("--exclusive") for a in _args(tmp_path, exclusive="no"))


@pytest.mark.parametrize("flags", ["--oversubscribe", "-s", "--exclusive=user", "--exclusive=mcs"])
def test_a_batch_jobs_own_sharing_flag_is_not_contradicted(tmp_path, flags) -> None:
    args = _args(tmp_path, sbatch_flags=flags)
    assert "--exclusive" not in args and args.count(flags) == 1, args


def test_exclusive_is_a_typed_settings_option() -> None:
    settings = loads_settings("scheduler:\n  name: slurm\n  options:\n    exclusive: false\n")
    assert settings.scheduler.options.exclusive is False
    assert loads_settings("scheduler:\n  name: slurm\n").scheduler.options.exclusive is True
    with pytest.raises(SettingsError, match=r"settings.yml:4 scheduler.options.exclusive"):
        loads_settings("scheduler:\n  name: slurm\n  options:\n    exclusive: sometimes\n")
