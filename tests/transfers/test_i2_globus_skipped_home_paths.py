"""A file Globus skips is named by the path Globus reports, which for a home-directory path
(``/~/...``, as submitted or as ``endpoint_site_path`` made it) may be the resolved one
(``/home/me/...``, as the delivered files are read: see ``_delivered``). Such an error matched no
item, so the agent failed a try of *every* item of the task; the missing file, batched again with
others at each retry, made whole batches of jobs fail for one missing input. The home is read from
Globus (``operation_ls`` of ``/~/``: ``home_listing`` registers its answer)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set, load_response

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferFile
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]


def succeeded_with_skipped(label: str, *paths: str, dest_ep: str = SITE_EP) -> None:
    doc = {**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "label": label, "subtasks_skipped_errors": len(paths),
           "source_endpoint_id": REMOTE_EP if dest_ep == SITE_EP else SITE_EP, "destination_endpoint_id": dest_ep}
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": "No such file",
                  "source_path": "/src", "destination_path": p, "is_directory": False, "is_symlink": False,
                  "error_time": "2026-11-30T18:00:00+00:00"} for p in paths]})


def home_listing(collection: str, home: str = "/home/me/", status: int = 200) -> responses.BaseResponse:
    """Globus's answer to ``operation_ls(collection, path="/~/")``: a file_list whose ``absolute_path``
    is the home directory ``/~/`` resolves to (``status`` other than 200: a refusal)."""
    url = f"{TRANSFER}/operation/endpoint/{collection}/ls"
    if status != 200:
        return responses.add(responses.GET, url, status=status, json={
            "code": "EndpointPermissionDenied", "message": "Denied by endpoint", "request_id": "r1",
            "resource": f"/v0.10/operation/endpoint/{collection}/ls"})
    return responses.add(responses.GET, url, json={
        "DATA_TYPE": "file_list", "endpoint": collection, "path": "/~/", "absolute_path": home,
        "rename_supported": True, "symlink_supported": False, "length": 0, "total": 0, "DATA": []})


def module_for(tmp_path: Path, backend) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path / "site"), data_path=str(tmp_path / "site" / "data"), site_id=1)
    module = TransfersModule(site_config, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                           globus_endpoint_id=SITE_EP, max_attempts=3), client=None)
    module.backends["globus"] = backend
    return module


def items_of(files: list[TransferFile], direction: str = "in") -> list[dict]:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return [{"id": i, "job_id": i, "direction": direction, "state": "active", "recursive": f.recursive,
             "local_path": "x", "remote_path": f.src, "task_id": f"globus:{TASK_ID}",
             "transfer_info": {"dest": f.dest, "submitted": now}} for i, f in enumerate(files, 1)]


def apply(tmp_path: Path, backend, files: list[TransferFile], direction: str = "in") -> dict:
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.done
    updates: dict = {}
    module_for(tmp_path, backend)._apply_status(f"globus:{TASK_ID}", status, items_of(files, direction), updates,
                                                dt.datetime.now(dt.timezone.utc))
    return updates


def test_a_skipped_file_at_its_resolved_home_path_fails_only_its_own_item(tmp_path: Path) -> None:
    site = tmp_path / "site"
    home_listing(SITE_EP, "/home/me/")
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    files = [TransferFile(f"/data/{n}.h5", str(site / "data" / f"j{n}" / "in.h5")) for n in range(3)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_in, files)
    succeeded_with_skipped("balsam stage-in (3 files)", "/home/me/site/data/j1/in.h5")
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.file_errors == {files[1].dest: "FILE_NOT_FOUND: No such file"}
    updates = apply(tmp_path, backend, files)
    assert [updates[i]["state"] for i in (1, 2, 3)] == ["done", "pending", "done"]
    assert updates[2]["transfer_info"]["error"] == "FILE_NOT_FOUND: No such file"


def test_a_file_skipped_inside_a_directory_item_at_its_resolved_home_path_fails_that_item(tmp_path: Path) -> None:
    site = tmp_path / "site"
    home_listing(SITE_EP, "/home/me")
    backend = make_backend(tmp_path, endpoint_site_path="~/site")
    files = [TransferFile("/data/frames", str(site / "data" / "j0" / "frames"), recursive=True),
             TransferFile("/data/b.h5", str(site / "data" / "j1" / "b.h5"))]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_in, files)
    succeeded_with_skipped("balsam stage-in (1 file, 1 directory)", "/home/me/site/data/j0/frames/f2.h5")
    updates = apply(tmp_path, backend, files)
    assert updates[1]["state"] == "pending" and updates[2]["state"] == "done"
    assert updates[1]["transfer_info"]["error"] == f"{files[0].dest}/f2.h5: FILE_NOT_FOUND: No such file"


def test_a_stage_out_skipped_at_its_resolved_home_path_fails_only_its_own_item(tmp_path: Path) -> None:
    site = tmp_path / "site"
    home_listing(REMOTE_EP, "/home/me/")
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data" / f"j{n}" / "out.txt"), f"~/results/{n}.txt") for n in range(3)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (3 files)", "/home/me/results/2.txt", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2, 3)] == ["done", "done", "pending"]


def test_a_skipped_path_as_submitted_still_matches(tmp_path: Path) -> None:
    site = tmp_path / "site"
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    files = [TransferFile(f"/data/{n}.h5", str(site / "data" / f"j{n}" / "in.h5")) for n in range(2)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_in, files)
    succeeded_with_skipped("balsam stage-in (2 files)", "/~/site/data/j0/in.h5")
    updates = apply(tmp_path, backend, files)
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "done"]


def test_a_skipped_path_no_item_has_still_fails_every_item_a_try(tmp_path: Path) -> None:
    """A path no item has (its home read, or not): not guessed, every item fails a try (nothing lost)."""
    site = tmp_path / "site"
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    files = [TransferFile(f"/data/{n}.h5", str(site / "data" / f"j{n}" / "in.h5")) for n in range(2)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_in, files)
    home_listing(SITE_EP, "/home/me/")
    succeeded_with_skipped("balsam stage-in (2 files)", "/elsewhere/other.h5")
    updates = apply(tmp_path, backend, files)
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "pending"]
