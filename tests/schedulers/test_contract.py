"""What every scheduler plugin promises: entry points, default job templates, no stray exceptions."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest

from balsam.models import BatchJob, BatchJobPartition
from balsam.plugins.manager import PluginManager
from balsam.scheduler import Command, CommandResult, Scheduler, SchedulerError, SubmitRequest
from balsam.site.job_template import build_context, render_job_script
from balsam.states import BatchJobMode
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import ReplayRunner, result

DRIVERS = {"slurm": SlurmScheduler, "pbs": PBSScheduler, "cobalt": CobaltScheduler}


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_entry_point_loads_the_driver(name):
    manager = PluginManager(allowed=[name])
    manager.load()
    assert manager.load_driver("scheduler", name) is DRIVERS[name]


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_each_plugin_is_its_own_distribution(name):
    from importlib.metadata import distribution

    dist = distribution(f"balsam-scheduler-{name}")
    points = [ep for ep in dist.entry_points if ep.group == "balsam.schedulers"]
    assert [ep.name for ep in points] == [name]
    assert any(r.startswith("balsam") for r in dist.requires or [])


def _batch_job(**overrides) -> BatchJob:
    fields = dict(id=42, site_id=1, project="proj", queue="debug", num_nodes=3, wall_time_min=90,
                  job_mode=BatchJobMode.mpi, filter_tags={"workflow": "w1"},
                  optional_params={"reservation": "resv1", "constraint": "gpu", "filesystems": "home:eagle",
                                   "attrs": "mcdram=cache"},
                  partitions=[BatchJobPartition(job_mode=BatchJobMode.serial, num_nodes=1),
                              BatchJobPartition(job_mode=BatchJobMode.mpi, num_nodes=2)])
    fields.update(overrides)
    return BatchJob(**fields)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_default_job_template_renders(name, tmp_path):
    script = render_job_script(DRIVERS[name].default_job_template,
                               build_context(_batch_job(), tmp_path, call_hook=False))
    assert script.startswith("#!/bin/bash\n")
    assert f"export BALSAM_SITE_PATH={tmp_path.resolve()}" in script and "export BALSAM_BATCH_JOB_ID=42" in script
    assert "-m balsam.launcher -j mpi -t 88 --tag workflow=w1 --part serial:1 --part mpi:2" in script
    expected = {
        "slurm": ["#SBATCH --nodes=3", "#SBATCH --time=90", "#SBATCH --account=proj", 'for queue "debug"',
                  "#SBATCH --reservation=resv1", "#SBATCH --constraint=gpu"],
        "pbs": ["#PBS -l select=3\n", "#PBS -l walltime=01:30:00", "#PBS -l filesystems=home:eagle", "#PBS -A proj",
                "#PBS -q debug"],
        "cobalt": ["#COBALT -n 3", "#COBALT -t 90", "#COBALT -A proj", "#COBALT -q debug",
                   "#COBALT --attrs mcdram=cache"],
    }[name]
    for line in expected:
        assert line in script
    directives = [ln for ln in script.splitlines() if ln.startswith("#") and not ln.startswith("#!")]
    assert all("None" not in ln for ln in directives)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_template_leaves_out_empty_pass_through_params(tmp_path):
    script = render_job_script(SlurmScheduler.default_job_template,
                               build_context(_batch_job(optional_params={"reservation": ""}), tmp_path, call_hook=False))
    assert "--reservation" not in script and "--constraint" not in script


class Exploding(Scheduler):
    """A driver whose parsers trip over output nobody anticipated."""

    name = "exploding"

    def render_submit(self, request):
        return Command(["submit"])

    def parse_submit(self, result):
        return int(result.stdout)  # ValueError on garbage

    def render_status(self, user):
        return Command(["status"])

    def parse_status(self, result, now):
        return {}["missing"]  # KeyError

    def render_delete(self, scheduler_id):
        return Command(["delete"])

    def render_backfill(self):
        return Command(["backfill"])

    def parse_backfill(self, result):
        return [][1]


def test_no_exception_but_scheduler_error_escapes_the_driver(tmp_path):
    runner = ReplayRunner({p: result(stdout="garbage") for p in ("submit", "status", "delete", "backfill")})
    driver = Exploding(runner, user="me")
    request = SubmitRequest(script_path=tmp_path / "s.sh", project="p", queue="q", num_nodes=1, wall_time_min=1)
    with pytest.raises(SchedulerError, match="exploding submit failed: ValueError"):
        driver.submit(request)
    with pytest.raises(SchedulerError, match="status poll failed: KeyError"):
        driver.get_statuses()
    with pytest.raises(SchedulerError, match="backfill query failed: IndexError"):
        driver.get_backfill_windows()
    with pytest.raises(SchedulerError, match="could not delete job 5"):
        Exploding(ReplayRunner({"delete": result(returncode=1, stderr="nope")}), user="me").delete_job(5)


def test_default_get_histories_asks_job_by_job():
    class Plain(Exploding):
        def parse_status(self, result, now):
            return {}

    histories = Plain(ReplayRunner({}), user="me").get_histories({1: None, 2: None})
    assert set(histories) == {1, 2} and histories[1].scheduler_id == 1


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_missing_executable_is_a_scheduler_error(name, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    driver = DRIVERS[name](user="me")
    with pytest.raises(SchedulerError, match="not found on PATH"):
        driver.get_statuses()
    with pytest.raises(SchedulerError, match="not found on PATH"):
        driver.submit(SubmitRequest(script_path=tmp_path / "s.sh", project="p", queue="q", num_nodes=1, wall_time_min=5))
