"""What a task still writes, as the agent knows it after a restart or an upgrade, and the items
waiting for it: the ``transfers`` module with the scripted backend of test_transfer_module_refusals
(no server; a small in-memory API, the module's clock injected). Found by a review of the waiting
for an earlier transfer of the same file (repro tests /tmp/r5/tests/test_r5_repro.py):

- An in-flight tasks file of the agent before the task's location was kept ("where"): its tasks
  held back nothing, and a job re-created with a deleted job's workdir staged in beside an orphaned
  task still writing that file (its cancel failing).
- An item re-attached from a journal task line (the agent died after submitting, before its PATCH)
  had no destination: it wrote nothing as far as the waiting knew, and two tasks wrote one file.
- An item whose blocker ended while no slot was free kept its stale reason, counted as no work in
  hand, and did not say it was ready.
- A failed cancel of a stale task logged an INFO line and a WARNING line for the same event.
- Two spellings of one place (``local://localhost`` and ``local://``, ``rsync://host:22`` and
  ``rsync://host``, an upper-case host, ``rsync:///`` and ``local:///``) were two places.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from balsam.site.modules.transfers import TransfersModule
from balsam.transfer import TaskState, TaskStatus, TransferError, TransferLocation
from test_transfer_module_refusals import LOGGER, T0, setup, stage_in
from transfer_test_utils import journal_a_far_batch_then_delete_its_jobs

#: balsam.site.modules.transfers.SAME_FILE_WAIT (written out: the tests fail, not error, before it).
SAME_FILE = "waiting for an earlier transfer that writes the same file"


def stage_out(item: dict, path: str) -> None:
    item.update(direction="out", local_path="out.dat", recursive=False, remote_path=path)


def restarted(module: TransfersModule, api, backend, clock) -> TransfersModule:
    """A new agent process on the same site (it reads the tasks file and the journal at start)."""
    again = TransfersModule(module.site_config, module.options, api)
    again.backends["scripted"] = backend
    again.now = lambda: clock[0]
    return again


def failing_cancels(backend) -> list[str]:
    tried: list[str] = []

    def cancel_task(task_id: str) -> None:
        tried.append(task_id)
        raise TransferError("503 service unavailable", retryable=True)

    backend.cancel_task = cancel_task
    return tried


def test_a_waiting_item_whose_writer_ended_while_no_slot_was_free_is_ready_again(tmp_path: Path) -> None:
    """Items 1 and 2 stage out to /remote/P.dat, 3-5 to their own paths, 2 slots. Item 1's task
    ends while another location's bigger group takes the one free slot: item 2 kept saying it
    waited for an earlier transfer (none was running) and counted as no work in hand."""
    api, module, backend, clock = setup(tmp_path, {"far": 2, "near": 3}, max_concurrent_transfers=2,
                                        transfer_batch_size=10, retry_backoff_sec=0)
    stage_out(api.items[1], "/remote/P.dat")
    stage_out(api.items[2], "/remote/P.dat")
    for i in (3, 4, 5):
        stage_out(api.items[i], f"/remote/own-{i}.dat")
    for job in api.jobs.values():
        job["state"] = "POSTPROCESSED"
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    assert api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    backend.tasks[api.items[1]["task_id"].partition(":")[2]] = TaskStatus(TaskState.done)
    for i in (6, 7):  # more work for "near": its bigger group takes the one free slot
        api.jobs[i] = {"id": i, "workdir": f"job{i}", "state": "POSTPROCESSED"}
        api.items[i] = stage_in(i, "near")
        stage_out(api.items[i], f"/remote/own-{i}.dat")
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert api.items[1]["state"] == "done" and api.items[2]["state"] == "pending"
    assert "reason" not in api.items[2]["transfer_info"]
    assert module._usable(api.items[2], clock[0])
    # Its next free slot: it goes (the near tasks end).
    for tid in list(backend.tasks):
        backend.tasks[tid] = TaskStatus(TaskState.done)
    clock[0] = T0 + dt.timedelta(seconds=10)
    module.run_cycle()
    assert api.items[2]["state"] == "active"


def test_a_waiting_stage_in_whose_writer_ended_while_no_slot_was_free_is_ready_again(tmp_path: Path) -> None:
    """The same with stage-ins: jobs 1 and 2 share a workdir (their input.dat is one file); the
    waiting item's file is found each cycle from its job's workdir (cached, or read again once)."""
    api, module, backend, clock = setup(tmp_path, {"far": 2, "near": 3}, max_concurrent_transfers=2,
                                        transfer_batch_size=10, retry_backoff_sec=0)
    api.jobs[2]["workdir"] = "job1"
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    assert api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    backend.tasks[api.items[1]["task_id"].partition(":")[2]] = TaskStatus(TaskState.done)
    for i in (6, 7):
        api.jobs[i] = {"id": i, "workdir": f"job{i}", "state": "READY"}
        api.items[i] = stage_in(i, "near")
    module.workdirs.clear()  # as after a restart: read again
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert api.items[1]["state"] == "done" and api.items[2]["state"] == "pending"
    assert "reason" not in api.items[2]["transfer_info"] and module._usable(api.items[2], clock[0])


def test_the_items_behind_a_ready_one_keep_waiting_with_their_row_unchanged(tmp_path: Path) -> None:
    """Three items to one path, one slot taken by another location: once the first one's task
    ended, the second is ready (its reason cleared), the third still waits behind it (no PATCH)."""
    api, module, backend, clock = setup(tmp_path, {"far": 3, "near": 4}, max_concurrent_transfers=2,
                                        transfer_batch_size=10, retry_backoff_sec=0)
    for i in (1, 2, 3):
        stage_out(api.items[i], "/remote/P.dat")
    for i in (4, 5, 6, 7):
        stage_out(api.items[i], f"/remote/own-{i}.dat")
    for job in api.jobs.values():
        job["state"] = "POSTPROCESSED"
    module.run_cycle()
    assert [api.items[i]["state"] for i in (1, 2, 3)] == ["active", "pending", "pending"]
    backend.tasks[api.items[1]["task_id"].partition(":")[2]] = TaskStatus(TaskState.done)
    for i in (8, 9, 10):  # the bigger group: it takes the one free slot
        api.jobs[i] = {"id": i, "workdir": f"job{i}", "state": "POSTPROCESSED"}
        api.items[i] = stage_in(i, "near")
        stage_out(api.items[i], f"/remote/own-{i}.dat")
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert api.items[2]["state"] == "pending" and api.items[8]["state"] == "active"
    assert "reason" not in api.items[2]["transfer_info"]
    assert api.items[3]["transfer_info"]["reason"].startswith(SAME_FILE)
    before = len(api.patched)
    clock[0] = T0 + dt.timedelta(seconds=10)
    module.run_cycle()  # no slot yet, nothing changed: nothing written
    assert len(api.patched) == before


def orphan(module, api, backend, entry_where, dest: str) -> None:
    """An in-flight tasks file holding ``scripted:old-task`` writing ``dest`` for item 1, whose job
    is deleted meanwhile; job 2 re-created with job 1's workdir; the task still runs and its
    cancel fails for now."""
    entry = {"item_ids": [1], "dests": {"1": [dest, False]}}
    if entry_where is not None:
        entry["where"] = entry_where
    Path(module.tasks_path).write_text(json.dumps({"scripted:old-task": entry}))
    del api.items[1], api.jobs[1]
    api.jobs[2]["workdir"] = "job1"
    backend.tasks["old-task"] = TaskStatus(TaskState.active)


@pytest.mark.parametrize("where", [["in", "far"], None], ids=["file-with-where", "file-without-where"])
def test_a_task_of_a_tasks_file_without_its_location_still_holds_back_its_files(
        tmp_path: Path, caplog, where) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5)
    orphan(module, api, backend, where, str(Path(module.site_config.data_path) / "job1" / "input.dat"))
    tried = failing_cancels(backend)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = restarted(module, api, backend, clock)
        again.run_cycle()
    assert tried == ["old-task"] and "scripted:old-task" in again.tracked_tasks
    assert api.items[2]["state"] == "pending" and api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    assert not any(c[0] == "far" for c in backend.calls)
    # Without "where" its location stays unknown (its paths hold back any item writing them), and
    # no guessed location is written back with the task: a stage-out may write inside the data path.
    assert again._task_where.get("scripted:old-task") == (("in", "far") if where else None)
    saved = json.loads(Path(again.tasks_path).read_text())["scripted:old-task"]
    assert saved.get("where") == where


def test_an_old_stage_out_task_writing_inside_the_data_path_holds_back_a_stage_out_to_that_file(
        tmp_path: Path) -> None:
    """An old tasks file (no "where") whose task is a stage-out to a path inside the site's data
    path (a location pointing there): it was taken for a stage-in, and a new stage-out of another
    location to that file ran beside it (review repro /tmp/r7/rt/transfers/test_r7_f1_*)."""
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5)
    target = str(Path(module.site_config.data_path) / "collected" / "latest.dat")
    orphan(module, api, backend, None, target)
    stage_out(api.items[2], target)
    api.jobs[2]["state"] = "POSTPROCESSED"
    failing_cancels(backend)
    again = restarted(module, api, backend, clock)
    again.run_cycle()
    assert "scripted:old-task" in again.tracked_tasks
    assert api.items[2]["state"] == "pending" and api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    assert "where" not in json.loads(Path(again.tasks_path).read_text())["scripted:old-task"]


def test_a_task_of_unknown_location_holds_back_any_item_writing_one_of_its_paths(tmp_path: Path, caplog) -> None:
    """An old tasks file whose task writes /remote/shared.dat (not inside the site: a stage-out of
    some location). A stage-out of another location to that path waits; one to another path goes.
    Said once, at start."""
    api, module, backend, clock = setup(tmp_path, {"far": 2, "near": 1}, max_concurrent_transfers=5)
    orphan(module, api, backend, None, "/remote//shared.dat")
    stage_out(api.items[2], "/remote/shared.dat")
    stage_out(api.items[3], "/remote/other.dat")
    for job in api.jobs.values():
        job["state"] = "POSTPROCESSED"
    failing_cancels(backend)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = restarted(module, api, backend, clock)
        for cycle in range(3):
            clock[0] = T0 + dt.timedelta(minutes=5 * cycle)
            again.run_cycle()
    assert api.items[2]["state"] == "pending" and api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    assert api.items[3]["state"] == "active"
    said = [r.getMessage() for r in caplog.records if "without their location" in r.getMessage()]
    assert len(said) == 1 and "1 tasks" in said[0]


def test_an_item_reattached_from_a_journal_line_writes_its_file(tmp_path: Path) -> None:
    """The agent died after submitting item 1 (task line journaled), before its PATCH. Job 2 reuses
    job 1's workdir: its stage-in writes the same file and must wait for task-0."""
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5)
    api.jobs[2]["workdir"] = "job1"
    api.items[2]["remote_path"] = "/remote/1-v2.dat"
    backend.tasks["task-0"] = TaskStatus(TaskState.active)
    Path(module.journal_path).write_text(json.dumps({"task_id": "scripted:task-0", "item_ids": [1],
                                                     "holds": [0]}) + "\n")
    again = restarted(module, api, backend, clock)
    again.run_cycle()
    dest = str(Path(module.site_config.data_path) / "job1" / "input.dat")
    assert api.items[1]["task_id"] == "scripted:task-0"
    assert api.items[1]["transfer_info"]["dest"] == dest
    assert api.items[2]["state"] == "pending" and api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
    assert backend.calls == []
    # Its destination known, a failed file of its task is its own (not "unknown": sent again).
    backend.tasks["task-0"] = TaskStatus(TaskState.done, file_errors={dest: "FILE_NOT_FOUND"})
    clock[0] = T0 + dt.timedelta(seconds=5)
    again.run_cycle()
    assert api.items[1]["transfer_info"]["attempts"] == 1 and "FILE_NOT_FOUND" in api.items[1]["transfer_info"]["error"]


