"""How the Globus backend reports a task's end and its waits, against mocked Globus answers
(``responses``, globus-sdk's own fixtures where it has them): a FAILED task that delivered some
files (those are done, the others fail a try), cancels by the user, an administrator or balsam
itself, a task queued by Globus, the submitted options (quota, deadline), option checks, the token
refresh with ``http_retries: 0``, and globus-sdk's own log lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_last_request, get_response_set, load_response
from responses import matchers

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferError, TransferFile, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
CLIENT_ID = "33333333-3333-3333-3333-333333333333"


def task_list(*docs: dict) -> None:
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": list(docs), "DATA_TYPE": "task_list", "length": len(docs), "limit": 1000, "offset": 0, "total": len(docs)})


def failed_doc(files: int, delivered: int, **extra) -> dict:
    return {**BASE, "task_id": TASK_ID, "status": "FAILED", "nice_status": None, "label": f"balsam stage-in ({files} files)",
            "source_endpoint_id": REMOTE_EP, "destination_endpoint_id": SITE_EP, "files": files,
            "files_transferred": delivered, "faults": 0, "subtasks_skipped_errors": 0, "canceled_by_admin": None,
            "canceled_by_admin_message": None, **extra}


def successful(*dests: str, marker: str | None = None, after: str | None = None) -> None:
    """One page of task_successful_transfers (``after``: the marker asking for it)."""
    query = {"marker": after} if after else {}
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/successful_transfers",
                  match=[matchers.query_param_matcher(query)], json={
                      "DATA_TYPE": "successful_transfers", "next_marker": marker,
                      "DATA": [{"DATA_TYPE": "successful_transfer", "source_path": f"/remote{d}", "destination_path": d}
                               for d in dests]})


def calls(path: str) -> int:
    return sum(1 for c in responses.calls if urllib.parse.urlsplit(c.request.url).path.endswith(path))


def submit_stage_in(backend: GlobusTransfer, files: list[TransferFile]) -> str:
    load_response(globus_sdk.TransferClient.submit_transfer)
    return backend.submit(LOCATION, TransferDirection.stage_in, files)


def module_for(tmp_path: Path, backend: GlobusTransfer, **options) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path / "site"), data_path=str(tmp_path / "site" / "data"), site_id=1)
    module = TransfersModule(site_config, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                           globus_endpoint_id=SITE_EP, max_attempts=3, **options),
                             client=None)
    module.backends["globus"] = backend
    return module


def items_of(files: list[TransferFile], task_id: str, submitted: dt.datetime) -> list[dict]:
    return [{"id": i, "job_id": i, "direction": "in", "state": "active", "recursive": f.recursive, "local_path": "x",
             "remote_path": f.src, "task_id": f"globus:{task_id}",
             "transfer_info": {"dest": f.dest, "submitted": submitted.isoformat()}} for i, f in enumerate(files, 1)]


# -- defect 2: a FAILED task that delivered some files --------------------------------------------------------


def test_a_failed_task_fails_only_the_files_it_did_not_deliver(tmp_path: Path) -> None:
    """97 of 100 files delivered, 3 destination errors: every item failed a try and was sent again
    (50 of 50 jobs FAILED in the audit). Now the delivered ones are done, read from every page of
    task_successful_transfers (one call per page), and each undelivered one fails with the task's
    fatal error and last fault."""
    site = tmp_path / "site"
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    files = [TransferFile(f"/d/{n}.h5", str(site / f"data/j{n}/{n}.h5")) for n in ("a", "b", "c")]
    files.append(TransferFile("/d/frames", str(site / "data/j4/frames"), recursive=True))
    submit_stage_in(backend, files)

    task_list(failed_doc(5, 4, faults=3, fatal_error={"code": "DEADLINE_EXPIRED", "description": "The task deadline expired"}))
    successful("/~/site/data/ja/a.h5", "/~/site/data/j4/frames/f1.h5", marker="page-2")
    successful("/~/site/data/jb/b.h5", "/~/site/data/j4/frames/f2.h5", after="page-2")
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/event_list", json={"DATA_TYPE": "event_list", "DATA": [
        {"DATA_TYPE": "event", "code": "PERMISSION_DENIED", "is_error": True, "description": "Error (permission denied)",
         "details": "550 Permission denied: /~/site/data/jc/c.h5", "time": "2030-01-01T12:00:00+00:00"}]})
    responses.calls.reset()

    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.done
    assert sorted(status.file_errors) == sorted([files[2].dest, files[3].dest])  # c, and the directory
    error = status.file_errors[files[2].dest]
    assert error == (f"not delivered: Globus task {TASK_ID} failed: DEADLINE_EXPIRED: The task deadline expired (last "
                     "fault: PERMISSION_DENIED: Error (permission denied) (550 Permission denied: /~/site/data/jc/c.h5))")
    assert calls("/task_list") == 1 and calls("/successful_transfers") == 2 and calls("/event_list") == 1
    assert len(responses.calls) == 4

    # The agent: a and b done, c and the directory item back to pending with a try used.
    module = module_for(tmp_path, backend)
    updates: dict = {}
    items = items_of(files, TASK_ID, dt.datetime.now(dt.timezone.utc))
    module._apply_status(f"globus:{TASK_ID}", status, items, updates, dt.datetime.now(dt.timezone.utc))
    assert [updates[i]["state"] for i in (1, 2, 3, 4)] == ["done", "done", "pending", "pending"]
    assert updates[3]["transfer_info"]["attempts"] == 1 and "DEADLINE_EXPIRED" in updates[3]["transfer_info"]["error"]

    # The same answer again (the agent's update was lost): the same report.
    assert backend.poll([TASK_ID])[TASK_ID].file_errors == status.file_errors


def test_a_failed_task_that_delivered_nothing_fails_as_a_whole(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    files = [TransferFile("/d/a.h5", str(tmp_path / "site/data/j/a.h5"))]
    submit_stage_in(backend, files)
    task_list(failed_doc(1, 0, fatal_error={"code": "PERMISSION_DENIED", "description": "permission denied on /d"}))
    responses.calls.reset()
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.failed and status.retryable
    assert status.error == f"Globus task {TASK_ID} failed: PERMISSION_DENIED: permission denied on /d"
    assert len(responses.calls) == 1  # no successful_transfers call: nothing was delivered


def test_a_failed_task_of_an_earlier_agent_process_fails_as_a_whole_and_says_why(tmp_path: Path) -> None:
    """After a restart the backend does not know the task's files: it cannot name the missing ones."""
    task_list(failed_doc(100, 97, fatal_error={"code": "ENDPOINT_ERROR", "description": "endpoint error"}))
    status = make_backend(tmp_path).poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.failed and status.retryable
    assert status.error == (f"Globus task {TASK_ID} failed: ENDPOINT_ERROR: endpoint error (97 of 100 files had been "
                            "delivered); which files were delivered is not known after an agent restart")


