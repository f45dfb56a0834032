"""Review r10 of the Globus nested items (69edc24):

- After an agent restart the backend no longer knows a task's items: a skipped file was filed under
  the path Globus reports and the agent's matcher gave it to the deepest item holding it only, so an
  outer directory item (a job's recursive stage-in, another job's workdir inside it) was recorded
  done without its file (its job STAGED_IN). The status now says ``file_errors_attributed`` False
  and the agent charges such an error to every item that may hold it.
- A 502 ``ExternalError`` of the home's ls (the collection's endpoint disconnected: globus-sdk does
  not retry it) was taken for a passing outage: one ls per task per cycle, for hours. It is now a
  home unknown for HOME_RECHECK_SEC; a passing failure (503) is asked once per poll, not per task.
- A 429 without Retry-After on the home's ls while a FAILED task's outcome was read lost its
  http_status in a wrapping TransferError: the poll reported the task active instead of failing
  (the agent's hold-off on a rate limit).
- An item's errors combined by the agent stacked the backend's count: "(and 2 more failed files)
  (and 1 more failed files)"; the counts are now added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from balsam.site.modules.transfers import match_file_errors
from balsam.states import TransferDirection
from balsam.transfer import TransferError, TransferFile
from balsam_transfer_globus.backend import _skipped_keys
from globus_test_utils import (BASE, LOCATION, REMOTE_EP, SITE_EP, TASK_ID, TRANSFER, globus_module,  # noqa: F401
                               globus_site, make_backend, mocked_responses, outer_and_inner_jobs, submitted,
                               succeeded_with)
from test_i2_globus_skipped_home_paths import apply

pytestmark = pytest.mark.usefixtures("mocked_responses")


def test_unattributed_errors_are_every_holders() -> None:
    items = [(1, "/r/run", True), (2, "/r/run/sub", True), (3, "/r/run/sub/x.h5", False), (4, "/r/other", False)]
    errors, unmatched = match_file_errors(items, {"/r/run/sub/x.h5": "gone", "/r/elsewhere": "lost"},
                                          attributed=False)
    assert errors == {1: "/r/run/sub/x.h5: gone", 2: "/r/run/sub/x.h5: gone", 3: "gone"}
    assert unmatched == {"/r/elsewhere": "lost"}
    # Attributed (the default, local and rsync): the exact item only, else the deepest directory item.
    errors, _ = match_file_errors(items, {"/r/run/sub/x.h5": "gone", "/r/run/sub/y.h5": "gone"})
    assert errors == {3: "gone", 2: "/r/run/sub/y.h5: gone"}


def test_counts_of_combined_errors_are_added() -> None:
    items = [(1, "/run", True)]
    errors, _ = match_file_errors(items, {"/run": "/run/sub/0.h5: E (and 2 more failed files)",
                                          "/run/top.h5": "E (and 1 more failed file)", "/run/x.h5": "E"})
    assert errors == {1: "/run/sub/0.h5: E (and 5 more failed files)"}


def test_live_after_a_restart_an_outer_item_is_not_done_without_its_file(balsam_env, tmp_path: Path) -> None:
    """Job 2's workdir lies inside job 1's recursive stage-in directory; Globus skips a file of job 1's
    tree there. The agent restarts (a fresh module and backend) before the task is read."""
    responses.add_passthru(balsam_env.url)
    client, site_path, site = globus_site(tmp_path, "/proj/gsite")
    j1, j2 = outer_and_inner_jobs(site)

    def new_module() -> Any:
        return globus_module(tmp_path, site, client, "/proj/gsite")

    load_response(globus_sdk.TransferClient.submit_transfer)
    new_module().run_cycle()
    sent = sorted((d["source_path"], d["destination_path"]) for d in submitted())
    assert sent == [("/data/other/x.h5", "/proj/gsite/data/camp/inputs/sub/x.h5"),
                    ("/data/tree", "/proj/gsite/data/camp/inputs")]
    succeeded_with("balsam stage-in (1 file, 1 directory)",
                   [("/data/tree/sub/x.h5", "/proj/gsite/data/camp/inputs/sub/x.h5")], SITE_EP)
    new_module().run_cycle()  # restarted: the backend does not know the task's items
    # Whose file it was cannot be told: both holders fail their (only) try; neither is done.
    assert client.get(f"/jobs/{j1.id}")["state"] == "FAILED"
    assert client.get(f"/jobs/{j2.id}")["state"] == "FAILED"
    events = client.get("/events/", params={"job_id": [j1.id], "to_state": "FAILED"})["results"]
    (message,) = [e["data"]["message"] for e in events]
    assert message.endswith(f"{site_path}/data/camp/inputs/sub/x.h5: FILE_NOT_FOUND: No such file")


def test_a_restarted_backend_says_its_errors_are_not_attributed(tmp_path: Path) -> None:
    site = tmp_path / "site"
    files = [TransferFile(str(site / "data/j1/results"), "/run", recursive=True),
             TransferFile(str(site / "data/j2/results"), "/run/sub", recursive=True)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    make_backend(tmp_path).submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with("balsam stage-out (2 directories)",
                   [(str(site / "data/j1/results/sub/f.h5"), "/run/sub/f.h5")], REMOTE_EP)
    updates = apply(tmp_path, make_backend(tmp_path), files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "pending"]
    # The backend that submitted it knows whose file it is (f11): attributed, the outer one's only.
    backend = make_backend(tmp_path)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.file_errors_attributed and status.file_errors == {"/run": "/run/sub/f.h5: FILE_NOT_FOUND: No such file"}


def succeeded_tasks_to_home(tmp_path: Path, count: int) -> tuple[object, list[str]]:
    """``count`` SUCCEEDED stage-outs to ``/~/out/<n>/`` of REMOTE_EP, each with one skipped file
    reported at its resolved home path (the home must be read)."""
    ids = [f"task-{n}" for n in range(count)]
    backend = make_backend(tmp_path)
    site = tmp_path / "site"
    for n, tid in enumerate(ids):
        responses.add(responses.POST, f"{TRANSFER}/transfer", status=202, json={
            "DATA_TYPE": "transfer_result", "task_id": tid, "submission_id": f"s{n}", "code": "Accepted",
            "message": "ok", "request_id": "r", "resource": "/transfer"})
        backend.submit(LOCATION, TransferDirection.stage_out,
                       [TransferFile(str(site / f"data/j{n}/a"), f"/~/out/{n}/a.h5"),
                        TransferFile(str(site / f"data/j{n}/b"), f"/~/out/{n}/b.h5")])
    docs = [{**BASE, "task_id": tid, "status": "SUCCEEDED", "label": "balsam stage-out (2 files)",
             "subtasks_skipped_errors": 1, "source_endpoint_id": SITE_EP, "destination_endpoint_id": REMOTE_EP}
            for tid in ids]
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": docs, "DATA_TYPE": "task_list", "length": count, "limit": 1000, "offset": 0, "total": count})
    for n, tid in enumerate(ids):
        responses.add(responses.GET, f"{TRANSFER}/task/{tid}/skipped_errors", json={
            "DATA_TYPE": "skipped_errors_list", "next_marker": None,
            "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": "No such file",
                      "source_path": "/x", "destination_path": f"/home/me/out/{n}/a.h5", "is_directory": False,
                      "is_symlink": False, "error_time": "2026-11-30T18:00:00+00:00"}]})
    return backend, ids


def ls_calls() -> int:
    return sum("/ls" in c.request.url for c in responses.calls)


def test_an_external_error_of_the_home_ls_is_a_home_unknown_not_asked_every_cycle(tmp_path: Path) -> None:
    backend, ids = succeeded_tasks_to_home(tmp_path, 3)
    responses.add(responses.GET, f"{TRANSFER}/operation/endpoint/{REMOTE_EP}/ls", status=502, json={
        "code": "ExternalError", "request_id": "r",
        "message": "Unable to scan endpoint (1, 'Error (connect) ... Message: The server may be too busy')"})
    for _ in range(3):
        statuses = backend.poll(ids)
    assert ls_calls() == 1
    # The home unknown: the skipped file cannot be told from a home item's, every item fails a try.
    for tid in ids:
        assert statuses[tid].state.value == "done"
        (key,) = statuses[tid].file_errors
        assert key.startswith("unattributed:")


def test_a_passing_failure_of_the_home_ls_is_asked_once_per_poll(tmp_path: Path) -> None:
    backend, ids = succeeded_tasks_to_home(tmp_path, 3)
    responses.add(responses.GET, f"{TRANSFER}/operation/endpoint/{REMOTE_EP}/ls", status=503, json={
        "code": "ServiceUnavailable", "request_id": "r", "message": "down for a moment"})
    for poll in range(1, 3):
        statuses = backend.poll(ids)
        assert {statuses[tid].state.value for tid in ids} == {"active"}
        assert ls_calls() == poll  # read again at the next poll, once


def test_a_429_of_the_home_ls_while_reading_a_failed_task_holds_the_poll(tmp_path: Path) -> None:
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/a"), "/~/a.h5"), TransferFile(str(site / "data/j2/b"), "/~/b.h5")]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    responses.add(responses.GET, f"{TRANSFER}/operation/endpoint/{REMOTE_EP}/ls", status=429,
                  json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    doc = {**BASE, "task_id": TASK_ID, "status": "FAILED", "label": "balsam stage-out (2 files)", "files": 2,
           "files_transferred": 1, "faults": 0, "fatal_error": {"code": "FAILED", "description": "x"},
           "source_endpoint_id": SITE_EP, "destination_endpoint_id": REMOTE_EP}
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/successful_transfers", json={
        "DATA_TYPE": "successful_transfers", "next_marker": None,
        "DATA": [{"DATA_TYPE": "successful_transfer", "source_path": "/x", "destination_path": "/home/me/a.h5"}]})
    # As for a succeeded task's skipped files: the poll fails with the rate limit (the agent holds off).
    with pytest.raises(TransferError, match="HTTP 429 RateLimited") as raised:
        backend.poll([TASK_ID])
    assert raised.value.retryable


def test_the_combined_message_counts_every_failed_file_once(tmp_path: Path) -> None:
    home = tmp_path / "site"
    files = [TransferFile(str(home / "data/j1/results"), "/run", recursive=True),
             TransferFile(str(home / "data/j2/results"), "/run/sub", recursive=True)]
    backend = make_backend(tmp_path)
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with("balsam stage-out (2 directories)",
                   [(str(home / f"data/j1/results/sub/{n}.h5"), f"/run/sub/{n}.h5") for n in range(3)]
                   + [(str(home / "data/j1/results/top.h5"), "/run/top.h5")], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "done"]
    assert updates[1]["transfer_info"]["error"] == "/run/sub/0.h5: FILE_NOT_FOUND: No such file (and 3 more failed files)"


def test_a_source_spelled_in_home_form_by_one_holder_does_not_tell() -> None:
    """One remote file read by two nested items, spelled ``~/src`` by the outer one and
    ``/home/me/src/sub/f`` by the inner: Globus reports it resolved, which matched the inner item's
    source only, and the outer item was recorded done without it. Both are now charged."""
    sent = [("/site/run", "/site/run", True), ("/site/run/sub/f", "/site/run/sub/f", False)]
    assert _skipped_keys(sent, ["/site/run/sub/f"], sources=["/home/me/src/sub/f"],
                         origins=["/~/src", "/home/me/src/sub/f"]) == {"/site/run/sub/f": ["/site/run", "/site/run/sub/f"]}
    # Spelled alike, the source still tells.
    assert _skipped_keys(sent, ["/site/run/sub/f"], sources=["/home/me/src/sub/f"],
                         origins=["/home/me/src", "/elsewhere/f"]) == {"/site/run/sub/f": ["/site/run"]}
