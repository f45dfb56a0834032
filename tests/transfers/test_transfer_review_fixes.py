"""Review of the Globus-at-scale transfer changes: what each fix here guards against.

1. The Globus backend aged the tasks it remembers by counting polls: the agent's poll after each
   deadline cancel (one task) counted as much as a cycle's poll, so 3 cancels in one cycle forgot
   the other in-flight tasks' file lists; a later partial failure of one of them failed every file
   ("not known after an agent restart").
2. A location refused once was sorted last for as long as no submission of it succeeded: while
   other locations kept the slots full it was not tried again (400 items waited for 300 others).
3. The poll after a deadline cancel was taken only when ``done``: a ``failed`` answer lost the
   backend's message (now kept; it costs a try, see test_transfer_review_s3.py).
4. One failed task whose delivered files could not be listed (503) failed the whole poll, and every
   poll re-read each finished task's events and files until the bulk PATCH got through.
5. Delivered files were matched by exact path: a ``/~/`` destination Globus reported resolved
   matched nothing and the task failed as a whole, silently.
6. ``http_retries`` above 10 (valid before the bound) stopped an upgraded agent at its start.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import globus_sdk
import pytest

from balsam.states import TransferDirection
from balsam.transfer import TaskState, TaskStatus, TransferError, TransferFile, TransferLocation, build_backend
from balsam_transfer_globus import backend as globus_backend
from balsam_transfer_globus.backend import GlobusTransfer
from test_transfer_module_refusals import T0, setup

SITE_EP = "11111111-1111-1111-1111-111111111111"
REMOTE_EP = "22222222-2222-2222-2222-222222222222"
LOCATION = TransferLocation.parse("aps", f"globus://{REMOTE_EP}")


class _Pages:
    def __init__(self, client: "FakeGlobus") -> None:
        self.client = client

    def _rows(self, kind: str, task_id: str) -> Any:
        self.client.calls.append((kind, task_id))
        fault = self.client.faults.get((kind, task_id))
        if fault is not None:
            raise fault
        rows = self.client.rows.get((kind, task_id), [])
        return type("Paged", (), {"items": staticmethod(lambda: iter(rows))})()

    def task_successful_transfers(self, task_id: str) -> Any:
        return self._rows("successful", task_id)

    def task_skipped_errors(self, task_id: str) -> Any:
        return self._rows("skipped", task_id)


class FakeGlobus:
    """The TransferClient calls the backend makes, answered from ``docs`` (task documents by id) and
    ``rows`` ({(kind, task id): rows}); ``faults`` raise instead; every call is in ``calls``."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.rows: dict[tuple[str, str], list[dict]] = {}
        self.faults: dict[tuple[str, str], Exception] = {}
        self.calls: list[tuple[str, str]] = []
        self.paginated = _Pages(self)
        self.submitted = 0

    def submit_transfer(self, data: Any) -> dict:
        self.submitted += 1
        task_id = f"t{self.submitted}"
        self.docs[task_id] = {"task_id": task_id, "status": "ACTIVE", "nice_status": "OK", "label": data["label"]}
        return {"task_id": task_id}

    def task_list(self, filter: dict, limit: int) -> dict:
        self.calls.append(("task_list", ",".join(filter["task_id"])))
        return {"DATA": [dict(self.docs[t]) for t in filter["task_id"] if t in self.docs]}

    def task_event_list(self, task_id: str, **kwargs: Any) -> list:
        self.calls.append(("events", task_id))
        fault = self.faults.get(("events", task_id))
        if fault is not None:
            raise fault
        return [{"code": "PERMISSION_DENIED", "description": "denied", "details": ""}]

    def operation_ls(self, collection: str, path: str, **kwargs: Any) -> dict:
        self.calls.append(("ls", collection))
        return {"DATA_TYPE": "file_list", "path": path, "absolute_path": "/home/me/", "DATA": []}

    def cancel_task(self, task_id: str) -> dict:
        self.calls.append(("cancel", task_id))
        self.docs[task_id].update(status="FAILED", fatal_error={"code": "CANCELED", "description": "canceled"})
        return {"code": "Canceled"}


