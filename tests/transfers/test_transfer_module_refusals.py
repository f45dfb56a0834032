"""The ``transfers`` agent module when a backend refuses submissions, when a task meets its deadline
not moving, and how much it logs and writes for many items: found with a stateful fake of the
Globus Transfer API, checked here backend-neutrally with a scripted backend.

- One submission refused for good (Globus 409 ActivationRequired, any request-level 4xx) failed
  every item of every batch of that location in one cycle, each on its first try, one ERROR line
  per item, with more submit calls than ``max_concurrent_transfers``.
- While a location refused for a reason retrying may fix (consent required, 502 on submit), the
  journal gained one token batch per cycle and each cycle re-sent all of them; when the refusal
  cleared, all went at once, beyond ``max_concurrent_transfers``.
- A task cancelled at its deadline failed every item with "did not finish within N s" only: the
  reason the agent knew (a fault its service retries, a pause) was lost, and the files the task had
  delivered were failed with the others.
- A failed task logged one line per item; each poll rewrote every in-flight item for its progress.

No server: a small in-memory API stands in for it (the module's GETs and bulk PATCH); the module's
clock is injected (``module.now``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import pytest

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, build_backend
from transfer_test_utils import FakeAPI  # also imported from here by test_globus_faults

T0 = dt.datetime(2032, 5, 1, tzinfo=dt.timezone.utc)
LOGGER = "balsam.site.modules.transfers"
ACTIVATION = "Globus refused the request (HTTP 409 ClientError.ActivationRequired): activate the endpoint"


class Scripted(TransferBackend):
    """A backend whose answers the test sets: refusals by location alias, the status of each task,
    what a cancelled task reports; every submission is recorded in ``calls``."""

    description = "test double"

    def __init__(self, options: Any = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        self.refusals: dict[str, TransferError] = {}
        self.calls: list[tuple[str, Optional[str], list[str]]] = []  # (alias, token, dests)
        self.tasks: dict[str, TaskStatus] = {}
        self.files: dict[str, list[TransferFile]] = {}
        self.cancelled: list[str] = []
        self.after_cancel: Callable[[str], TaskStatus] = lambda tid: TaskStatus(TaskState.failed, "cancelled",
                                                                                 retryable=False)
        self.with_tokens = False
        self.tokens = 0

    def new_submission_token(self) -> Optional[str]:
        if not self.with_tokens:
            return None
        self.tokens += 1
        return f"tok-{self.tokens}"

    def submit_batch(self, location, direction, files: Sequence[TransferFile], token: Optional[str] = None) -> str:
        self.calls.append((location.alias, token, [f.dest for f in files]))
        if location.alias in self.refusals:
            raise self.refusals[location.alias]
        task_id = token or f"task-{len(self.calls)}"  # a token names its task (the service deduplicates)
        self.tasks.setdefault(task_id, TaskStatus(TaskState.active))
        self.files[task_id] = list(files)
        return task_id

    def poll_tasks(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        return {tid: self.tasks[tid] for tid in task_ids if tid in self.tasks}

    def cancel_task(self, task_id: str) -> None:
        self.cancelled.append(task_id)
        self.tasks[task_id] = self.after_cancel(task_id)


def stage_in(item_id: int, alias: str) -> dict:
    return {"id": item_id, "job_id": item_id, "direction": "in", "location_alias": alias,
            "remote_path": f"/remote/{item_id}.dat", "local_path": "input.dat", "recursive": False,
            "state": "pending", "task_id": "", "transfer_info": {}}


def setup(tmp_path: Path, counts: dict[str, int], **options: Any):
    """``counts``: {location alias: stage-in items}; every alias is a location of the scripted backend.
    Returns (api, module, backend, clock): ``clock[0]`` is the module's time, moved by the test."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    items, jobs = [], []
    for alias, count in counts.items():
        for _ in range(count):
            item_id = len(items) + 1
            items.append(stage_in(item_id, alias))
            jobs.append({"id": item_id, "workdir": f"job{item_id}", "state": "READY"})
    api = FakeAPI(items, jobs)
    values = {"max_concurrent_transfers": 2, "transfer_batch_size": 5, "max_attempts": 2, "retry_backoff_sec": 60,
              "task_timeout_sec": 600, **options}
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={a: f"scripted://{a}" for a in counts}, **values), api)
    backend = build_backend(Scripted, "scripted")
    module.backends["scripted"] = backend
    clock = [T0]
    module.now = lambda: clock[0]
    return api, module, backend, clock


def journal_tokens(module: TransfersModule) -> list[str]:
    path = Path(module.journal_path)
    if not path.exists():
        return []
    return [json.loads(line)["token"] for line in path.read_text().splitlines() if "token" in line]


