"""A pending item's ``transfer_info.reason`` says what it waits for now (review of the slot-wait
reason, commit 9f0eb95):

- items of a task queued behind the backend's threads, found unknown after an agent restart, came
  back to pending still saying 'waiting for the transfer backend to start its task', and kept it
  while they waited for a slot (beside items saying 'waiting for a free transfer slot');
- items of a location that refused kept its refusal once it had recovered, waiting for a slot;
- an item that failed kept the slot-wait reason in state ``error``; `balsam transfer ls` showed a
  retried item's error first, with a retry time long past, not the slot it waited for;
- the items of a journaled batch (Globus) waiting for a slot showed no reason, and the text said
  'tasks are in flight' when this cycle's refused submissions had taken the slots;
- (round 2) the text that said which of the two took the slots changed at every refused try of a
  location: every item waiting for a slot was PATCHed again, twice per ``retry_backoff_sec``. One
  text now, whatever took them.

No server: the in-memory API and scripted backend of test_transfer_module_refusals."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

from balsam.cli.transfer import _note
from balsam.site.modules.transfers import QUEUED_REASON, SLOT_WAIT, TransfersModule, TransfersOptions, slot_wait_reason
from balsam.transfer import TaskState, TaskStatus, TransferError, build_backend
from test_transfer_module_refusals import T0, Scripted, setup, stage_in
from transfer_test_utils import FakeAPI

IN_FLIGHT = slot_wait_reason(1)


def reason(api: FakeAPI, item_id: int) -> str:
    return str(api.items[item_id]["transfer_info"].get("reason", ""))


def test_items_re_pended_from_a_queued_task_wait_for_a_slot_saying_so(tmp_path: Path) -> None:
    api, module, backend, _ = setup(tmp_path, {"far": 3}, max_concurrent_transfers=1, transfer_batch_size=1)
    module.run_cycle()  # item 1 submitted; 2 and 3 wait for the slot
    (task,) = backend.tasks
    backend.tasks[task] = TaskStatus(TaskState.active, queued=True)
    module.run_cycle()
    assert reason(api, 1) == QUEUED_REASON
    del backend.tasks[task]  # the backend forgot it (an agent restart of local/rsync)
    module.run_cycle()  # item 1 back to pending; item 2 takes the slot
    assert api.items[1]["state"] == "pending"
    assert "reason" not in api.items[1]["transfer_info"]
    module.run_cycle()
    assert api.items[1]["state"] == "pending"
    assert reason(api, 1) == reason(api, 3) == IN_FLIGHT


def test_a_recovered_locations_items_drop_its_refusal_while_they_wait_for_a_slot(tmp_path: Path) -> None:
    api, module, backend, _ = setup(tmp_path, {"far": 3}, max_concurrent_transfers=2, transfer_batch_size=1,
                                    retry_backoff_sec=0)
    backend.refusals["far"] = TransferError("endpoint paused by its administrator", retryable=True)
    module.run_cycle()
    assert {reason(api, i) for i in (1, 2, 3)} == {"endpoint paused by its administrator"}
    del backend.refusals["far"]
    module.run_cycle()  # items 1 and 2 take both slots: item 3 waits for one, not for the refusal
    assert [api.items[i]["state"] for i in (1, 2, 3)] == ["active", "active", "pending"]
    assert reason(api, 3) == slot_wait_reason(2)


def test_a_standing_refusal_stays_on_items_not_tried_since(tmp_path: Path) -> None:
    """The refusal is still what they wait for while the location was not tried again (its batch
    went after the others, which took the slot): not replaced by the slot."""
    api, module, backend, clock = setup(tmp_path, {"far": 1, "near": 2}, max_concurrent_transfers=1,
                                        transfer_batch_size=1, retry_backoff_sec=60)
    backend.refusals["far"] = TransferError("endpoint paused by its administrator", retryable=True)
    module.run_cycle()  # near (2 items) goes first: item 2 submitted; far and item 3 wait for the slot
    (task,) = backend.tasks
    backend.tasks[task] = TaskStatus(TaskState.done)
    module.run_cycle()  # far is tried (refused), item 3 waits
    assert reason(api, 1) == "endpoint paused by its administrator"
    module.run_cycle()  # far is held back (retry_backoff_sec): item 3 takes the slot, far not tried
    assert api.items[3]["state"] == "active"
    assert reason(api, 1) == "endpoint paused by its administrator"


def prefixed(tmp_path: Path, remote: dict[int, str]) -> tuple[FakeAPI, TransfersModule, Scripted]:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    items = [stage_in(i, "far") for i in (1, 2, 3)]
    for i, path in remote.items():
        items[i - 1]["remote_path"] = path
    api = FakeAPI(items, [{"id": i, "workdir": f"job{i}", "state": "READY"} for i in (1, 2, 3)])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"far": "scripted://far/pre"}, max_concurrent_transfers=1,
                                              transfer_batch_size=1, max_attempts=3, retry_backoff_sec=0), api)
    backend = build_backend(Scripted, "scripted")
    module.backends["scripted"] = backend
    module.now = lambda: T0
    return api, module, backend


def test_a_failed_item_drops_the_slot_wait_and_ls_shows_what_a_retried_item_waits_for(tmp_path: Path) -> None:
    api, module, backend = prefixed(tmp_path, {3: "/../etc/passwd"})
    module.run_cycle()  # item 1 submitted; 2 and 3 wait for the slot
    assert reason(api, 3) == IN_FLIGHT
    (task,) = backend.tasks
    backend.tasks[task] = TaskStatus(TaskState.failed, "disk quota exceeded", retryable=True)
    module.run_cycle()  # item 1 fails a try (due at once); item 2 takes the slot
    module.run_cycle()  # item 1 waits for the slot; item 3 still
    one = api.items[1]
    assert one["state"] == "pending" and one["transfer_info"]["error"] == "disk quota exceeded"
    assert _note(one) == f"{IN_FLIGHT} (last try failed: disk quota exceeded)"
    for _ in range(3):  # items 2 and 1 go, one at a time; then item 3, before its submission, fails
        for task in list(backend.tasks):
            backend.tasks[task] = TaskStatus(TaskState.done)
        module.run_cycle()
    three = api.items[3]
    assert three["state"] == "error" and "leads outside the directory /pre" in three["transfer_info"]["error"]
    assert "reason" not in three["transfer_info"]
    assert _note(three) == three["transfer_info"]["error"]
    # An item in its backoff still shows its error and when it goes again.
    waiting = {**one, "state": "pending", "transfer_info": {"error": "disk quota exceeded", "retry_after": "2032-05-01T00:10:00+00:00"}}
    assert _note(waiting) == "disk quota exceeded (retry after 2032-05-01T00:10:00)"


def test_a_journaled_batch_waiting_for_a_slot_says_so(tmp_path: Path) -> None:
    """A dead agent's batch journaled with its token (not recorded), every slot taken by a task in
    flight: it stays in the journal, its item saying why (it showed no reason)."""
    api, module, backend, _ = setup(tmp_path, {"near": 1, "far": 1}, max_concurrent_transfers=1,
                                    transfer_batch_size=1)
    backend.with_tokens = True
    backend.tasks["task-x"] = TaskStatus(TaskState.active)
    data = Path(module.site_config.data_path)
    api.items[1].update(state="active", task_id="scripted:task-x",
                        transfer_info={"submitted": T0.isoformat(), "dest": str(data / "job1" / "input.dat")})
    record = {"token": "tok-old", "alias": "far", "direction": "in",
              "files": [[2, "/remote/2.dat", str(data / "job2" / "input.dat"), False]], "holds": [0]}
    Path(module.journal_path).write_text(json.dumps(record) + "\n")
    module.run_cycle()
    assert backend.calls == []
    assert api.items[2]["state"] == "pending"
    assert reason(api, 2) == IN_FLIGHT
    assert "tok-old" in Path(module.journal_path).read_text()
    backend.tasks["task-x"] = TaskStatus(TaskState.done)
    module.run_cycle()  # sent with its token; the reason goes
    assert backend.calls[0][1] == "tok-old"
    assert api.items[2]["state"] == "active" and "reason" not in api.items[2]["transfer_info"]


def test_slots_taken_by_refused_submissions_are_not_called_tasks_in_flight(tmp_path: Path) -> None:
    api, module, backend, _ = setup(tmp_path, {"far": 1, "near": 1}, max_concurrent_transfers=1,
                                    transfer_batch_size=1)
    backend.refusals["far"] = TransferError("service unavailable (HTTP 503)", retryable=True)
    module.run_cycle()  # far refused (its try took the one slot); near waits, no task in flight
    assert reason(api, 1) == "service unavailable (HTTP 503)"
    assert reason(api, 2) == slot_wait_reason(1)
    assert "refused this cycle" in reason(api, 2) and "tasks are in flight" not in reason(api, 2)


def test_a_slot_waits_reason_is_written_once_while_a_location_refuses_now_and_then(tmp_path: Path) -> None:
    """Review round 2: one location refusing (tried every ``retry_backoff_sec``), another with a
    backlog waiting for slots. The slot-wait text said whether this cycle's refused try had taken a
    slot, so every waiting item was PATCHed again at each refused try and at the cycle after it
    (24,360 rows in 36 cycles for 4,010 items, not 4,720). Rows are counted, not timed."""
    api, module, backend, clock = setup(tmp_path, {"far": 620, "near": 600}, max_concurrent_transfers=5,
                                        num_items_query_limit=5000, transfer_batch_size=10, retry_backoff_sec=30,
                                        max_attempts=3)
    # (far, the larger group, is tried first once its backoff is over.)
    backend.refusals["far"] = TransferError("endpoint paused by its administrator", retryable=True)
    slot_rows: dict[int, int] = {}
    real_patch = api.patch

    def patch(path: str, json: list[dict]) -> list[dict]:
        for row in json:
            if str((row.get("transfer_info") or {}).get("reason", "")).startswith(SLOT_WAIT):
                slot_rows[row["id"]] = slot_rows.get(row["id"], 0) + 1
        return real_patch(path, json)

    api.patch = patch  # type: ignore[method-assign]
    for _ in range(36):
        module.run_cycle()
        active = [task for task, status in backend.tasks.items() if status.state == TaskState.active]
        if active:
            backend.tasks[active[0]] = TaskStatus(TaskState.done)  # one slot frees per cycle
        clock[0] += dt.timedelta(seconds=5)
    tries = sum(1 for call in backend.calls if call[0] == "far")
    assert tries >= 6  # the location was refused again every 30 s
    waited = {i for i in range(621, 1221) if i in slot_rows}
    assert len(waited) > 500  # most of the backlog waited for a slot
    assert max(slot_rows.values()) == 1, {i: n for i, n in slot_rows.items() if n > 1}
    assert reason(api, 1220) == slot_wait_reason(5)  # still waiting
    done = sum(1 for item in api.items.values() if item["state"] == "done")
    # One row per item for its wait, one at its submission, one when done: nothing per cycle.
    assert sum(api.patched) <= len(api.items) + 2 * (done + 50)
