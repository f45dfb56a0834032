"""``transfers.task_timeout_sec`` counts from when a task *starts*, not from its submission.

The ``local`` and ``rsync`` backends run at most ``threads`` tasks at once; the agent submits up to
``max_concurrent_transfers`` (5 by default, above the default 4 threads). A task queued behind a busy
thread used to spend its deadline waiting: it was cancelled ("did not finish within 600 s") and its
items charged a try when its copy had barely started. Backends now poll such a task ``active`` with
``queued`` set, and the module starts the clock at the first poll that finds it running.

No server: a small in-memory API stands in for it (the module's GETs and bulk PATCH). The module's
clock is injected (``module.now``): deadlines pass without waiting. Blocked copies read FIFOs no one
writes to (open() blocks, as on a hung mount) and are released by the test; every real wait is for a
condition, with a generous limit.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from balsam.builtin.local_transfer import ThreadedTasks
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.transfer import TaskState, TaskStatus
from transfer_test_utils import FakeAPI

T0 = dt.datetime(2031, 3, 1, tzinfo=dt.timezone.utc)
WAIT_SEC = 30.0


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_SEC
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"not within {WAIT_SEC:.0f} s: {what}")


@pytest.fixture
def fifos(tmp_path: Path):
    made: list[Path] = []

    def make(name: str) -> Path:
        path = tmp_path / "remote" / name
        path.parent.mkdir(exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for fifo in made:  # meet every open() still blocked on it (EOF), so no copy thread stays behind
        for _ in range(8):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break


def release(fifo: Path, data: bytes) -> None:
    """Write ``data`` into ``fifo`` for the copy blocked opening it (retried until that reader is there)."""

    def attempt() -> bool:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: the copy has not opened it yet
            return False
        os.set_blocking(fd, True)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    wait_for(attempt, f"a copy reading {fifo}")


def stage_in(item_id: int, fifo: Path) -> dict:
    return {"id": item_id, "job_id": item_id, "direction": "in", "location_alias": "shared",
            "remote_path": str(fifo), "local_path": "input.dat", "recursive": False,
            "state": "pending", "task_id": "", "transfer_info": {}}



def unblock(*fifos) -> None:
    """Let any copy still reading one of ``fifos`` finish (a writer opened and closed: end of file)."""
    for fifo in fifos:
        for _ in range(4):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break


def two_tasks_one_thread(tmp_path: Path, api_class, first, second):
    """A module with one local-backend thread and two single-file stage-in tasks (jobs 1 and 2,
    reading ``first`` and ``second``), its clock at T0 (``clock[0]``, moved by the test)."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    api = api_class([stage_in(1, first), stage_in(2, second)],
                    [{"id": 1, "workdir": "job1", "state": "READY"}, {"id": 2, "workdir": "job2", "state": "READY"}])
    options = TransfersOptions(transfer_locations={"shared": "local://"}, backend_options={"local": {"threads": 1}},
                               max_concurrent_transfers=2, transfer_batch_size=1, task_timeout_sec=600,
                               retry_backoff_sec=0, max_attempts=3)
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             options, api)
    clock = [T0]
    module.now = lambda: clock[0]
    return api, module, clock