def test_a_list_of_delivered_files_globus_refuses_does_not_block_the_poll(tmp_path: Path) -> None:
    """Globus down while the list is read: that task stays in flight with the reason (read again next
    cycle; the poll's other tasks settle). Refused for good (a 4xx): the task fails as a whole, as
    before, rather than every poll failing until the deadline."""
    backend = make_backend(tmp_path)
    files = [TransferFile(f"/d/{n}", str(tmp_path / f"site/data/j{n}/f")) for n in range(2)]
    submit_stage_in(backend, files)
    task_list(failed_doc(2, 1, fatal_error={"code": "ENDPOINT_ERROR", "description": "endpoint error"}))
    url = f"{TRANSFER}/task/{TASK_ID}/successful_transfers"
    responses.add(responses.GET, url, status=502, content_type="application/json",
                  json={"code": "BadGateway", "message": "bad gateway", "request_id": "r"})
    waiting = backend.poll([TASK_ID])[TASK_ID]
    assert waiting.state == TaskState.active and "HTTP 502" in waiting.reason and "will retry" in waiting.reason
    responses.replace(responses.GET, url, status=403, content_type="application/json",
                      json={"code": "PermissionDenied", "message": "no", "request_id": "r"})
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.failed and status.retryable
    assert "which files were delivered cannot be read (Globus refused the request (HTTP 403" in status.error