def globus(tmp_path: Path, **options: Any) -> tuple[GlobusTransfer, FakeGlobus]:
    fake = FakeGlobus()
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, **options},
                            site_path=str(tmp_path / "site"))
    backend._client = fake  # type: ignore[assignment]
    return backend, fake


def submit(backend: GlobusTransfer, tmp_path: Path, names: list[str]) -> tuple[str, list[str]]:
    dests = [str(tmp_path / "site" / "data" / "job" / name) for name in names]
    files = [TransferFile(f"/remote/{name}", dest) for name, dest in zip(names, dests)]
    return backend.submit(LOCATION, TransferDirection.stage_in, files), dests


def partly_failed(fake: FakeGlobus, task_id: str, delivered: list[str], total: int, **extra: Any) -> None:
    fake.docs[task_id].update(status="FAILED", files=total, files_transferred=len(delivered),
                              fatal_error={"code": "PERMISSION_DENIED", "description": "denied"}, **extra)
    fake.rows[("successful", task_id)] = [{"destination_path": path} for path in delivered]


# -- 1: deadline cancels within a cycle do not age the backend's memory ---------------------------------------


def test_three_deadline_cancels_in_a_cycle_keep_the_other_tasks_files(tmp_path: Path) -> None:
    backend, fake = globus(tmp_path)
    tasks = [submit(backend, tmp_path, [f"a{i}.dat", f"b{i}.dat"]) for i in range(5)]
    ids = [tid for tid, _ in tasks]
    backend.poll(ids)  # the cycle's poll of every task in flight
    for tid in ids[:3]:  # three of them past their deadline: a cancel, then the poll after it
        backend.cancel(tid)
        backend.poll([tid])
    tid, dests = tasks[3]
    partly_failed(fake, tid, [dests[0]], 2)
    status = backend.poll(ids[3:])[tid]
    assert status.state == TaskState.done, status
    assert list(status.file_errors) == [dests[1]] and "PERMISSION_DENIED" in status.file_errors[dests[1]]


def test_tasks_no_poll_names_are_forgotten_after_polls_and_time(tmp_path: Path) -> None:
    backend, fake = globus(tmp_path)
    clock = [1000.0]
    backend.clock = lambda: clock[0]
    old, _ = submit(backend, tmp_path, ["a.dat"])
    new, _ = submit(backend, tmp_path, ["b.dat"])
    backend.poll([old, new])
    for _ in range(5):
        backend.poll([new])
    assert old in backend._tasks  # 5 polls, no time: kept
    clock[0] += globus_backend.FORGET_AFTER_SEC
    backend.poll([new])
    assert old not in backend._tasks and new in backend._tasks


# -- 4: one task's unreadable outcome is that task's only; final outcomes are read once -----------------------


def test_an_unreadable_failed_task_does_not_stop_the_others_and_outcomes_are_read_once(tmp_path: Path) -> None:
    backend, fake = globus(tmp_path)
    (one, one_dests), (two, two_dests) = (submit(backend, tmp_path, ["a.dat", "b.dat"]),
                                          submit(backend, tmp_path, ["c.dat", "d.dat"]))
    partly_failed(fake, one, [one_dests[0]], 2, faults=1)
    partly_failed(fake, two, [two_dests[0]], 2, faults=1)
    fake.faults[("successful", two)] = globus_sdk.NetworkError("connection reset", Exception("reset"))
    statuses = backend.poll([one, two])
    assert statuses[one].state == TaskState.done and list(statuses[one].file_errors) == [one_dests[1]]
    assert statuses[two].state == TaskState.active and "cannot be read yet" in statuses[two].reason
    del fake.faults[("successful", two)]
    fake.calls.clear()
    statuses = backend.poll([one, two])  # as when the agent's PATCH failed: both asked again
    assert statuses[two].state == TaskState.done and list(statuses[two].file_errors) == [two_dests[1]]
    assert not [c for c in fake.calls if c[1] == one and c[0] != "task_list"]  # not read again
    fake.calls.clear()
    assert backend.poll([one, two])[two] == statuses[two]
    assert [c[0] for c in fake.calls] == ["task_list"]