def test_a_task_queued_behind_a_busy_thread_gets_its_whole_deadline_once_it_starts(tmp_path: Path, fifos) -> None:
    """One thread, two tasks: the second waits behind the first (blocked for 9 of the 10 minutes of
    task_timeout_sec), then starts. It used to be cancelled at the first cycle past 10 minutes after
    its submission (a failed try, "did not finish within 600 s"); now its items show why they wait,
    its deadline counts from its start, and it still has one: 10 minutes after that it is cancelled."""
    first, second = fifos("first.dat"), fifos("second.dat")
    api, module, clock = two_tasks_one_thread(tmp_path, FakeAPI, first, second)

    def at(minutes: float) -> None:
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        module.run_cycle()

    try:
        at(0)
        assert {it["state"] for it in api.items.values()} == {"active"}
        task_a, task_b = api.items[1]["task_id"], api.items[2]["task_id"]
        assert task_a != task_b
        backend = module.backend("local")

        def running(task_id: str) -> bool:  # a worker thread has taken it (read as the backend reads it)
            return backend._tasks._running[task_id.partition(":")[2]].running()

        # The one thread has taken the first task (it blocks opening its FIFO); the second waits.
        wait_for(lambda: running(task_a), "the first task running")
        assert not running(task_b)

        at(5)
        waiting_info = dict(api.items[2]["transfer_info"])
        at(9)
        assert api.items[1]["state"] == api.items[2]["state"] == "active"

        release(first, b"first\n")  # the first task finishes; the thread takes the second (blocked too)
        wait_for(lambda: running(task_b), "the second task running")

        at(11)  # 11 minutes after the submission, 2 since the second task started
        assert api.items[1]["state"] == "done"
        assert (tmp_path / "site" / "data" / "job1" / "input.dat").read_bytes() == b"first\n"
        second_item = api.items[2]
        assert second_item["state"] == "active" and second_item["task_id"] == task_b, (
            f"a task that waited for a thread was cancelled as it started: {second_item['transfer_info']}")
        assert "attempts" not in second_item["transfer_info"]
        # While it waited its items said why, and no deadline ran; its start is recorded.
        assert waiting_info.get("queued") is True
        assert "waiting for the transfer backend" in waiting_info.get("reason", "")
        info = second_item["transfer_info"]
        assert info["started"] == (T0 + dt.timedelta(minutes=11)).isoformat()
        assert "queued" not in info and "reason" not in info

        at(20)
        assert api.items[2]["state"] == "active" and api.items[2]["task_id"] == task_b
        # Its own deadline still applies: 10 minutes after its start it is cancelled, a failed try.
        at(21.02)
        failed = api.items[2]
        assert failed["state"] == "pending" and failed["transfer_info"]["attempts"] == 1
        assert "did not finish within 600 s" in failed["transfer_info"]["error"]
        assert not {"queued", "started"} & failed["transfer_info"].keys()
        at(21.1)  # the retry: a new task, its clock that of its own submission
        retry = api.items[2]
        assert retry["state"] == "active" and retry["task_id"] not in ("", task_b)
        assert retry["transfer_info"]["submitted"] == clock[0].isoformat()
        assert "started" not in retry["transfer_info"]
    finally:
        unblock(first, second)
        module.close()


def test_threaded_tasks_report_queued_until_a_worker_takes_the_task() -> None:
    gate = threading.Event()
    tasks = ThreadedTasks(1, "test-queued", close_wait_sec=5)
    try:
        busy = tasks.start(lambda: (gate.wait(WAIT_SEC), TaskStatus(TaskState.done))[1])
        waiting = tasks.start(lambda: TaskStatus(TaskState.done))
        wait_for(lambda: tasks.statuses([busy])[busy].queued is False, "the first task running")
        status = tasks.statuses([waiting])[waiting]
        assert status.state == TaskState.active and status.queued
        gate.set()
        wait_for(lambda: tasks.statuses([waiting])[waiting].state == TaskState.done, "the second task done")
        assert not tasks.statuses([busy, waiting])[busy].queued
    finally:
        gate.set()
        tasks.close()


def _module(tmp_path: Path) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path), data_path=str(tmp_path / "data"), site_id=1)
    return TransfersModule(site_config, TransfersOptions(transfer_locations={"proj": "local://"},
                                                         task_timeout_sec=600), client=None)


def _item(info: dict) -> dict:
    return {"id": 1, "job_id": 1, "direction": "in", "state": "active", "task_id": "local:t", "transfer_info": info}


def test_where_the_clock_starts(tmp_path: Path) -> None:
    """Queued: no deadline. Started after being seen queued: now (recorded by the poll's update).
    Never seen queued (Globus; a backend that cannot tell): the submission. Poll failed: the start if
    known; for a task last seen queued, the first failed read of the unbroken row of them (one
    failed read must not end a task queued for longer than its deadline, and an unreachable backend
    must not keep its items for ever); else the submission."""
    start = TransfersModule._clock_start
    submitted = T0.isoformat()
    later = T0 + dt.timedelta(hours=2)
    queued, running = TaskStatus(TaskState.active, queued=True), TaskStatus(TaskState.active)
    assert start(queued, [_item({"submitted": submitted})], later, True) is None
    assert start(running, [_item({"submitted": submitted})], later, True) == T0
    assert start(running, [_item({"submitted": submitted, "queued": True})], later, True) == later
    started = (T0 + dt.timedelta(hours=1)).isoformat()
    assert start(running, [_item({"submitted": submitted, "started": started})], later, True) == T0 + dt.timedelta(hours=1)
    assert start(running, [_item({"submitted": submitted})], later, False) == T0
    failing = T0 + dt.timedelta(minutes=90)
    assert start(running, [_item({"submitted": submitted, "queued": True})], later, False,
                 failing_since=failing) == failing
    assert start(running, [_item({"submitted": submitted, "queued": True})], later, False) is None
    assert start(running, [_item({"submitted": submitted, "started": started})], later, False,
                 failing_since=failing) == T0 + dt.timedelta(hours=1)
    assert start(running, [_item({})], later, True) is None

    # The poll's update records the start once, and the reason of the wait goes with the mark.
    module = _module(tmp_path)
    item = _item({"submitted": submitted, "queued": True, "reason": "waiting for the transfer backend ..."})
    updates: dict = {}
    module._apply_status("local:t", running, [item], updates, later)
    assert updates[1]["transfer_info"] == {"submitted": submitted, "started": later.isoformat()}
    # A poll that fails long after its submission, a task last seen queued: its deadline counts
    # from that first failed read (it used to count from the submission: one failed read ended a
    # task queued for longer than task_timeout_sec), and ends it once the reads keep failing.
    queued_items = [_item({"submitted": submitted, "queued": True})]
    assert module._not_read(None, "local:t", "cannot poll", queued_items, {}, later) == 1
    assert module._not_read(None, "local:t", "cannot poll", queued_items, {}, later + dt.timedelta(minutes=10)) == 1
    assert module._unread_since == {"local:t": later}
    assert module._not_read(None, "local:t", "cannot poll", queued_items, {}, later + dt.timedelta(minutes=11)) == 0
    assert module._check_deadline(None, "local:t", queued, [_item({"submitted": submitted, "queued": True})],
                                  later).state == TaskState.active