def test_one_failed_cancel_is_one_line(tmp_path: Path, caplog) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2}, max_concurrent_transfers=5, retry_backoff_sec=60)
    journal_a_far_batch_then_delete_its_jobs(api, module, backend)
    failing_cancels(backend)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        clock[0] = T0 + dt.timedelta(minutes=5)
        module.run_cycle()
    about = [r for r in caplog.records if r.name == LOGGER and "cancelling" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.WARNING, [r.getMessage() for r in about]
    line = about[0].getMessage()
    assert "none of its items is left" in line and "try 1 of 10" in line and "503" in line


def test_a_failed_cancel_of_a_task_whose_items_were_deleted_is_one_line(tmp_path: Path, caplog) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 1}, max_concurrent_transfers=5, retry_backoff_sec=60)
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    api.items.clear()
    api.jobs.clear()
    failing_cancels(backend)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        clock[0] = T0 + dt.timedelta(seconds=5)
        module.run_cycle()
    about = [r for r in caplog.records if r.name == LOGGER and "cancelling" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.WARNING, [r.getMessage() for r in about]
    assert "its items were deleted (with their jobs); cancelling it failed (try 1 of 10" in about[0].getMessage()


#: (first, second[, path]): the path both write, "/f.dat" unless given. An ssh user name names no
#: other file for an absolute path (one file on that host, whoever writes it), only for a ~/ path.
SAME_PLACE = [("local://localhost/data", "local:///data"), ("local://LocalHost/data", "local:///data"),
              ("rsync://host:22/d", "rsync://host/d"), ("rsync://Host/d", "rsync://host/d"),
              ("rsync://me@HOST:22/d", "rsync://me@host/d"), ("rsync:///d", "local:///d"),
              ("rsync://localhost/d", "local:///d"), ("rsync://me@localhost:22/d", "local:///d"),
              ("rsync://me@host/d", "rsync://you@host/d"), ("rsync://alice@host/d", "rsync://bob@host/d"),
              ("rsync://host/d", "rsync://me@host/d"), ("rsync://bob@localhost/d", "rsync://alice@localhost/d"),
              ("rsync://me@host:2222/d", "rsync://you@host:2222/d"),
              ("rsync://me@host/~", "rsync://me@HOST:22/~"), ("rsync://me@host", "rsync://me@host:22", "~/f.dat")]
OTHER_PLACES = [("rsync://host:2222/d", "rsync://host/d"), ("rsync://a/d", "rsync://b/d"),
                ("rsync://me@host/~", "rsync://you@host/~"), ("rsync://me@host", "rsync://you@host", "/~/f.dat"),
                ("rsync://host", "rsync://you@host", "~/f.dat"), ("rsync://me@localhost/~", "local:///~"),
                ("rsync://localhost:2222/d", "local:///d"),
                ("rsync://host/d", "local:///d"), ("rsync://host/d", "scripted://host/d")]


@pytest.mark.parametrize("first, second, path, same", [(*p[:2], (p[2:] or ["/f.dat"])[0], True) for p in SAME_PLACE]
                         + [(*p[:2], (p[2:] or ["/f.dat"])[0], False) for p in OTHER_PLACES])
def test_spellings_of_one_place_write_one_file(tmp_path: Path, first: str, second: str, path: str,
                                               same: bool) -> None:
    api, module, backend, clock = setup(tmp_path, {"a": 1})
    module.locations["x1"] = TransferLocation.parse("x1", first)
    module.locations["x2"] = TransferLocation.parse("x2", second)
    keys = [module._file_key("out", alias, path, False) for alias in ("x1", "x2")]
    assert (keys[0] == keys[1]) is same, keys


@pytest.mark.parametrize("first, second", [("rsync://alice@host/d", "rsync://bob@host/d"),
                                           ("rsync://host/d", "rsync://me@host/d")])
def test_stage_outs_of_two_ssh_users_to_one_absolute_file_take_turns(tmp_path: Path, first: str,
                                                                    second: str) -> None:
    """Two aliases of one host differing in the ssh user write one absolute path: one file on that
    host, so the later item waits (they ran at once; review repro /tmp/r7/rt/transfers/test_r7_f5_users.py)."""
    api, module, backend, clock = setup(tmp_path, {"x1": 1, "x2": 1}, max_concurrent_transfers=5)
    module.locations["x1"] = TransferLocation.parse("x1", first)
    module.locations["x2"] = TransferLocation.parse("x2", second)
    module.backends["rsync"] = backend
    for i in (1, 2):
        stage_out(api.items[i], "/shared/results/latest.dat")
    for job in api.jobs.values():
        job["state"] = "POSTPROCESSED"
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    assert api.items[2]["state"] == "pending" and api.items[2]["transfer_info"]["reason"].startswith(SAME_FILE)
