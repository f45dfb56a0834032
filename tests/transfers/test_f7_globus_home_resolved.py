"""Which item of a Globus task a reported path belongs to, when Globus reports a home-directory
destination (``/~/...``) at its resolved path (``/home/me/...``). The home was *guessed* from the
task's reported paths (a vote), and six layouts recorded done an item whose file was not delivered:
a ``..`` climbing out of the home, a root ``/`` directory item, a whole-home ``/~/`` directory item,
two items with one destination, and (for a failed task) a non-home item's delivered path or the files
of a home directory item voting for a wrong home. The home is now read from Globus, once per
collection (``operation_ls`` of ``/~/``, its ``absolute_path``); when it cannot be read nothing is
guessed: no home item counts delivered unless reported in home form, and a skipped file no item can
be sure of fails a try of every item of the task."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferFile
from balsam_transfer_globus.backend import _delivered, _norm, _skipped_keys
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from test_globus_task_outcomes import failed_doc, successful, task_list
from test_i2_globus_skipped_home_paths import TASK_ID, apply, home_listing, items_of, module_for, succeeded_with_skipped

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"


def ls_calls() -> int:
    return sum(1 for call in responses.calls if "/ls" in call.request.url)


def states(updates: dict, n: int) -> list:
    return [updates.get(i, {}).get("state") for i in range(1, n + 1)]


def stage_out(tmp_path: Path, dests: list[str], recursive: tuple[bool, ...] = ()):
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data" / f"j{n}" / "f"), d, recursive=(recursive[n - 1] if recursive else False))
             for n, d in enumerate(dests, 1)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    return backend, files


def failed_stage_out(tmp_path: Path, dests: list[str], recursive: tuple[bool, ...], delivered: list[str]) -> dict:
    backend, files = stage_out(tmp_path, dests, recursive)
    task_list(failed_doc(len(dests) + 1, len(delivered), label=f"balsam stage-out ({len(dests)} files)",
                         source_endpoint_id=SITE_EP, destination_endpoint_id=REMOTE_EP,
                         fatal_error={"code": "DEADLINE_EXPIRED", "description": "The task deadline expired"}))
    successful(*delivered)
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/event_list", json={"DATA_TYPE": "event_list", "DATA": []})
    status = backend.poll([TASK_ID])[TASK_ID]
    updates: dict = {}
    module_for(tmp_path, backend)._apply_status(f"globus:{TASK_ID}", status, items_of(files, "out"), updates,
                                                dt.datetime.now(dt.timezone.utc))
    return updates


# -- r5's six layouts, the home read from Globus ------------------------------------------------------------------

@pytest.mark.parametrize("ls", ["resolved", "refused"])
def test_e1_a_dot_dot_climbing_out_of_the_home_blames_its_own_item(tmp_path: Path, ls: str) -> None:
    home_listing(REMOTE_EP, status=200 if ls == "resolved" else 403)
    backend, files = stage_out(tmp_path, ["/~/../group/x.h5", "/~/x.h5"])
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/group/x.h5", dest_ep=REMOTE_EP)  # job 1's
    updates = apply(tmp_path, backend, files, direction="out")
    if ls == "resolved":
        assert states(updates, 2) == ["pending", "done"]
        assert updates[1]["transfer_info"]["error"] == "FILE_NOT_FOUND: No such file"
    else:
        assert states(updates, 2) == ["pending", "pending"]  # not told: every item a try


def test_e2_two_spellings_of_one_destination_both_fail(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    backend, files = stage_out(tmp_path, ["/~/a/../b.h5", "/~/b.h5"])
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/me/b.h5", dest_ep=REMOTE_EP)
    assert set(backend.poll([TASK_ID])[TASK_ID].file_errors) == {"/~/a/../b.h5", "/~/b.h5"}
    updates = apply(tmp_path, backend, files, direction="out")
    assert states(updates, 2) == ["pending", "pending"]


@pytest.mark.parametrize("ls", ["resolved", "refused"])
def test_e3_a_delivered_non_home_file_does_not_make_a_home_item_delivered(tmp_path: Path, ls: str) -> None:
    home_listing(REMOTE_EP, status=200 if ls == "resolved" else 403)
    updates = failed_stage_out(tmp_path, ["/scratch/out.h5", "/~/out.h5"], (False, False), ["/scratch/out.h5"])
    # Home refused: /scratch/out.h5 may be /~/out.h5 itself (a home of /scratch), so it delivers
    # neither (as a skipped path that may be a home item's is told to no item).
    assert states(updates, 2) == (["done", "pending"] if ls == "resolved" else ["pending", "pending"])


@pytest.mark.parametrize("ls", ["resolved", "refused"])
def test_e4_files_of_a_home_directory_item_do_not_deliver_a_home_file_item(tmp_path: Path, ls: str) -> None:
    home_listing(REMOTE_EP, status=200 if ls == "resolved" else 403)
    updates = failed_stage_out(tmp_path, ["/~/run1", "/~/out.txt"], (True, False),
                               ["/home/me/run1/out.txt", "/home/me/run1/log"])
    assert states(updates, 2) == ["pending", "pending"]  # a directory item counts undelivered; out.txt was not


def test_e4_a_home_file_item_delivered_at_its_resolved_path_is_done(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    updates = failed_stage_out(tmp_path, ["/~/run1", "/~/out.txt"], (True, False),
                               ["/home/me/run1/log", "/home/me/out.txt"])
    assert states(updates, 2) == ["pending", "done"]


def test_e5_a_root_directory_item_holds_every_path(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    backend, files = stage_out(tmp_path, ["/", "/~/x.h5"], (True, False))
    succeeded_with_skipped("balsam stage-out (1 file, 1 directory)", "/sub/x.h5", dest_ep=REMOTE_EP)  # job 1's
    updates = apply(tmp_path, backend, files, direction="out")
    assert states(updates, 2) == ["pending", "done"]
    assert updates[1]["transfer_info"]["error"] == "/sub/x.h5: FILE_NOT_FOUND: No such file"


def test_e5_a_path_both_the_root_item_and_a_home_item_write_fails_both(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    backend, files = stage_out(tmp_path, ["/", "/~/x.h5"], (True, False))
    succeeded_with_skipped("balsam stage-out (1 file, 1 directory)", "/home/me/x.h5", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert states(updates, 2) == ["pending", "pending"]


def test_e6_a_whole_home_directory_item_holds_its_files(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/results"), "/~/", recursive=True),
             TransferFile(str(site / "data/j2/x.h5"), "/~/x.h5")]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (1 file, 1 directory)", "/home/me/sub/x.h5", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert states(updates, 2) == ["pending", "done"]
    assert updates[1]["transfer_info"]["error"] == "/~/sub/x.h5: FILE_NOT_FOUND: No such file"


# -- the ls: asked only when needed, once per collection ---------------------------------------------------------

def test_the_home_is_read_once_per_collection_for_many_tasks(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    backend = make_backend(tmp_path)
    for n in range(3):
        files = [TransferFile(str(tmp_path / "site" / "data" / f"j{k}" / "f"), f"/~/r{n}/{k}.h5") for k in "ab"]
        load_response(globus_sdk.TransferClient.submit_transfer)
        backend.submit(LOCATION, TransferDirection.stage_out, files)  # (the fixture's task id each time)
        succeeded_with_skipped("balsam stage-out (2 files)", f"/home/me/r{n}/a.h5", dest_ep=REMOTE_EP)
        assert backend.poll([TASK_ID])[TASK_ID].file_errors == {f"/~/r{n}/a.h5": "FILE_NOT_FOUND: No such file"}
        backend._tasks[TASK_ID].final = None  # the next task, under the same id, is read anew
    (call,) = [c for c in responses.calls if "/ls" in c.request.url]
    assert f"/operation/endpoint/{REMOTE_EP}/ls" in call.request.url and "path=%2F~%2F" in call.request.url


def test_no_ls_when_globus_reports_home_paths_as_submitted(tmp_path: Path) -> None:
    backend, files = stage_out(tmp_path, ["/~/a.h5", "/~/b.h5"])
    succeeded_with_skipped("balsam stage-out (2 files)", "/~/b.h5", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert states(updates, 2) == ["done", "pending"] and ls_calls() == 0


def test_a_refused_ls_is_asked_again_only_after_a_while(tmp_path: Path) -> None:
    home_listing(REMOTE_EP, status=403)
    backend, files = stage_out(tmp_path, ["/~/a.h5", "/~/b.h5"])
    clock = [1000.0]
    backend.clock = lambda: clock[0]
    for _ in range(2):
        succeeded_with_skipped("balsam stage-out (2 files)", "/home/me/b.h5", dest_ep=REMOTE_EP)
        backend._tasks[TASK_ID].final = None
        status = backend.poll([TASK_ID])[TASK_ID]
        assert status.state == TaskState.done and list(status.file_errors) == ["unattributed:/home/me/b.h5"]
    assert ls_calls() == 1
    clock[0] += 301
    home_listing(REMOTE_EP)
    backend._tasks[TASK_ID].final = None
    assert backend.poll([TASK_ID])[TASK_ID].file_errors == {"/~/b.h5": "FILE_NOT_FOUND: No such file"}
    assert ls_calls() == 2


# -- the helper itself ------------------------------------------------------------------------------------------

def test_home_paths_keep_their_climb_and_are_read_against_the_resolved_home() -> None:
    assert _norm("/~/../group/x") == "/~/../group/x" and _norm("~/a/../b") == "/~/b" and _norm("/~/") == "/~"
    sent = [(_norm("/~/../group/x"), "J1", False), ("/~/x", "J2", False), ("/abs/x", "J3", False)]
    assert _skipped_keys(sent, ["/home/group/x"], "/home/me") == {"/home/group/x": ["J1"]}
    assert _skipped_keys(sent, ["/home/group/x"], None) == {}  # home unknown: not told
    assert _skipped_keys(sent, ["/~/x"], None) == {"/~/x": ["J2"]}  # home form: told
    assert _delivered(sent, {"/home/me/x", "/abs/x"}, "/home/me") == {"/~/x", "/abs/x"}
    # Home unknown: /abs/x may be /~/x too (a home of /abs): it delivers no item, as it is told to none if skipped.
    assert _delivered(sent, {"/home/me/x", "/abs/x"}, None) == set()
    assert _skipped_keys(sent, ["/abs/x"], None) == {}
    assert _delivered(sent, {"/~/x"}, None) == {"/~/x"}  # home form: told
    # A home of "/" (a guest collection): /~/x is /x.
    assert _skipped_keys(sent, ["/x"], "/") == {"/x": ["J2"]}
    # By whole components: /~/ab is not inside the directory item /~/a.
    assert _skipped_keys([("/~/a", "D", True)], ["/home/me/ab"], "/home/me") == {}