# -- 5: delivered files of /~/ destinations --------------------------------------------------------------------


@pytest.mark.parametrize("reported", ["/home/me/balsam-site/data/job/a.dat", "~/balsam-site/data/job/a.dat",
                                      "/~/balsam-site//data/job/a.dat/"])
def test_delivered_files_under_the_home_directory_are_matched(tmp_path: Path, reported: str) -> None:
    backend, fake = globus(tmp_path, endpoint_site_path="/~/balsam-site")
    tid, dests = submit(backend, tmp_path, ["a.dat", "b.dat"])
    partly_failed(fake, tid, [reported], 2)
    status = backend.poll([tid])[tid]
    assert status.state == TaskState.done and list(status.file_errors) == [dests[1]]


def test_delivered_files_matching_nothing_are_said_once(tmp_path: Path, caplog) -> None:
    backend, fake = globus(tmp_path, endpoint_site_path="/~/balsam-site")
    tid, dests = submit(backend, tmp_path, ["a.dat", "b.dat"])
    partly_failed(fake, tid, ["/elsewhere/x.dat"], 2)
    with caplog.at_level(logging.WARNING, logger=globus_backend.__name__):
        for _ in range(2):
            status = backend.poll([tid])[tid]
            assert status.state == TaskState.failed
    lines = [r.getMessage() for r in caplog.records if "none matches a submitted destination" in r.getMessage()]
    assert len(lines) == 1 and "/elsewhere/x.dat" in lines[0]


# -- 6: http_retries above the bound ---------------------------------------------------------------------------


def test_http_retries_above_the_bound_is_used_as_the_bound_with_one_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=globus_backend.__name__):
        backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 20})
    assert backend.options.http_retries == 20
    lines = [r.getMessage() for r in caplog.records if "http_retries" in r.getMessage()]
    assert len(lines) == 1 and "20" in lines[0] and "backend_options.globus.http_retries" in lines[0]
    with pytest.raises(TransferError, match="0 or more"):
        build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": -1})


# -- 2: a location refused once takes its turn again -----------------------------------------------------------


@pytest.mark.parametrize("retryable", [True, False])
def test_a_location_refused_once_is_tried_again_while_others_keep_the_slots(tmp_path: Path, retryable: bool) -> None:
    """far: 80 items, near: 60, batches of 2, 2 slots, every task done within a cycle. far is refused
    once (502, or for good); near alone would keep both slots for 30 cycles. far was tried again only
    once near had drained; now after retry_backoff_sec (60 s: 12 cycles)."""
    api, module, backend, clock = setup(tmp_path, {"far": 80, "near": 60}, transfer_batch_size=2)
    backend.refusals["far"] = TransferError("transfer service unavailable (HTTP 502)", retryable=retryable)
    module.run_cycle()
    del backend.refusals["far"]
    far_at = None
    for cycle in range(1, 20):
        for tid, st in list(backend.tasks.items()):
            if st.state == TaskState.active:
                backend.tasks[tid] = TaskStatus(TaskState.done)
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        before = len(backend.calls)
        module.run_cycle()
        if far_at is None and any(c[0] == "far" for c in backend.calls[before:]):
            far_at = cycle
    assert far_at is not None and far_at <= 13, far_at
    assert "far" not in module.blocked_aliases
    assert api.states("far").get("done", 0) > 0
    sent = [it for it in api.items.values() if it["location_alias"] == "far" and it["state"] != "pending"]
    assert all("502" not in str(it["transfer_info"].get("reason", "")) for it in sent)


# -- 3: the backend's own final answer after a deadline cancel ----------------------------------------------


# (the cases: tests/transfers/test_transfer_review_s3.py, test_a_failed_answer_after_the_agents_cancel_costs_a_try)