class FlakyAPI(FakeAPI):
    """FakeAPI whose PATCH fails as an outage while ``down`` (the GETs still answer)."""

    down = False

    def patch(self, path: str, json: list[dict]) -> list[dict]:
        if self.down:
            raise ConnectionError("the API is down")
        return super().patch(path, json)


def test_the_deadline_does_not_restart_while_the_patch_recording_the_start_fails(tmp_path: Path, fifos) -> None:
    """The PATCH that records ``transfer_info.started`` failed (API down): the items still said
    ``queued``, and each cycle took the task as just started, its deadline starting again every
    cycle for as long as the API was down. The module now remembers the start: the record written
    when the API is back is the first poll's, and the deadline runs from it."""
    first, second = fifos("first.dat"), fifos("second.dat")
    api, module, clock = two_tasks_one_thread(tmp_path, FlakyAPI, first, second)

    def at(minutes: float) -> None:
        clock[0] = T0 + dt.timedelta(minutes=minutes)
        if api.down:
            with pytest.raises(ConnectionError):
                module.run_cycle()
        else:
            module.run_cycle()

    try:
        at(0)
        task_a, task_b = api.items[1]["task_id"], api.items[2]["task_id"]
        backend = module.backend("local")

        def running(task_id: str) -> bool:
            return backend._tasks._running[task_id.partition(":")[2]].running()

        wait_for(lambda: running(task_a), "the first task running")
        at(5)
        assert api.items[2]["transfer_info"].get("queued") is True
        release(first, b"first\n")
        wait_for(lambda: running(task_b), "the second task running")

        api.down = True
        for minute in (11, 14, 18):  # first found started at 11; none of these cycles' updates arrive
            at(minute)
        assert api.items[2]["transfer_info"].get("queued") is True and "started" not in api.items[2]["transfer_info"]
        api.down = False
        at(19)  # the API is back: the start recorded is that of the first poll that found it running
        info = api.items[2]["transfer_info"]
        assert info.get("started") == (T0 + dt.timedelta(minutes=11)).isoformat(), info
        assert api.items[2]["state"] == "active" and api.items[2]["task_id"] == task_b
        at(21.02)  # 10 minutes after its start (not after the API came back): cancelled, a failed try
        failed = api.items[2]
        assert failed["state"] == "pending" and failed["transfer_info"].get("attempts") == 1, failed
        assert "did not finish within 600 s" in failed["transfer_info"]["error"]
        at(21.1)  # its retry: a new task
        assert api.items[2]["task_id"] not in ("", task_b)
        assert task_b not in module._task_started  # forgotten once the task left
    finally:
        unblock(first, second)
        module.close()


def test_a_remembered_start_counts_when_the_items_lack_it(tmp_path: Path) -> None:
    """The first poll finding a queued task started remembers when; a later poll whose items still
    say ``queued`` (that update lost) counts from then, not from its own time."""
    start = TransfersModule._clock_start
    remembered: dict = {}
    running = TaskStatus(TaskState.active)
    items = [_item({"submitted": T0.isoformat(), "queued": True})]
    first, later = T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=2)
    assert start(running, items, first, True, task_id="local:t", remembered=remembered) == first
    assert start(running, items, later, True, task_id="local:t", remembered=remembered) == first
    assert start(running, items, later, False, task_id="local:t", remembered=remembered) == first
    # The items' record wins once it is there.
    recorded = [_item({"submitted": T0.isoformat(), "started": later.isoformat()})]
    assert start(running, recorded, later, True, task_id="local:t", remembered=remembered) == later
