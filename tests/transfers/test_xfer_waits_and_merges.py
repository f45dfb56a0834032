"""Which items wait for an earlier transfer writing the same destination, and what that waiting
costs: the ``transfers`` module with the scripted backend of test_transfer_module_refusals (no
server; a small in-memory API, the module's clock injected). Found by a review of the first version
of that waiting (repro tests /tmp/r2/tests/transfers/test_r2_*.py):

- Directory (recursive) stage-outs of many jobs into one results directory (a merge) went one job
  per task, one after another (8 jobs: 8 tasks, was 1): directories now merge, as before.
- Waiting items counted as work in hand: a first page full of them was not paged past (5 items of
  their own paths behind 30 to one path started at cycles 23-26, not 4), and their reason named the
  task waited for, so every waiting row was PATCHed every cycle (2,000 rows a cycle).
- A task sent again with its token for the items left of its batch still writes a deleted job's
  file; a re-created job writing that path did not wait for it.
- A cancel failing for a reason retrying may fix was tried every cycle forever, and a batch none of
  whose items is left was sent again every cycle while its location refused.
- Two aliases of one collection were two destinations.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from balsam.transfer import TaskState, TaskStatus, TransferError, TransferLocation
from test_transfer_module_refusals import LOGGER, T0, journal_tokens, setup, stage_in
from transfer_test_utils import journal_a_far_batch_then_delete_its_jobs

#: balsam.site.modules.transfers.MAX_CANCEL_TRIES (written out: the tests fail, not error, before it).
MAX_TRIES = 10


def stage_outs(api, paths: dict[int, str], *, recursive: bool = False) -> None:
    """Items become stage-outs (``out.dat``, or the ``results`` directory) to ``paths`` by item id."""
    for item in api.items.values():
        item.update(direction="out", local_path="results" if recursive else "out.dat", recursive=recursive,
                    remote_path=paths[item["id"]])
    for job in api.jobs.values():
        job["state"] = "POSTPROCESSED"


def finish_all(backend) -> None:
    for tid in list(backend.tasks):
        backend.tasks[tid] = TaskStatus(TaskState.done)


def test_directories_of_many_jobs_merge_in_one_task_and_files_to_one_path_go_one_at_a_time(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 8}, max_concurrent_transfers=5, transfer_batch_size=100)
    stage_outs(api, {i: "/remote/all-results" for i in range(1, 9)}, recursive=True)
    module.run_cycle()
    assert [(alias, len(dests)) for alias, _, dests in backend.calls] == [("far", 8)]
    assert api.states() == {"active": 8}

    api, module, backend, clock = setup(tmp_path / "files", {"far": 3}, max_concurrent_transfers=5)
    stage_outs(api, {1: "/remote/latest.dat", 2: "/remote//latest.dat/", 3: "/remote/own.dat"})
    module.run_cycle()
    assert [dests for _, _, dests in backend.calls] == [["/remote/latest.dat", "/remote/own.dat"]]
    assert api.items[2]["state"] == "pending" and not api.items[2]["transfer_info"].get("attempts")
    assert "same file: /remote//latest.dat/" in api.items[2]["transfer_info"]["reason"]


def test_items_of_their_own_paths_behind_a_page_of_waiting_items_start_at_once(tmp_path: Path) -> None:
    """30 stage-outs to one path (ids 1..30), then 5 to paths of their own; num_items_query_limit 10."""
    api, module, backend, clock = setup(tmp_path, {"far": 35}, max_concurrent_transfers=5, transfer_batch_size=5,
                                        num_items_query_limit=10, retry_backoff_sec=0)
    stage_outs(api, {i: "/remote/latest.dat" if i <= 30 else f"/remote/own-{i}.dat" for i in range(1, 36)})
    first_seen: dict[int, int] = {}
    for cycle in range(1, 40):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
        finish_all(backend)
        first_seen.update({i: cycle for i in range(31, 36) if api.items[i]["task_id"] and i not in first_seen})
        if len(first_seen) == 5:
            break
    # The page of waiting items is paged past (it used to be taken as full of work: cycles 23-26).
    assert len(first_seen) == 5 and max(first_seen.values()) <= 5, first_seen


def test_a_waiting_row_is_patched_once_not_every_cycle(tmp_path: Path) -> None:
    """3,000 stage-outs to one path, draining one per cycle: each waiting row's reason named the task
    before it, a new one every cycle, and all 2,000 rows read were PATCHed every cycle."""
    api, module, backend, clock = setup(tmp_path, {"far": 3000}, max_concurrent_transfers=5,
                                        transfer_batch_size=100, num_items_query_limit=2000, retry_backoff_sec=0)
    stage_outs(api, {i: "/remote/latest.dat" for i in range(1, 3001)})
    rows = []
    for cycle in range(1, 7):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        before = sum(api.patched)
        module.run_cycle()
        rows.append(sum(api.patched) - before)
        finish_all(backend)
    assert [len(dests) for _, _, dests in backend.calls] == [1] * 6  # one at a time
    # After each row's first reason: the item done and the next one submitted, a cycle.
    assert rows[2:] == [2, 2, 2, 2], rows
    assert api.states() == {"done": 5, "active": 1, "pending": 2994}


def test_a_file_of_a_deleted_job_that_a_resent_task_still_writes_holds_back_a_new_item(tmp_path: Path) -> None:
    """Token batch (items 1, 2) journaled, job 1 deleted, the batch sent again with its token: task
    tok-1 runs on for item 2 and still writes job 1's input. Job 1 re-created with the same workdir:
    its new item 3 writes that very path; it went at once, under tok-2, beside tok-1."""
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5, transfer_batch_size=5,
                                        num_items_query_limit=100, retry_backoff_sec=0)
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("submit timed out (may have arrived)", retryable=True)
    module.run_cycle()
    assert journal_tokens(module) == ["tok-1"]
    del backend.refusals["far"]
    del api.items[1], api.jobs[1]
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert api.items[2]["task_id"] == "scripted:tok-1"
    api.jobs[3] = {"id": 3, "workdir": "job1", "state": "READY"}
    api.items[3] = {**stage_in(3, "far"), "remote_path": "/remote/1-v2.dat"}
    clock[0] = T0 + dt.timedelta(seconds=10)
    module.run_cycle()  # tok-1 still active
    assert api.items[3]["state"] == "pending" and "same file" in api.items[3]["transfer_info"]["reason"]
    assert [token for _, token, _ in backend.calls] == ["tok-1", "tok-1"]
    finish_all(backend)
    clock[0] = T0 + dt.timedelta(seconds=15)
    module.run_cycle()  # tok-1 over: item 3 goes
    assert api.items[3]["state"] == "active" and api.items[3]["task_id"] == "scripted:tok-2"


def test_a_cancel_that_keeps_failing_is_tried_with_a_backoff_then_left_to_the_service(
        tmp_path: Path, caplog) -> None:
    """A token batch all of whose jobs are deleted, sent again to find its task, whose cancel keeps
    failing (503): it was tried every cycle forever (200 cycles: 200 cancels, 400 GETs)."""
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5, retry_backoff_sec=60,
                                        retry_backoff_max_sec=600)
    journal_a_far_batch_then_delete_its_jobs(api, module, backend)
    calls = []

    def cancel_task(task_id: str) -> None:
        calls.append(task_id)
        raise TransferError("503 service unavailable", retryable=True)

    backend.cancel_task = cancel_task
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for cycle in range(1, 201):
            clock[0] = T0 + dt.timedelta(minutes=5 * cycle)
            module.run_cycle()
    assert calls == ["tok-1"] * MAX_TRIES
    assert module.tracked_tasks == {} and journal_tokens(module) == []
    left = [r for r in caplog.records if r.levelno == logging.WARNING and "left to its service" in r.getMessage()]
    assert len(left) == 1 and "scripted:tok-1" in left[0].getMessage()


def test_a_batch_none_of_whose_items_is_left_is_not_sent_again_forever(tmp_path: Path, caplog) -> None:
    """Its location refusing for now (502) on every send: sent with its token every cycle forever."""
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5, retry_backoff_sec=60,
                                        retry_backoff_max_sec=600)
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("transfer service unavailable (HTTP 502)", retryable=True)
    module.run_cycle()
    api.items.clear()
    api.jobs.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for cycle in range(1, 201):
            clock[0] = T0 + dt.timedelta(minutes=5 * cycle)
            module.run_cycle()
    assert len(backend.calls) == 1 + MAX_TRIES  # the first send, then MAX_TRIES resends
    assert journal_tokens(module) == []
    dropped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "tok-1" in dropped[0]


def test_a_stale_batch_is_not_said_to_have_items_held_again_when_they_were_deleted(tmp_path: Path, caplog) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5, retry_backoff_sec=0)
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("submit timed out (may have arrived)", retryable=True)
    module.run_cycle()
    backend.refusals["far"] = TransferError("no such collection", retryable=False)
    api.items.clear()
    api.jobs.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        clock[0] = T0 + dt.timedelta(seconds=5)
        module.run_cycle()
    (line,) = [r.getMessage() for r in caplog.records if "stale journaled batch" in r.getMessage()]
    assert "held again" not in line and "none of its items is left" in line
    assert journal_tokens(module) == []


def test_two_aliases_of_one_location_write_one_file(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"dtn": 1, "dtn2": 1}, max_concurrent_transfers=5)
    module.locations["dtn2"] = TransferLocation.parse("dtn2", "scripted://dtn")  # the same endpoint
    stage_outs(api, {1: "/remote/latest.dat", 2: "/remote/latest.dat"})
    module.run_cycle()
    assert [(alias, dests) for alias, _, dests in backend.calls] == [("dtn", ["/remote/latest.dat"])]
    assert api.items[2]["state"] == "pending" and "same file" in api.items[2]["transfer_info"]["reason"]