def test_a_failed_task_of_10000_files_costs_one_call_per_page(tmp_path: Path) -> None:
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(f"/d/{n}", str(site / f"data/j{n}/f")) for n in range(10_000)]
    submit_stage_in(backend, files)
    missing = {13, 4_321, 9_999}
    delivered = [f.dest for n, f in enumerate(files) if n not in missing]
    pages = [delivered[i:i + 1000] for i in range(0, len(delivered), 1000)]
    for number, page in enumerate(pages):
        successful(*page, marker=f"m{number + 1}" if number + 1 < len(pages) else None,
                   after=f"m{number}" if number else None)
    task_list(failed_doc(10_000, len(delivered), fatal_error={"code": "QUOTA_EXCEEDED", "description": "quota exceeded"}))
    responses.calls.reset()
    started = time.perf_counter()
    status = backend.poll([TASK_ID])[TASK_ID]
    elapsed = time.perf_counter() - started
    assert status.state == TaskState.done and sorted(status.file_errors) == sorted(files[n].dest for n in missing)
    assert len(responses.calls) == 1 + len(pages) == 11
    assert elapsed < 10, elapsed


# -- defect 5: who cancelled ----------------------------------------------------------------------------------


def test_a_task_cancelled_in_the_globus_web_app_is_not_retried(tmp_path: Path) -> None:
    """Nothing delivered: the task fails as a whole, for good (its jobs fail with who cancelled it)."""
    backend = make_backend(tmp_path)
    files = [TransferFile(f"/d/{n}", str(tmp_path / f"site/data/j{n}/f")) for n in range(4)]
    submit_stage_in(backend, files)
    task_list(failed_doc(4, 0, fatal_error={"code": "CANCELED", "description": "canceled"},
                         nice_status_short_description="Canceled"))
    responses.calls.reset()
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.failed and not status.retryable
    assert status.error == (f"Globus task {TASK_ID} was cancelled by its owner, outside balsam (e.g. in the Globus web "
                            "app); not retried")
    assert len(responses.calls) == 1
    # The agent: each item fails for good (its job fails at once, with that error), no resubmission.
    module = module_for(tmp_path, backend)
    updates: dict = {}
    module._apply_status(f"globus:{TASK_ID}", status, items_of(files, TASK_ID, dt.datetime.now(dt.timezone.utc)),
                         updates, dt.datetime.now(dt.timezone.utc))
    assert {u["state"] for u in updates.values()} == {"error"}
    assert all(u["transfer_info"]["attempts"] == 1 for u in updates.values())


@pytest.mark.parametrize("admin, who", [(None, "its owner, outside balsam (e.g. in the Globus web app)"),
                                        ("DESTINATION", "the destination collection's administrator: Scratch is purged")])
def test_a_cancelled_task_that_delivered_some_files_keeps_them_and_fails_the_others_for_good(
        tmp_path: Path, admin, who: str) -> None:
    """Cancelled by its owner or an administrator after 2 of 4 files arrived: the whole task was
    reported failed, and the jobs of the 2 delivered files failed too (the contract could not say
    "done, but do not retry the others"). Now those 2 are done and the other 2 fail for good, their
    jobs FAILED with who cancelled it."""
    backend = make_backend(tmp_path)
    files = [TransferFile(f"/d/{n}", str(tmp_path / f"site/data/j{n}/f")) for n in range(4)]
    submit_stage_in(backend, files)
    task_list(failed_doc(4, 2, fatal_error={"code": "CANCELED", "description": "canceled"}, canceled_by_admin=admin,
                         canceled_by_admin_message="Scratch is purged" if admin else None,
                         subtasks_skipped_errors=1))
    successful(files[0].dest, files[2].dest)
    responses.calls.reset()
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.done and status.file_errors_retryable is False
    error = f"not delivered: Globus task {TASK_ID} was cancelled by {who}; not retried"
    assert status.file_errors == {files[1].dest: error, files[3].dest: error}
    assert calls("/task_list") == 1 and calls("/successful_transfers") == 1 and len(responses.calls) == 2

    module = module_for(tmp_path, backend)
    updates: dict = {}
    module._apply_status(f"globus:{TASK_ID}", status, items_of(files, TASK_ID, dt.datetime.now(dt.timezone.utc)),
                         updates, dt.datetime.now(dt.timezone.utc))
    assert [updates[i]["state"] for i in (1, 2, 3, 4)] == ["done", "error", "done", "error"]
    assert updates[2]["transfer_info"] == {**updates[2]["transfer_info"], "attempts": 1, "error": error}
    assert "retry_after" not in updates[2]["transfer_info"]