def loud(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# -- a submission refused for good ---------------------------------------------------------------------------


def test_a_refused_submission_uses_one_batchs_tries_per_cycle_not_the_whole_location(tmp_path: Path, caplog) -> None:
    """20 items of a location whose every submission is refused (409 ActivationRequired), batches of
    5, one item of a location that works. The refusal used to fail all 20 at once (their first try,
    their jobs FAILED), after 4 submit calls with max_concurrent_transfers 2, logging 20 ERROR lines."""
    api, module, backend, clock = setup(tmp_path, {"far": 20, "near": 1})
    backend.refusals["far"] = TransferError(ACTIVATION, retryable=False)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        module.run_cycle()
    assert len(backend.calls) == 2  # one refusal of "far", then "near"
    assert api.items[21]["state"] == "active"
    far = [api.items[i] for i in range(1, 21)]
    tried = [it for it in far if it["transfer_info"].get("attempts")]
    assert len(tried) == 5 and {it["state"] for it in tried} == {"pending"}  # a try each, their backoff
    assert all(ACTIVATION in it["transfer_info"]["error"] and it["transfer_info"]["retry_after"] for it in tried)
    waiting = [it for it in far if not it["transfer_info"].get("attempts")]
    assert len(waiting) == 15 and all(ACTIVATION in it["transfer_info"]["reason"] for it in waiting)
    assert api.states("far") == {"pending": 20}
    lines = loud(caplog)
    assert len(lines) == 1 and "refused the submission of 5 files to 'far'" in lines[0] and ACTIVATION in lines[0]

    # Each cycle one more batch uses a try (then those in backoff, again); the jobs fail only once
    # their items used all their tries.
    calls_per_cycle = []
    for cycle in range(1, 60):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        before = len(backend.calls)
        module.run_cycle()
        calls_per_cycle.append(len(backend.calls) - before)
        if api.states("far") == {"error": 20}:
            break
    assert api.states("far") == {"error": 20}
    assert max(calls_per_cycle) == 1
    assert cycle >= 12  # 4 batches x 2 tries, with 60 s of backoff between a batch's two
    assert {it["transfer_info"]["attempts"] for it in far} == {2}


def test_refusing_locations_take_no_more_than_the_slots_and_go_after_working_ones(tmp_path: Path) -> None:
    """Three locations refusing (for now: 502), each bigger than a working one, 2 slots: each refusal
    was a submit call beyond max_concurrent_transfers. A refusal now takes a slot, and a location
    refused last cycle is tried after the others, so the working one is not starved."""
    api, module, backend, clock = setup(tmp_path, {"a": 3, "b": 3, "c": 3, "near": 1}, transfer_batch_size=1)
    for alias in "abc":
        backend.refusals[alias] = TransferError("transfer service unavailable (HTTP 502)", retryable=True)
    per_cycle = []
    for cycle in range(4):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        before = len(backend.calls)
        module.run_cycle()
        per_cycle.append([alias for alias, _, _ in backend.calls[before:]])
    assert all(len(calls) <= 2 for calls in per_cycle), per_cycle
    assert api.items[10]["state"] == "active" and "near" in per_cycle[0] + per_cycle[1]
    # Waiting for a refusal retrying may fix uses no try.
    assert not any(api.items[i]["transfer_info"].get("attempts") for i in range(1, 10))


# -- a refusal retrying may fix, with submission tokens ---------------------------------------------------


def test_a_location_refusing_for_now_keeps_one_journaled_batch_and_then_respects_the_slots(tmp_path: Path) -> None:
    """Consent required on every submission for 10 cycles, then given. The journal used to gain a
    token batch per cycle, each cycle re-sending all of them (1, 2, ... 10 submit calls), and all 10
    went at once when the consent came."""
    api, module, backend, clock = setup(tmp_path, {"far": 30})
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("Globus needs your consent: run `balsam site globus-login`", retryable=True)
    for cycle in range(10):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        before = len(backend.calls)
        module.run_cycle()
        assert len(backend.calls) - before == 1, cycle  # one probe per cycle: the held batch
        assert journal_tokens(module) == ["tok-1"], cycle
    assert backend.tokens == 1  # its token is reused, not a new one per probe
    assert {call[1] for call in backend.calls} == {"tok-1"}
    assert api.states() == {"pending": 30}
    assert not any(it["transfer_info"].get("attempts") for it in api.items.values())

    del backend.refusals["far"]
    clock[0] += dt.timedelta(seconds=5)
    before = len(backend.calls)
    module.run_cycle()
    sent = backend.calls[before:]
    assert len(sent) == 2 and sent[0][1] == "tok-1"  # the held batch first, then one more: 2 slots
    assert api.states() == {"active": 10, "pending": 20}
    assert journal_tokens(module) == []
    clock[0] += dt.timedelta(seconds=5)
    before = len(backend.calls)
    module.run_cycle()  # both tasks still run: no slot
    assert len(backend.calls) == before


# -- the deadline ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fault, files reported after the cancel", "inactive, still settling"])
def test_a_task_cancelled_at_its_deadline_says_why_and_keeps_what_it_delivered(tmp_path: Path, case: str) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2}, transfer_batch_size=2, max_attempts=3)
    module.run_cycle()
    (task_id,) = backend.tasks
    second_dest = backend.files[task_id][1].dest
    if case.startswith("fault"):
        backend.tasks[task_id] = TaskStatus(TaskState.active, reason="Globus keeps retrying: Permission denied "
                                            "(PERMISSION_DENIED, 57 faults so far)")
        # The service reports what the cancelled task did: the first file arrived, the second not.
        backend.after_cancel = lambda tid: TaskStatus(TaskState.done, file_errors={
            second_dest: "not transferred: the task was cancelled"})
        why = "Globus keeps retrying: Permission denied (PERMISSION_DENIED, 57 faults so far)"
    else:
        backend.tasks[task_id] = TaskStatus(TaskState.inactive, "Endpoint activation required")
        backend.after_cancel = lambda tid: backend.tasks[tid]  # the cancel is not done yet
        why = "paused by its service: Endpoint activation required"
    clock[0] = T0 + dt.timedelta(minutes=4)
    module.run_cycle()
    clock[0] = T0 + dt.timedelta(minutes=10, seconds=1)
    module.run_cycle()
    assert backend.cancelled == [task_id]
    first, second = api.items[1], api.items[2]
    deadline = f"transfer task scripted:{task_id} did not finish within 600 s (transfers.task_timeout_sec); cancelled"
    assert second["state"] == "pending" and second["transfer_info"]["attempts"] == 1
    assert second["transfer_info"]["error"].startswith(deadline) and why in second["transfer_info"]["error"]
    if case.startswith("fault"):
        assert first["state"] == "done" and "attempts" not in first["transfer_info"]  # delivered: kept
        assert "not transferred: the task was cancelled" in second["transfer_info"]["error"]
    else:
        assert first["state"] == "pending" and why in first["transfer_info"]["error"]


