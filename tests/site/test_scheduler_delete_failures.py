"""Failed deletes: logged once per failure (not per BatchJob), and a withdrawal's error cleared.

Found by a review of 49a4f5b:
- the repeat log of failed deletes was keyed by the driver's message, which names the scheduler
  job (``could not delete job 1001: ...``): a scheduler outage with N pending_deletion BatchJobs
  logged N full lines, and past ``_RepeatLog.MAX_KEPT`` (64) the keys evicted each other, so every
  BatchJob was logged in full every cycle (70 BatchJobs, 5 cycles: 350 lines);
- a withdrawal's failed delete (``withdrawal: delete failed: ...``) stayed in the BatchJob's
  status_info after the delete went through and the BatchJob finished (only ``delete failed: ``
  was cleared), and was logged at WARNING every cycle while it failed.
"""

from __future__ import annotations

import logging

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import CommandResult, JobHistory, SchedulerJobStatus
from balsam.site.modules import scheduler as scheduler_module
from balsam.site.modules.scheduler import WITHDRAW_IF_QUEUED, SchedulerModule
from balsam.states import BatchJobState
from site_test_utils import batch_job, create_batch_job

LOGGER = "balsam.site.modules.scheduler"


def refuse(command):
    return CommandResult(tuple(command.args), 1, "", "cannot connect to the queue server: Connection refused")


class Listed(LocalScheduler):
    """The real local driver (its delete command, its guard and message naming the job); its poll
    lists ``listed`` in the given states, and its delete command is refused while ``refusing``."""

    def __init__(self, state_dir) -> None:
        super().__init__(self._run, state_dir=state_dir)
        self.listed: dict[int, BatchJobState] = {}
        self.history: dict[int, JobHistory] = {}
        self.refusing = True

    def _run(self, command):
        if self.refusing:
            return refuse(command)
        if command.args[-2:-1] == ("delete",):
            self.listed.pop(int(command.args[-1]), None)
        return CommandResult(tuple(command.args), 0, "", "")

    def get_statuses(self, now=None):
        return {i: SchedulerJobStatus(scheduler_id=i, state=state, queue="local", num_nodes=1, project="local",
                                      time_remaining_min=5, queued_time_min=0, wall_time_min=10)
                for i, state in self.listed.items()}

    def get_histories(self, jobs, last_poll=None):
        return {i: self.history.get(i) for i in jobs}


def _delete_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
            and "delete" in r.getMessage()]


def test_a_delete_outage_of_many_batch_jobs_is_one_line_then_one_summary(make_site, client, tmp_path, caplog,
                                                                         monkeypatch):
    site = make_site()
    driver = Listed(tmp_path / "q")
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=driver)
    count = 70  # above _RepeatLog.MAX_KEPT (64): keyed per job, the keys evicted each other
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(count)]
    client.patch("/batch-jobs/", json=[{"id": i, "state": "pending_deletion", "scheduler_id": 1000 + i} for i in ids])
    driver.listed = {1000 + i: BatchJobState.running for i in ids}
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        module.run_cycle()
    lines = _delete_lines(caplog)
    assert len(lines) == 1, f"{len(lines)} lines, the last: {lines[-1]}"
    assert f"could not delete job {1000 + ids[0]}" in lines[0] and "summed up every 300 s" in lines[0]
    for i in ids:  # each BatchJob still says why it is not deleted (balsam site stop reads it)
        assert batch_job(client, i)["status_info"]["error"].startswith("delete failed: local scheduler could not delete job")

    caplog.clear()
    monkeypatch.setattr(scheduler_module, "OUTAGE_LOG_EVERY_S", 0.0)  # the summary is due
    module.run_cycle()
    summary = _delete_lines(caplog)[0]
    assert summary.startswith("delete of scheduler jobs still failing: local scheduler could not delete job")
    assert f"repeated {3 * count} times" in summary and "and 60 more" in summary, summary

    driver.refusing = False  # the scheduler answers: deleted, then gone, and the errors removed
    module.run_cycle()
    module.run_cycle()
    for i in ids[:3]:
        record = batch_job(client, i)
        assert record["state"] == "finished" and "error" not in record["status_info"], record


def _withdrawing(make_site, client, tmp_path):
    site = make_site()
    driver = Listed(tmp_path / "q")
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=driver)
    bj = create_batch_job(client, site.site_id)["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": 4242,
                                        "status_info": {WITHDRAW_IF_QUEUED: "elastic"}}])
    driver.listed = {4242: BatchJobState.queued}
    return driver, module, bj


def test_a_withdrawals_delete_error_is_removed_once_the_delete_goes_through(make_site, client, tmp_path, caplog):
    driver, module, bj = _withdrawing(make_site, client, tmp_path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "queued"
    assert record["status_info"]["error"].startswith("withdrawal: delete failed: local scheduler could not delete job 4242")
    assert len(_delete_lines(caplog)) == 1, _delete_lines(caplog)  # not a WARNING every cycle

    driver.refusing = False
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "pending_deletion" and "error" not in record["status_info"], record["status_info"]
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished" and "error" not in record["status_info"], record["status_info"]


def test_a_withdrawals_delete_error_is_removed_once_the_job_started(make_site, client, tmp_path):
    driver, module, bj = _withdrawing(make_site, client, tmp_path)
    module.run_cycle()
    assert batch_job(client, bj)["status_info"]["error"].startswith("withdrawal: delete failed: ")
    driver.listed[4242] = BatchJobState.running  # it started: the withdrawal is dropped
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "running" and WITHDRAW_IF_QUEUED not in record["status_info"]
    assert "error" not in record["status_info"], record["status_info"]


def test_a_withdrawals_delete_error_is_removed_when_the_job_left_the_queue(make_site, client, tmp_path):
    driver, module, bj = _withdrawing(make_site, client, tmp_path)
    module.run_cycle()
    driver.listed.clear()  # it was deleted by hand before a delete of ours went through
    driver.history[4242] = JobHistory(scheduler_id=4242, state=BatchJobState.finished, native_state="CANCELLED")
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished" and "error" not in record["status_info"], record["status_info"]