def test_a_done_task_whose_failed_files_may_be_retried_is_unchanged(tmp_path: Path) -> None:
    """The default (third-party backends): file_errors fail a try each, as before."""
    from balsam.transfer import TaskStatus
    module = module_for(tmp_path, make_backend(tmp_path))
    files = [TransferFile(f"/d/{n}", str(tmp_path / f"site/data/j{n}/f")) for n in range(2)]
    updates: dict = {}
    module._apply_status("globus:t", TaskStatus(TaskState.done, file_errors={files[1].dest: "boom"}),
                         items_of(files, "t", dt.datetime.now(dt.timezone.utc)), updates, dt.datetime.now(dt.timezone.utc))
    assert [updates[i]["state"] for i in (1, 2)] == ["done", "pending"]
    assert updates[2]["transfer_info"]["retry_after"]


@pytest.mark.parametrize("side, who", [("DESTINATION", "the destination collection's administrator"),
                                       ("SOURCE", "the source collection's administrator"),
                                       ("BOTH", "the administrators of both collections")])
def test_a_task_cancelled_by_an_administrator_says_so_with_the_message(tmp_path: Path, side: str, who: str) -> None:
    task_list(failed_doc(4, 0, canceled_by_admin=side, canceled_by_admin_message="Scratch is being purged;\nresubmit Monday",
                         fatal_error={"code": "CANCELED", "description": "canceled"}))
    status = make_backend(tmp_path).poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.failed and not status.retryable
    assert status.error == f"Globus task {TASK_ID} was cancelled by {who}: Scratch is being purged; resubmit Monday; not retried"
    assert status.info["cancelled_by"] == who


def test_a_cancel_balsam_asked_for_is_retried_and_keeps_the_delivered_files(tmp_path: Path) -> None:
    """The agent's deadline cancels the task (cancel_task); should its items be polled again (the
    update recording the failure was lost), the task is balsam's cancel, not the user's."""
    backend = make_backend(tmp_path)
    files = [TransferFile(f"/d/{n}", str(tmp_path / f"site/data/j{n}/f")) for n in range(4)]
    submit_stage_in(backend, files)
    responses.add(responses.POST, f"{TRANSFER}/task/{TASK_ID}/cancel", json={
        "DATA_TYPE": "result", "code": "Canceled", "message": "canceled", "resource": "/cancel", "request_id": "r"})
    backend.cancel(TASK_ID)
    task_list(failed_doc(4, 2, fatal_error={"code": "CANCELED", "description": "canceled"}))
    successful(files[0].dest, files[2].dest)
    status = backend.poll([TASK_ID])[TASK_ID]
    assert status.state == TaskState.done
    assert status.file_errors == {f.dest: f"not delivered: Globus task {TASK_ID} failed: cancelled by the balsam agent "
                                          "(transfers.task_timeout_sec)" for f in (files[1], files[3])}


def test_after_a_restart_a_cancel_at_the_agents_deadline_is_taken_for_balsams(tmp_path: Path) -> None:
    """The backend of a restarted agent does not remember the cancel: a task that ended at least
    task_timeout_sec after its submission may have met the previous agent's deadline (the agent
    never cancels earlier), so it is retried; one cancelled sooner was not balsam's."""
    backend = make_backend(tmp_path, task_timeout_sec=3600)
    start = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    for ended_after, retryable in ((3590, True), (1800, False)):
        responses.reset()
        task_list(failed_doc(4, 0, fatal_error={"code": "CANCELED", "description": "canceled"},
                             request_time=start.isoformat(),
                             completion_time=(start + dt.timedelta(seconds=ended_after)).isoformat()))
        status = backend.poll([TASK_ID])[TASK_ID]
        assert status.state == TaskState.failed and status.retryable is retryable, status
        assert ("cancelled by the balsam agent" in status.error) is retryable


# -- defect 4: a task Globus queues -----------------------------------------------------------------------------