# -- one line per task, not per item ----------------------------------------------------------------------------


def test_a_failed_task_and_a_task_with_failed_files_log_one_line_each(tmp_path: Path, caplog) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 20}, transfer_batch_size=10)
    module.run_cycle()
    failed, partial = sorted(backend.tasks)
    backend.tasks[failed] = TaskStatus(TaskState.failed, "source endpoint went away", retryable=True)
    dests = [f.dest for f in backend.files[partial]]
    backend.tasks[partial] = TaskStatus(TaskState.done, file_errors={d: f"permission denied: {d}" for d in dests[:3]})
    clock[0] += dt.timedelta(seconds=5)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        module.run_cycle()
    assert api.states() == {"pending": 13, "done": 7}
    lines = loud(caplog)
    assert len(lines) == 2, lines
    failed_line = next(line for line in lines if f"scripted:{failed}" in line)
    assert "10 files failed a try (10 will be retried): source endpoint went away; items 1 (job 1), 2 (job 2), " \
           "3 (job 3) and 7 more" in failed_line
    partial_line = next(line for line in lines if f"scripted:{partial}" in line)
    assert "7 of its 10 items delivered" in partial_line and "3 files failed a try" in partial_line
    # Each item's own line is still there, at DEBUG.
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG and "failed (try 1 of 2" in r.getMessage()]) == 13


# -- progress is not rewritten into every item every cycle -----------------------------------------------------


def test_progress_alone_is_written_at_most_every_minute_a_change_of_reason_at_once(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 4}, transfer_batch_size=4)
    module.run_cycle()
    (task_id,) = backend.tasks
    written = []
    for seconds in range(5, 80, 5):
        clock[0] = T0 + dt.timedelta(seconds=seconds)
        backend.tasks[task_id] = TaskStatus(TaskState.active, info={"files": 4, "files_done": 0, "bytes": seconds})
        before = len(api.patched)
        module.run_cycle()
        written.append(sum(api.patched[before:]))
    # First poll (no figures yet), then once the minute has passed: not all 15 cycles x 4 items.
    assert written == [4] + [0] * 11 + [4] + [0] * 2, written
    assert api.items[1]["transfer_info"]["task"]["bytes"] == 65
    clock[0] += dt.timedelta(seconds=5)
    backend.tasks[task_id] = TaskStatus(TaskState.active, reason="paused in Globus: Paused by administrator",
                                        info={"files": 4, "files_done": 0, "bytes": 85})
    before = len(api.patched)
    module.run_cycle()
    assert sum(api.patched[before:]) == 4  # a new reason is shown at once, with the figures of that poll
    assert api.items[1]["transfer_info"]["reason"] == "paused in Globus: Paused by administrator"
    assert api.items[1]["transfer_info"]["task"]["bytes"] == 85
    backend.tasks[task_id] = TaskStatus(TaskState.done, info={"files": 4, "files_done": 4, "bytes": 90})
    clock[0] += dt.timedelta(seconds=5)
    module.run_cycle()
    assert api.states() == {"done": 4} and api.items[1]["transfer_info"]["task"]["bytes"] == 90
