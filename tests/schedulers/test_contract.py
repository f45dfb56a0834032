"""What every scheduler plugin promises: entry points, default job templates, no stray exceptions."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest

from balsam.models import BatchJob, BatchJobPartition
from balsam.plugins.manager import PluginManager
from balsam.scheduler import (
    Command,
    JobHistory,
    Scheduler,
    SchedulerError,
    StatusPoll,
    SubmitRequest,
)
from balsam.site.job_template import build_context, render_job_script
from balsam.states import BatchJobMode, BatchJobState
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


def test_default_history_says_finished_without_running_anything():
    class Plain(Exploding):
        def parse_status(self, result, now):
            return {}

    runner = ReplayRunner({})
    histories = Plain(runner, user="me").get_histories({1: None, 2: None})
    assert set(histories) == {1, 2} and histories[1].scheduler_id == 1 and histories[2].state is BatchJobState.finished
    assert runner.calls == []


class EndedInPoll(Exploding):
    """A status command that also lists jobs that ended (as squeue does) and a history command
    that fails or knows only some jobs."""

    def parse_status(self, result, now):
        ended = {7: JobHistory(scheduler_id=7, state=BatchJobState.finished, native_state="TIMEOUT")}
        return StatusPoll(time=now, statuses={}, ended=ended)

    def render_histories(self, jobs):
        return Command(["history"])

    def parse_histories(self, result, jobs, last_poll):
        assert isinstance(last_poll, StatusPoll)
        if result.returncode:
            raise SchedulerError("history database down")
        return {i: (JobHistory(scheduler_id=i, state=BatchJobState.finished, native_state="COMPLETED")
                    if i == 8 else None) for i in jobs}


def test_history_falls_back_on_what_the_last_poll_said():
    ok = EndedInPoll(ReplayRunner({"status": result(), "history": result()}), user="me")
    ok.get_statuses()
    histories = ok.get_histories({7: None, 8: None, 9: None})
    assert histories[7].native_state == "TIMEOUT" and histories[8].native_state == "COMPLETED" and histories[9] is None
    down = EndedInPoll(ReplayRunner({"status": result(), "history": result(returncode=1)}), user="me")
    down.get_statuses()
    assert down.get_histories({7: None, 8: None})[7].native_state == "TIMEOUT"
    with pytest.raises(SchedulerError, match="history database down"):
        down.get_histories({8: None})  # nothing to fall back on: the failure is reported
    fresh = EndedInPoll(ReplayRunner({"history": result(returncode=1)}), user="me")
    with pytest.raises(SchedulerError):
        fresh.get_histories({7: None})  # no poll yet
    poll = StatusPoll(time=dt.datetime.now(dt.timezone.utc), ended={7: JobHistory(scheduler_id=7, state=BatchJobState.finished)})
    assert fresh.get_histories({7: None}, last_poll=poll)[7] is not None  # a poll passed in explicitly


def test_status_poll_is_frozen():
    poll = StatusPoll(time=dt.datetime.now(dt.timezone.utc), statuses={})
    with pytest.raises(TypeError):
        poll.statuses[1] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        poll.time = None  # type: ignore[misc]


def test_public_guard_for_the_rare_override():
    class Override(Exploding):
        def get_backfill_windows(self):
            with self.guard("backfill from two commands"):
                return {"q": [1, 2][5]}

    with pytest.raises(SchedulerError, match="exploding backfill from two commands failed: IndexError"):
        Override(ReplayRunner({}), user="me").get_backfill_windows()


def test_site_defaults_leave_out_what_cannot_be_discovered():
    assert Exploding(ReplayRunner({}), user="me").site_defaults() == {"scheduler": {"name": "exploding"}}
    runner = ReplayRunner({"sinfo": result(stdout="debug|4|30:00\n"), "sacctmgr": result(stdout="m1\nm2\n")})
    defaults = SlurmScheduler(runner, user="me").site_defaults()["scheduler"]
    assert defaults["allowed_queues"] == {"debug": {"max_nodes": 4, "max_walltime": 30, "max_queued_jobs": 20}}
    assert defaults["allowed_projects"] == ["m1", "m2"] and defaults["name"] == "slurm"
    broken = ReplayRunner({"sinfo": result(stderr="sinfo: error: slurm_load_partitions: Unable to contact slurm controller",
                                           returncode=1)})
    assert SlurmScheduler(broken, user="me").site_defaults() == {"scheduler": {"name": "slurm"}}


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_missing_executable_is_a_scheduler_error(name, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    driver = DRIVERS[name](user="me")
    with pytest.raises(SchedulerError, match="not found on PATH"):
        driver.get_statuses()
    with pytest.raises(SchedulerError, match="not found on PATH"):
        driver.submit(SubmitRequest(script_path=tmp_path / "s.sh", project="p", queue="q", num_nodes=1, wall_time_min=5))