def test_a_task_globus_queues_is_queued_and_its_deadline_waits(tmp_path: Path, caplog) -> None:
    """Globus runs 3 transfer tasks of a user at once; the others are ACTIVE with nice_status
    "Queued". The agent counted the deadline from the submission and cancelled a task that had
    waited its whole task_timeout_sec in Globus's queue. Its items say it waits in Globus's queue (they
    said "all its threads are busy", the local backend's case), and no "not moving" warning is logged."""
    backend = make_backend(tmp_path)
    task_list({**BASE, "task_id": "t-q", "status": "ACTIVE", "nice_status": "Queued", "is_paused": False, "faults": 0,
               "nice_status_short_description": "Queued", "files": 1, "files_transferred": 0})
    status = backend.poll(["t-q"])["t-q"]
    assert status.state == TaskState.active and status.queued
    assert status.reason == "queued by Globus: it runs at most 3 transfer tasks of a user at once, the others wait their turn"

    module = module_for(tmp_path, backend, task_timeout_sec=3600)
    submitted = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=5)
    items = items_of([TransferFile("/d/a", str(tmp_path / "site/data/j/a"))], "t-q", submitted)
    now = dt.datetime.now(dt.timezone.utc)
    updates: dict = {}
    with caplog.at_level(logging.DEBUG, logger="balsam.site.modules.transfers"):
        assert module._poll(items, updates, now) == 1
    assert updates[1]["state"] == "active" and updates[1]["transfer_info"]["queued"] is True
    assert updates[1]["transfer_info"]["reason"] == status.reason
    assert "threads" not in updates[1]["transfer_info"]["reason"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert not [c for c in responses.calls if c.request.url.endswith("/cancel")]  # not cancelled while queued


# -- defect 7: quota errors fail fast ----------------------------------------------------------------------------


@pytest.mark.parametrize("options, sent", [({}, True), ({"fail_on_quota_errors": False}, False)])
def test_fail_on_quota_errors_is_sent(tmp_path: Path, options: dict, sent: bool) -> None:
    """A full destination quota made Globus retry the task until its deadline (6 h per try)."""
    submit_stage_in(make_backend(tmp_path, **options), [TransferFile("/d/a", str(tmp_path / "a"))])
    assert json.loads(get_last_request().body)["fail_on_quota_errors"] is sent


# -- defect 10: option checks ------------------------------------------------------------------------------------


def settings(globus: dict, section: str = "") -> str:
    lines = "".join(f"      {key}: {value}\n" for key, value in globus.items())
    return (f"transfers:\n  transfer_locations:\n    aps: 'globus://{REMOTE_EP}'\n{section}"
            f"  backend_options:\n    globus:\n{lines}")


@pytest.mark.parametrize("key, value, problem", [
    ("http_retries", -1, "expected a number of retries, 0 or more"),
    ("endpoint_id", "not-a-uuid", "expected a Globus collection UUID"),
    ("client_id", "not-a-uuid", "expected the UUID of a native app"),
    ("endpoint_site_path", "relative/path", "expected an absolute path on the site's collection"),
])
def test_bad_globus_options_are_refused_with_their_line(key: str, value, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(settings({key: value}))
    (error,) = info.value.errors
    assert error.startswith(f"settings.yml:6 transfers.backend_options.globus.{key}: {problem}"), error
    assert "\n" not in error


# http_retries over 10 was valid before the bound: used as 10 with a warning, not refused (an upgraded
# agent must not stop at its start).
@pytest.mark.parametrize("key, value", [("http_retries", 0), ("http_retries", 10), ("http_retries", 20),
                                        ("http_retries", 1000000), ("endpoint_site_path", "'/~/site'"),
                                        ("endpoint_site_path", "/projects/me/site"), ("client_id", f"'{CLIENT_ID}'"),
                                        ("endpoint_id", f"'{SITE_EP}'")])
def test_good_globus_options_pass(key: str, value) -> None:
    loads_settings(settings({key: value}))


def test_a_bad_globus_endpoint_id_is_refused_naming_the_section_key() -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(settings({"sync_level": "size"}, section="  globus_endpoint_id: 'nope'\n"))
    assert any("transfers.globus_endpoint_id" in e and "'nope'" in e for e in info.value.errors), info.value.errors
    with pytest.raises(TransferError, match="expected a Globus collection UUID") as err:
        build_backend(GlobusTransfer, "globus", {"endpoint_id": "nope"})
    assert not err.value.retryable


# -- defect 11: a 401 refreshes the access token whatever http_retries is ----------------------------------------


def test_a_401_refreshes_the_access_token_with_http_retries_0(tmp_path: Path, monkeypatch) -> None:
    """globus-sdk refreshes an access token Globus refuses (401) as a retry: with http_retries 0 it
    never did, and a revoked access token read as "credentials expired or were revoked: run
    balsam site globus-login" for ever, though the refresh token was good."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": "RT", "access_token": "AT-old",
                       "expires_at_seconds": int(time.time()) + 3600})  # not expired as far as the agent knows
    refreshes: list = []

    def token(request):
        refreshes.append(urllib.parse.parse_qs(request.body)["refresh_token"])
        return (200, {}, json.dumps({"access_token": "AT-new", "expires_in": 3600, "token_type": "Bearer",
                                     "resource_server": "transfer.api.globus.org", "scope": "x", "other_tokens": []}))

    def transfer(request):
        if request.headers["Authorization"] != "Bearer AT-new":
            return (401, {}, json.dumps({"code": "AuthenticationFailed", "message": "Token is not active", "request_id": "r"}))
        return (202, {}, json.dumps(get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json))

    responses.add_callback(responses.POST, TOKEN_URL, callback=token, content_type="application/json")
    responses.add_callback(responses.POST, f"{TRANSFER}/transfer", callback=transfer, content_type="application/json")
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert refreshes == [["RT"]]
    assert json.loads(path.read_text())["access_token"] == "AT-new"


def test_a_revoked_refresh_token_still_asks_for_a_login_after_one_try(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    save_tokens(tmp_path / "home" / "globus-tokens.json", {
        "client_id": CLIENT_ID, "refresh_token": "RT", "access_token": "AT", "expires_at_seconds": int(time.time()) + 3600})
    responses.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=401, content_type="application/json",
                  json={"code": "AuthenticationFailed", "message": "Token is not active", "request_id": "r"})
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    with pytest.raises(TransferError, match="credentials expired or were revoked") as err:
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))])
    assert err.value.retryable
    assert calls("/oauth2/token") == 1 and calls("/v0.10/transfer") == 1


def test_http_retries_still_bounds_the_retries_of_5xx(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    save_tokens(tmp_path / "home" / "globus-tokens.json", {
        "client_id": CLIENT_ID, "refresh_token": "RT", "access_token": "AT", "expires_at_seconds": int(time.time()) + 3600})
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=502, content_type="application/json",
                  json={"code": "BadGateway", "message": "bad gateway", "request_id": "r"})
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    for retries, made in ((0, 0), (2, 2), (20, 10)):  # more than 10 (valid before the bound): 10 are made
        responses.calls.reset()
        backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": retries})
        with pytest.raises(TransferError, match="HTTP 502"):
            backend.poll(["t1"])
        assert calls("/task_list") == made + 1


# -- defect 8: globus-sdk's own log lines ------------------------------------------------------------------------


@pytest.fixture
def sdk_logger_level():
    sdk_logger = logging.getLogger("globus_sdk.transport")
    saved = sdk_logger.level
    sdk_logger.setLevel(logging.NOTSET)
    yield sdk_logger
    sdk_logger.setLevel(saved)


def test_globus_sdk_logs_no_warning_per_failed_request(tmp_path: Path, caplog, monkeypatch, sdk_logger_level) -> None:
    """Each failed request logged globus-sdk's "request reached max retries, done (fail, response)"
    at WARNING beside balsam's own line, every cycle of an outage."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    backend = make_backend(tmp_path)
    backend._client.retry_config.max_retries = 1
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=502, content_type="application/json",
                  json={"code": "BadGateway", "message": "bad gateway", "request_id": "r"})
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with pytest.raises(TransferError, match="HTTP 502"):
                backend.poll(["t1"])
    assert not [r for r in caplog.records if r.name.startswith("globus_sdk")], caplog.records
    assert sdk_logger_level.level == logging.ERROR

    # A level someone configured is left alone.
    sdk_logger_level.setLevel(logging.DEBUG)
    make_backend(tmp_path)
    assert sdk_logger_level.level == logging.DEBUG
