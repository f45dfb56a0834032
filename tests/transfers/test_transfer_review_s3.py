"""Review of the quick polls, the paging of in-flight items and the Globus delivered-file matching:
what each fix here guards against.

1. A batch journaled with a submission token (its submission timed out: the service may have
   started it) was dropped from the journal when its items were not read in a cycle (every slot
   taken, in-flight items filling the first page: pending items are then not read at all); its
   files were later sent under a new token, and two tasks could write the same destinations.
2. The quick polls after a submission (0.5, 1, 2, 4 s) ran for every backend: a steady stream of
   Globus tasks (minutes each) kept the module cycling every second or two for ever (items GETs,
   a Globus task_list, a PATCH, a log line each time).
3. The agent's own deadline cancel was told from the backend's verdict by the words of its error
   ("cancelled"): a backend answering "task cancelled on request", not retryable, failed its items
   for good at their first deadline.
4. Globus delivered paths under ``/~/`` were matched by the home prefix most files agreed on; on a
   tie ``max`` picked one, and a file that did not arrive could be counted delivered (its job ran
   without its input).
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin import local_transfer
from balsam.transfer import TaskState, TaskStatus, TransferError, TransferFile

sys.path.insert(0, str(Path(__file__).parent))
from test_transfer_module_refusals import T0, journal_tokens, setup  # noqa: E402


# -- 1: a journaled batch whose items were not read this cycle stays in the journal -----------------------


def test_a_journaled_batch_whose_items_are_not_read_is_kept_and_sent_with_its_token(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 20, "near": 10}, max_concurrent_transfers=2,
                                        transfer_batch_size=5, num_items_query_limit=10)
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("submit timed out (may have arrived)", retryable=True)
    for cycle in range(5):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
        # Two near tasks take every slot and fill the first page: far's items are not read, yet
        # the record of its unconfirmed submission stays.
        assert journal_tokens(module) == ["tok-1"], (cycle, journal_tokens(module))
    far_tokens = [token for alias, token, _ in backend.calls if alias == "far"]
    assert far_tokens == ["tok-1"]
    del backend.refusals["far"]
    for tid in list(backend.tasks):
        backend.tasks[tid] = TaskStatus(TaskState.done)
    for cycle in range(5, 8):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
    far_calls = [(token, dests) for alias, token, dests in backend.calls if alias == "far"]
    # The first batch of far goes again with its own token before any new one of its files.
    assert far_calls[0][0] == far_calls[1][0] == "tok-1" and far_calls[0][1] == far_calls[1][1]
    first = set(far_calls[0][1])
    assert all(not (set(dests) & first) for token, dests in far_calls[2:]), far_calls
    assert journal_tokens(module) == []


def far_batch_journaled_with_a_deleted_item(tmp_path: Path) -> tuple[Any, Any, Any, list, list[int]]:
    """``setup``'s scripted backend (a token names its task), 2 slots: far's first batch of 5 is
    journaled with its token (its submission timed out), the near tasks take every slot, then one
    of the batch's items is deleted (with its job) and a cycle runs: the record stays. Returns
    ``setup``'s (api, module, backend, clock) and the batch's item ids (the first one deleted)."""
    api, module, backend, clock = setup(tmp_path, {"far": 20, "near": 10}, max_concurrent_transfers=2,
                                        transfer_batch_size=5, num_items_query_limit=10)
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("submit timed out (may have arrived)", retryable=True)
    module.run_cycle()
    assert journal_tokens(module) == ["tok-1"]
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()  # the near tasks take every slot
    journaled = [i for i, it in api.items.items() if it["location_alias"] == "far"][:5]
    del api.items[journaled[0]]  # its job was deleted
    clock[0] = T0 + dt.timedelta(seconds=10)
    module.run_cycle()
    assert journal_tokens(module) == ["tok-1"]  # no slot: it waits with its token
    return api, module, backend, clock, journaled


def test_a_journaled_batch_whose_items_are_deleted_stays_in_the_journal_until_sent_with_its_token(
        tmp_path: Path) -> None:
    """A deleted item no longer drops the record (the service may have started its task): it waits
    for a slot with its token (test_xfer_token_batch_deleted.py follows it until it is sent)."""
    far_batch_journaled_with_a_deleted_item(tmp_path)


# -- 2: quick polls only for backends that ask for them --------------------------------------------------


def test_a_slow_backends_submission_does_not_shorten_the_period(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 3}, service_period=5)
    assert not getattr(type(backend), "quick_poll", False)
    assert module.run_cycle() is None  # submitted, a task in flight: the next cycle in a period
    assert any(it["state"] == "active" for it in api.items.values())
    clock[0] = T0 + dt.timedelta(seconds=5)
    assert module.run_cycle() is None


def test_a_quick_poll_backends_submission_is_polled_soon(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 3}, service_period=5)
    backend.__class__ = type("QuickScripted", (type(backend),), {"quick_poll": True})
    delay = module.run_cycle()
    assert delay is not None and delay < 1, delay


def test_local_and_rsync_ask_for_quick_polls_globus_does_not() -> None:
    from balsam.builtin.rsync_transfer import RsyncTransfer
    from balsam_transfer_globus.backend import GlobusTransfer

    assert local_transfer.LocalTransfer.quick_poll and RsyncTransfer.quick_poll
    assert not GlobusTransfer.quick_poll


# -- 3: the answer to the agent's own cancel is the deadline's, whatever its words -------------------------


@pytest.mark.parametrize("answer", [
    TaskStatus(TaskState.failed, "task cancelled on request", retryable=False),
    TaskStatus(TaskState.failed, "cancelled by the destination collection's administrator", retryable=False),
    TaskStatus(TaskState.failed, "", retryable=False),
    TaskStatus(TaskState.failed, "cancelled", retryable=False),  # the built-in backends' words: not repeated
])
def test_a_failed_answer_after_the_agents_cancel_costs_a_try(tmp_path: Path, answer: TaskStatus) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 1})
    module.run_cycle()
    backend.after_cancel = lambda tid: answer
    clock[0] = T0 + dt.timedelta(seconds=700)
    module.run_cycle()
    item = api.items[1]
    error = item["transfer_info"]["error"]
    assert item["state"] == "pending" and item["transfer_info"]["attempts"] == 1, item
    assert "did not finish within 600 s" in error
    if answer.error and answer.error != "cancelled":
        assert f"its backend reports: {answer.error}" in error
    else:
        assert "its backend reports" not in error


def test_a_done_answer_with_final_file_errors_after_the_cancel_fails_them_for_good(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2})
    module.run_cycle()
    dests = [f.dest for f in next(iter(backend.files.values()))]
    backend.after_cancel = lambda tid: TaskStatus(TaskState.done, file_errors={dests[1]: "cancelled by its owner"},
                                                  file_errors_retryable=False)
    clock[0] = T0 + dt.timedelta(seconds=700)
    module.run_cycle()
    assert sorted(it["state"] for it in api.items.values()) == ["done", "error"]


def test_local_reports_its_cancelled_tasks_as_retryable(tmp_path: Path) -> None:
    (tmp_path / "src").write_text("x")
    stop = threading.Event()
    stop.set()
    status = local_transfer._run_task([(str(tmp_path / "dest"), TransferFile(str(tmp_path / "src"),
                                                                               str(tmp_path / "dest")))], stop)
    assert status.state == TaskState.failed and status.retryable


# -- 4: one home directory per Globus task, and only an unambiguous one --------------------------------------


def test_an_ambiguous_home_prefix_counts_no_home_path_delivered() -> None:
    from balsam_transfer_globus.backend import _delivered

    sent = [("/~/site/a/x.dat", "/src/1", False), ("/~/site/b/site/a/x.dat", "/src/2", False)]
    assert _delivered(sent, {"/home/me/site/b/site/a/x.dat"}) == set()


def test_the_home_prefix_most_paths_match_exactly_is_used() -> None:
    from balsam_transfer_globus.backend import _delivered

    sent = [("/~/site/a/x.dat", "/s/1", False), ("/~/site/b/site/a/x.dat", "/s/2", False),
            ("/~/site/c/y.dat", "/s/3", False), ("/~/site/d/z.dat", "/s/4", False), ("/abs/w.dat", "/s/5", False)]
    arrived = {"/home/me/site/b/site/a/x.dat", "/home/me/site/c/y.dat", "/abs/w.dat"}
    # the home as the collection's ls of /~/ gives it (no longer guessed from the paths)
    assert _delivered(sent, arrived, "/home/me") == {"/~/site/b/site/a/x.dat", "/~/site/c/y.dat", "/abs/w.dat"}
