"""The ``transfers`` module against a real API server: items that wait without using a try do not
starve the others, and a task whose jobs were deleted is cancelled.

- Waiting items (a Globus location whose user is not logged in, items in their retry backoff)
  filled the one page of ``num_items_query_limit`` items the module read, the filter for due items
  applied after that limit, and newer items of every other location never started. A location
  refusing submissions also took every submission slot of the cycle (its batches came first).
- Deleting a job mid-transfer left its task running: the copy landed anyway.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path

import pytest

import balsam.builtin.local_transfer as local_transfer
from balsam.site.service_client import bulk_patch
from balsam.site.modules.transfers import PENDING_PAGES_PER_CYCLE, TASKS_NAME, TransfersModule, TransfersOptions
from site_test_utils import input_stager, job_rows

SITE_EP = "08925f04-569f-11e7-bef8-22000b9a448b"
DTN_EP = "9d6d994a-6d04-11e5-ba46-22000b92c6ec"
LOCATIONS = {"shared": "local://", "dtn": f"globus://{DTN_EP}"}


def logged_out_module(site, client, tmp_path: Path, **overrides) -> TransfersModule:
    """Locations 'shared' (local://) and 'dtn' (Globus, whose tokens file does not exist)."""
    values = {"transfer_locations": LOCATIONS, "globus_endpoint_id": SITE_EP, "service_period": 1,
              "backend_options": {"globus": {"tokens_file": str(tmp_path / "no-tokens.json")}}, **overrides}
    return TransfersModule(site, TransfersOptions(**values), client)


def state_of(client, job) -> str:
    return job_rows(client, id=[job.id])[0]["state"]


def run_until(module: TransfersModule, predicate, cycles: int) -> int:
    """Run cycles until ``predicate()``; returns how many it took (fails after ``cycles``)."""
    for number in range(1, cycles + 1):
        module.run_cycle()
        if predicate():
            return number
    raise AssertionError(f"not reached in {cycles} cycles")


@pytest.fixture
def site(make_site):
    return make_site(overrides={"transfers": {"transfer_locations": LOCATIONS}})


def test_items_of_a_logged_out_globus_location_do_not_starve_a_local_one(site, client, tmp_path) -> None:
    """The auditor's scenario: 3 older jobs on a Globus location whose user is not logged in ("keep
    waiting until you do"), one newer on local://, num_items_query_limit 3."""
    from balsam.api import Job

    app = input_stager(site.site_id)
    (tmp_path / "a.txt").write_text("a")
    jobs = Job.objects.bulk_create([Job(f"w/{i}", app, transfers={"input": f"dtn:/x/{i}.txt"}) for i in range(3)]
                                   + [Job("ok/0", app, transfers={"input": f"shared:{tmp_path}/a.txt"})])
    module = logged_out_module(site, client, tmp_path, num_items_query_limit=3)
    run_until(module, lambda: state_of(client, jobs[-1]) == "STAGED_IN", cycles=6)
    assert (Path(site.data_path) / "ok/0/input.txt").read_text() == "a"
    waiting = client.get("/transfers/", params={"job_id": [j.id for j in jobs[:3]]})["results"]
    assert {i["state"] for i in waiting} == {"pending"}
    assert all("not logged in to Globus" in i["transfer_info"]["reason"] for i in waiting)
    assert not any(i["transfer_info"].get("attempts") for i in waiting)  # waiting uses no try
    module.close()


def test_a_logged_out_location_takes_no_slot_from_the_others(site, client, tmp_path) -> None:
    """Its batches came first (the largest group) and took every slot of the cycle, each failing the
    same way; now the first failure makes its other batches wait without a try or a slot."""
    from balsam.api import Job

    app = input_stager(site.site_id)
    (tmp_path / "a.txt").write_text("a")
    jobs = Job.objects.bulk_create([Job(f"w/{i}", app, transfers={"input": f"dtn:/x/{i}.txt"}) for i in range(4)]
                                   + [Job("ok/0", app, transfers={"input": f"shared:{tmp_path}/a.txt"})])
    module = logged_out_module(site, client, tmp_path, transfer_batch_size=1, max_concurrent_transfers=2)
    globus = module.backend("globus")
    tries: list[int] = []
    original = globus.submission_token
    globus.submission_token = lambda: tries.append(1) or original()  # type: ignore[method-assign]
    module.run_cycle()
    assert len(tries) == 1  # one try for the location, not one per batch
    item = client.get("/transfers/", params={"job_id": [jobs[-1].id]})["results"][0]
    assert item["state"] in ("active", "done")  # submitted in the same cycle
    run_until(module, lambda: state_of(client, jobs[-1]) == "STAGED_IN", cycles=20)
    waiting = client.get("/transfers/", params={"job_id": [j.id for j in jobs[:4]]})["results"]
    assert all("not logged in to Globus" in i["transfer_info"]["reason"] for i in waiting)
    module.close()


def test_items_in_their_retry_backoff_do_not_starve_newer_ones(site, client, tmp_path) -> None:
    """More items in their backoff than pages read per cycle, then a new one: the extra pages go on
    from where the last cycle's stopped, so it is reached within a few cycles, each cycle making a
    bounded number of API calls."""
    from balsam.api import Job

    app = input_stager(site.site_id)
    (tmp_path / "a.txt").write_text("a")
    backlog = Job.objects.bulk_create([Job(f"b/{i}", app, transfers={"input": f"shared:{tmp_path}/a.txt"})
                                       for i in range(2 * PENDING_PAGES_PER_CYCLE + 1)])
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    items = client.get("/transfers/", params={"job_id": [j.id for j in backlog]})["results"]
    assert not bulk_patch(client, "/transfers/", [
        {"id": i["id"], "transfer_info": {"attempts": 1, "error": "earlier failure", "retry_after": later}} for i in items])
    (fresh,) = Job.objects.bulk_create([Job("fresh/0", app, transfers={"input": f"shared:{tmp_path}/a.txt"})])
    module = TransfersModule(site, TransfersOptions(transfer_locations={"shared": "local://"}, num_items_query_limit=1),
                             client)
    calls: list[int] = []

    def staged() -> bool:
        calls.append(module.last_cycle_calls)
        return state_of(client, fresh) == "STAGED_IN"

    run_until(module, staged, cycles=8)
    # First page, the extra pages, the workdirs, one PATCH.
    assert max(calls) <= 1 + PENDING_PAGES_PER_CYCLE + 2
    after = client.get("/transfers/", params={"job_id": [j.id for j in backlog]})["results"]
    assert {(i["state"], i["transfer_info"]["retry_after"]) for i in after} == {("pending", later)}  # not tried early
    module.close()


# -- a job deleted mid-transfer ---------------------------------------------------------------------


@pytest.fixture
def gated_copy(monkeypatch):
    """The local backend's copies block inside the copy (before the rename) until released."""
    started, release = threading.Event(), threading.Event()
    real = local_transfer._copy_file

    def copy_file(src, dst, stop):
        started.set()
        release.wait(30)
        return real(src, dst, stop)

    monkeypatch.setattr(local_transfer, "_copy_file", copy_file)
    yield started, release
    release.set()


@pytest.fixture
def cancels(monkeypatch):
    """Every LocalTransfer.cancel_task call (the real one still runs)."""
    calls: list[str] = []
    real = local_transfer.LocalTransfer.cancel_task

    def cancel_task(self, task_id):
        calls.append(task_id)
        return real(self, task_id)

    monkeypatch.setattr(local_transfer.LocalTransfer, "cancel_task", cancel_task)
    return calls


def test_deleting_a_job_mid_copy_cancels_its_task(site, client, tmp_path, gated_copy, cancels, caplog) -> None:
    from balsam.api import Job

    started, release = gated_copy
    app = input_stager(site.site_id)
    (tmp_path / "big.txt").write_text("data")
    (job,) = Job.objects.bulk_create([Job("del/0", app, transfers={"input": f"shared:{tmp_path}/big.txt"})])
    module = TransfersModule(site, TransfersOptions(transfer_locations={"shared": "local://"}), client)
    module.run_cycle()
    task_id = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]["task_id"]
    assert started.wait(30)  # the copy is in progress
    Job.objects.filter(id=[job.id]).delete()
    with caplog.at_level(logging.INFO, logger="balsam.site.modules.transfers"):
        module.run_cycle()
    assert cancels == [task_id.partition(":")[2]]
    assert any("its items were deleted" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    release.set()
    module.run_cycle()
    module.run_cycle()
    assert len(cancels) == 1  # once
    module.close()  # waits for the copy thread
    workdir = Path(site.data_path) / "del/0"
    assert not (workdir / "input.txt").exists()  # the copy in progress was dropped, not renamed into place
    assert not list(workdir.glob(".*balsam-partial*"))
    assert not (Path(site.site_path) / TASKS_NAME).exists()  # nothing left to track


def test_an_agent_restarted_after_the_deletion_still_cancels_the_task(site, client, tmp_path, gated_copy, cancels) -> None:
    """The tasks in flight are kept in the site directory: an agent that stopped before the jobs were
    deleted cancels their task when it starts again."""
    from balsam.api import Job

    started, release = gated_copy
    app = input_stager(site.site_id)
    (tmp_path / "big.txt").write_text("data")
    (job,) = Job.objects.bulk_create([Job("del/1", app, transfers={"input": f"shared:{tmp_path}/big.txt"})])
    options = TransfersOptions(transfer_locations={"shared": "local://"})
    first = TransfersModule(site, options, client)
    first.run_cycle()
    (item,) = client.get("/transfers/", params={"job_id": [job.id]})["results"]
    task_id = item["task_id"]
    # With what each item writes ([dest, recursive]) and where (direction, location): a task that
    # runs on across a restart for other items still knows the files of the items that left it,
    # and holds back items writing them.
    assert json.loads((Path(site.site_path) / TASKS_NAME).read_text()) == {
        task_id: {"item_ids": [item["id"]], "dests": {str(item["id"]): [item["transfer_info"]["dest"], False]},
                  "where": ["in", "shared"]}}
    assert started.wait(30)
    Job.objects.filter(id=[job.id]).delete()  # while no agent runs

    second = TransfersModule(site, options, client)
    second.run_cycle()
    assert cancels == [task_id.partition(":")[2]]  # asked of the new agent's backend
    assert not (Path(site.site_path) / TASKS_NAME).exists()
    second.run_cycle()
    assert len(cancels) == 1
    release.set()
    second.close()
    first.close()


def test_a_task_with_one_job_left_is_not_cancelled(site, client, tmp_path, gated_copy, cancels) -> None:
    """Only a task with no item left is cancelled; one that then finishes is forgotten, not
    cancelled afterwards for the item deleted while it ran."""
    from balsam.api import Job

    started, release = gated_copy
    app = input_stager(site.site_id)
    (tmp_path / "big.txt").write_text("data")
    gone, kept = Job.objects.bulk_create([Job(f"two/{i}", app, transfers={"input": f"shared:{tmp_path}/big.txt"})
                                          for i in range(2)])
    module = TransfersModule(site, TransfersOptions(transfer_locations={"shared": "local://"}), client)
    module.run_cycle()
    assert started.wait(30)
    Job.objects.filter(id=[gone.id]).delete()
    module.run_cycle()
    release.set()
    run_until(module, lambda: state_of(client, kept) == "STAGED_IN", cycles=50)
    module.run_cycle()
    assert cancels == []
    assert module.tracked_tasks == {} and not (Path(site.site_path) / TASKS_NAME).exists()
    module.close()
