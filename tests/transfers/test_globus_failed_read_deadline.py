"""The deadline of a Globus task last read queued, when reading it fails.

Globus runs three tasks per user at once; with ``max_concurrent_transfers`` up to 60 the others wait
in its queue, legitimately for hours, their deadline not counting (it counts from their start). A
read that failed (the poll as a whole, or the one ``task_list`` call of 50 naming the task: a 502)
counted that deadline from the task's *submission*: one transient 502 cancelled every task of the
call queued longer than ``task_timeout_sec``, each losing its place in Globus's queue and a try of
its files. Now a failed read starts the deadline of such a task at the first failed read of an
unbroken row of them, so one 502 costs nothing, an outage longer than ``task_timeout_sec`` still
ends the tasks (the agent never keeps items for ever), and a read that answers ends the row.

globus-sdk's testing fixtures (``responses``) stand in for Globus; the module's clock is injected.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import responses

from globus_test_utils import mocked_responses  # noqa: F401
from test_globus_poll_many_tasks import T0, TRANSFER, filtered_ids, task_list_answer, unread_agent

pytestmark = pytest.mark.usefixtures("mocked_responses")

#: 51 tasks (two task_list calls): the second call alone (t-050) failing, or both (the poll raises).
FAILING = {"one call": {"t-050"}, "whole poll": None}
BAD_GATEWAY = (502, {}, json.dumps({"code": "ExternalError", "message": "Bad Gateway", "request_id": "r"}))


def task_list(mode: list[str], failing: set[str] | None) -> None:
    """Every task ACTIVE and Queued while mode[0] is 'queued'; while it is 'fail', a call naming one
    of ``failing`` (every call: None) answers 502 Bad Gateway."""

    def answer(request):
        ids = filtered_ids(request)
        if mode[0] == "fail" and (failing is None or failing & set(ids)):
            return BAD_GATEWAY
        return task_list_answer(ids, "ACTIVE", files_transferred=0, nice_status="Queued", is_paused=False)

    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=answer, content_type="application/json")


def queued_for_hours(tmp_path: Path, failing: set[str] | None):
    """51 tasks submitted at T0 (task_timeout_sec 1 h), read queued at T0 and still at T0 + 5 h."""
    module, api, clock, cancels = unread_agent(tmp_path, 51)
    mode = ["queued"]
    task_list(mode, failing)
    for hours in (0, 5):
        clock[0] = T0 + dt.timedelta(hours=hours)
        module.run_cycle()
    assert all(item["transfer_info"].get("queued") for item in api.items.values()) and not cancels
    return module, api, clock, cancels, mode


def cycle(module, clock, mode, at: dt.timedelta, what: str) -> None:
    clock[0] = T0 + at
    mode[0] = what
    module.run_cycle()


@pytest.mark.parametrize("failing", FAILING.values(), ids=FAILING.keys())
def test_one_failed_read_does_not_cancel_a_task_queued_for_hours(tmp_path: Path, failing) -> None:
    module, api, clock, cancels, mode = queued_for_hours(tmp_path, failing)
    hit = [51] if failing else list(range(1, 52))
    cycle(module, clock, mode, dt.timedelta(hours=5, minutes=1), "fail")
    assert not cancels, f"one 502 cancelled {len(cancels)} tasks queued for 5 h"
    for i in hit:
        info = api.items[i]["transfer_info"]
        assert api.items[i]["state"] == "active" and "attempts" not in info
        assert info.get("queued") and "started" not in info and "HTTP 502" in info["reason"]
    cycle(module, clock, mode, dt.timedelta(hours=5, minutes=2), "queued")  # read again: queued as before
    assert not cancels and {item["state"] for item in api.items.values()} == {"active"}
    info = api.items[51]["transfer_info"]
    assert info.get("queued") and "started" not in info and "HTTP 502" not in info["reason"]


@pytest.mark.parametrize("failing", FAILING.values(), ids=FAILING.keys())
def test_an_unbroken_outage_longer_than_the_deadline_still_ends_a_queued_task(tmp_path: Path, failing) -> None:
    """Reads failing from T0 + 5 h on (task_timeout_sec 1 h): the task stays until 1 h after the
    first failed read, then is cancelled, a try of its file; a read that answered in between ends
    the row (the next failed read starts a new one)."""
    module, api, clock, cancels, mode = queued_for_hours(tmp_path, failing)
    for minutes in (1, 30, 60):
        cycle(module, clock, mode, dt.timedelta(hours=5, minutes=minutes), "fail")
    assert not cancels and api.items[51]["state"] == "active"
    cycle(module, clock, mode, dt.timedelta(hours=6, minutes=2), "fail")  # 61 min after the first failed read
    assert "t-050/cancel" in {url.split("/task/")[1] for url in cancels}
    info = api.items[51]["transfer_info"]
    assert api.items[51]["state"] == "pending" and info["attempts"] == 1
    assert "did not finish within 3600 s" in info["error"] and "HTTP 502" in info["error"]
    if failing:
        assert len(cancels) == 1 and {api.items[i]["state"] for i in range(1, 51)} == {"active"}


@pytest.mark.parametrize("failing", FAILING.values(), ids=FAILING.keys())
def test_a_read_that_answers_ends_the_row_of_failed_reads(tmp_path: Path, failing) -> None:
    module, api, clock, cancels, mode = queued_for_hours(tmp_path, failing)
    cycle(module, clock, mode, dt.timedelta(hours=5, minutes=1), "fail")
    cycle(module, clock, mode, dt.timedelta(hours=5, minutes=40), "queued")
    for minutes in (45, 60 + 30, 60 + 44):  # 103 min after the first failed read, 59 after the row's
        cycle(module, clock, mode, dt.timedelta(hours=5, minutes=minutes), "fail")
    assert not cancels and {item["state"] for item in api.items.values()} == {"active"}
    cycle(module, clock, mode, dt.timedelta(hours=6, minutes=46), "fail")
    assert "t-050/cancel" in {url.split("/task/")[1] for url in cancels}


def test_a_rate_limit_pause_notes_no_deadline_for_a_task_queued_for_hours(tmp_path: Path, caplog) -> None:
    """The backend held off (a 429's Retry-After from a submission; no read failed): tasks queued
    for 5 h are not said to have run past task_timeout_sec (a WARNING per task, and a promise to
    cancel them, used to say so); a task whose reads failed for over an hour before the pause is."""
    module, api, clock, cancels, mode = queued_for_hours(tmp_path, {"t-050"})
    module._hold_until["globus"] = T0 + dt.timedelta(hours=6)
    with caplog.at_level("WARNING"):
        cycle(module, clock, mode, dt.timedelta(hours=5, minutes=1), "queued")
    assert not [r for r in caplog.records if "ran past" in r.getMessage()] and not cancels
    del module._hold_until["globus"]
    cycle(module, clock, mode, dt.timedelta(hours=5, minutes=2), "fail")  # t-050's row of failed reads begins
    module._hold_until["globus"] = T0 + dt.timedelta(hours=7)
    caplog.clear()
    with caplog.at_level("WARNING"):
        cycle(module, clock, mode, dt.timedelta(hours=6, minutes=3), "fail")
    said = [r.getMessage() for r in caplog.records if "ran past" in r.getMessage()]
    assert len(said) == 1 and "globus:t-050" in said[0] and not cancels


def test_a_failed_call_after_a_failed_poll_is_warned_again(tmp_path: Path, caplog) -> None:
    """One call fails (a WARNING), then the whole poll (a WARNING), then the one call again: a
    WARNING again (it was DEBUG, the tasks still unread after the outage unmentioned)."""
    module, api, clock, cancels = unread_agent(tmp_path, 51)
    failing: list = [{"t-050"}]
    mode = ["fail"]

    def answer(request):
        ids = set(filtered_ids(request))
        if failing[0] is None or failing[0] & ids:
            return BAD_GATEWAY
        return task_list_answer(ids, "ACTIVE", files_transferred=0, nice_status="OK", is_paused=False)

    responses.add_callback(responses.GET, f"{TRANSFER}/task_list", callback=answer, content_type="application/json")
    said = []
    for minutes, failing[0] in ((1, {"t-050"}), (2, None), (3, {"t-050"})):
        caplog.clear()
        with caplog.at_level("WARNING"):
            cycle(module, clock, mode, dt.timedelta(minutes=minutes), "fail")
        said.append([r.getMessage() for r in caplog.records if r.levelno >= 30])
    assert ["1 of 51 tasks not read" in m for m in said[0]] == [True]
    assert ["polling 51 tasks failed" in m for m in said[1]] == [True]
    assert ["1 of 51 tasks not read" in m for m in said[2]] == [True]
