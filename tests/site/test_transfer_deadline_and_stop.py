"""The ``transfers`` module with hung tasks, against a real API server and the real backends:
``transfers.task_timeout_sec`` (a task in flight longer is cancelled and its files fail a try; a
warning at half of it), and an agent stopped while a copy is blocked (its items are copied by the
next agent, none lost, none done, no try used).

The module's clock is injected (``module.now``): deadlines pass without waiting. A blocked source is
a FIFO no one writes to (its open() never returns, like a file on a hung NFS mount); each test opens
it for writing at its end so that the copy thread it blocked ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from pathlib import Path

import pytest

import balsam.builtin.local_transfer as local_transfer
from balsam.options import OptionsError
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from site_test_utils import events, input_stager, job_rows

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def site(make_site):
    return make_site(overrides={"transfers": {"transfer_locations": {"shared": "local://"}}})


@pytest.fixture
def hung_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A FIFO whose open() blocks until the test ends (then it is released: EOF). A copy blocked on
    it holds the module's close() for CLOSE_WAIT_SEC (10 s) before it leaves that copy behind: a
    short wait leaves it behind the same way, without 10 s of every test that closes over one."""
    monkeypatch.setattr(local_transfer, "CLOSE_WAIT_SEC", 0.2, raising=False)
    fifo = tmp_path / "hung.dat"
    os.mkfifo(fifo)
    yield fifo
    # Meet each open() still blocked on it (non-blocking: fails when no reader waits).
    for _ in range(8):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            break


def item_of(client, job) -> dict:
    return client.get("/transfers/", params={"job_id": [job.id]})["results"][0]


def test_a_task_past_task_timeout_sec_is_cancelled_and_fails_a_try(site, client, hung_source, caplog) -> None:
    """No deadline: a copy from a hung mount stayed active for ever (30 cycles: still active, nothing
    logged). Now: a warning once past half of task_timeout_sec, then the task is cancelled and the
    item fails a try; with the tries used up its job goes to FAILED with the reason."""
    from balsam.api import Job

    app = input_stager(site.site_id)
    (job,) = Job.objects.bulk_create([Job("hung/0", app, transfers={"input": f"shared:{hung_source}"})])
    module = TransfersModule(site, TransfersOptions(transfer_locations={"shared": "local://"}, task_timeout_sec=600,
                                                    max_attempts=2, retry_backoff_sec=0), client)
    clock = [T0]
    module.now = lambda: clock[0]
    cancelled: list[str] = []
    real_cancel = module.backend("local").cancel_task
    module.backend("local").cancel_task = lambda task_id: (cancelled.append(task_id), real_cancel(task_id))[1]
    try:
        with caplog.at_level(logging.WARNING, logger="balsam.site.modules.transfers"):
            module.run_cycle()
            first_task = item_of(client, job)["task_id"]
            assert item_of(client, job)["state"] == "active"
            for minutes in (2, 4, 6, 8, 10):  # at 6 and 8 minutes: over half of the 10
                clock[0] = T0 + dt.timedelta(minutes=minutes)
                module.run_cycle()
                assert item_of(client, job)["state"] == "active", minutes
            half = [r.getMessage() for r in caplog.records if "over half of transfers.task_timeout_sec" in r.getMessage()]
            assert len(half) == 1 and first_task in half[0]
            clock[0] = T0 + dt.timedelta(minutes=10, seconds=1)
            module.run_cycle()  # past it: cancelled, a failed try, pending again (no backoff here)
            item = item_of(client, job)
            assert cancelled == [first_task.partition(":")[2]]
            assert item["state"] in ("pending", "active") and item["transfer_info"]["attempts"] == 1
            assert "did not finish within 600 s (transfers.task_timeout_sec)" in item["transfer_info"]["error"]
            assert job_rows(client, id=[job.id])[0]["state"] != "FAILED"
            # The retry: a new task, and its own deadline counted from its own submission.
            module.run_cycle()
            second = item_of(client, job)
            assert second["state"] == "active" and second["task_id"] != first_task
            clock[0] += dt.timedelta(minutes=10, seconds=2)
            module.run_cycle()
    finally:
        module.close()
    item = item_of(client, job)
    assert item["state"] == "error" and item["transfer_info"]["attempts"] == 2
    assert job_rows(client, id=[job.id])[0]["state"] == "FAILED"
    failed = [e for e in events(client, job_id=job.id) if e["to_state"] == "FAILED"]
    assert failed and "transfers.task_timeout_sec" in str(failed[0]["data"])
    assert not (Path(site.data_path) / "hung/0" / "input.txt").exists()


def test_an_agent_stopped_mid_copy_leaves_its_items_to_the_next_agent(site, client, hung_source, monkeypatch) -> None:
    """close() waited for the blocked copy for ever (the agent could not stop). Now it returns; the
    item stays active with its task id, and the next agent finds that id unknown (the crash
    recovery: "unknown to its backend (agent restarted?)") and copies it again, without a failed
    try; nothing was written by the stopped copy."""
    from balsam.api import Job

    monkeypatch.setattr(local_transfer, "CLOSE_WAIT_SEC", 0.2, raising=False)
    app = input_stager(site.site_id)
    (job,) = Job.objects.bulk_create([Job("stop/0", app, transfers={"input": f"shared:{hung_source}"})])
    options = TransfersOptions(transfer_locations={"shared": "local://"}, retry_backoff_sec=0)
    first = TransfersModule(site, options, client)
    first.run_cycle()
    before = item_of(client, job)
    assert before["state"] == "active"
    closer = threading.Thread(target=first.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() waits for a copy that never ends: the agent cannot stop"
    after_stop = item_of(client, job)
    assert after_stop["state"] == "active" and after_stop["task_id"] == before["task_id"]
    assert "attempts" not in after_stop["transfer_info"]

    # The file system answers again, with the file: the next agent copies it.
    os.close(os.open(hung_source, os.O_WRONLY | os.O_NONBLOCK))  # release the stopped copy's open()
    hung_source.unlink()
    hung_source.write_text("the data\n")
    second = TransfersModule(site, options, client)
    try:
        for _ in range(100):
            second.run_cycle()
            if item_of(client, job)["state"] == "done":
                break
    finally:
        second.close()
    item = item_of(client, job)
    assert item["state"] == "done" and "attempts" not in item["transfer_info"]
    assert (Path(site.data_path) / "stop/0" / "input.txt").read_text() == "the data\n"
    assert job_rows(client, id=[job.id])[0]["state"] == "STAGED_IN"


def test_task_timeout_sec_must_be_positive(site, client) -> None:
    with pytest.raises(OptionsError, match="transfers.task_timeout_sec: must be more than 0, got 0"):
        TransfersModule(site, TransfersOptions(task_timeout_sec=0), client)


def test_a_location_alias_that_jobs_cannot_write_is_refused(site, client) -> None:
    with pytest.raises(OptionsError, match=r"transfers.transfer_locations.aps:dtn: bad location alias 'aps:dtn'"):
        TransfersModule(site, TransfersOptions(transfer_locations={"aps:dtn": "local://"}), client)


def test_the_deadline_ends_a_task_whose_backend_can_no_longer_be_built(site, client, hung_source) -> None:
    """A task in flight whose backend became unavailable (its plugin uninstalled or failing to load
    under a new environment) could be neither polled nor cancelled: its items stayed active with
    "cannot poll its task" for ever. Past task_timeout_sec they now fail a try, as a hung task does."""
    from balsam.api import Job
    from balsam.transfer import TransferError

    app = input_stager(site.site_id)
    (job,) = Job.objects.bulk_create([Job("gone/0", app, transfers={"input": f"shared:{hung_source}"})])
    module = TransfersModule(site, TransfersOptions(transfer_locations={"shared": "local://"}, task_timeout_sec=600,
                                                    max_attempts=1, retry_backoff_sec=0), client)
    clock = [T0]
    module.now = lambda: clock[0]
    gone = None
    try:
        module.run_cycle()
        assert item_of(client, job)["state"] == "active"
        gone = module.backends.pop("local")
        module.backend_errors["local"] = TransferError("no transfer backend for protocol 'local': gone", retryable=False)
        clock[0] = T0 + dt.timedelta(minutes=5)
        module.run_cycle()
        assert item_of(client, job)["state"] == "active"  # within the deadline: it may still be copying
        clock[0] = T0 + dt.timedelta(minutes=10, seconds=1)
        module.run_cycle()
    finally:
        module.close()
        if gone is not None:
            gone.close()
    item = item_of(client, job)
    assert item["state"] == "error" and "did not finish within 600 s" in item["transfer_info"]["error"]
    assert job_rows(client, id=[job.id])[0]["state"] == "FAILED"
