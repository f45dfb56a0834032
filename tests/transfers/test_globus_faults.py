"""Faults of the Globus plugin and the transfers module around it, against globus-sdk's own testing
fixtures (``globus_sdk.testing``; a mocked error answer carries ``content_type`` JSON so globus-sdk
reads its code): logging in again while the agent runs, refused polls, refused re-sends of journaled
batches, refusals the user can fix, stage-out to the site's own collection, tasks looping on a fault
or paused, Globus Auth down while refreshing, and "will retry" logged once per reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_last_request, get_response_set

from balsam.cli.transfer import _note
from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferError, TransferFile, build_backend
from balsam_transfer_globus.auth import login, save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses, stage_in_site  # noqa: F401
from test_transfer_module_refusals import FakeAPI

pytestmark = pytest.mark.usefixtures("mocked_responses")

CLIENT_ID = "33333333-3333-3333-3333-333333333333"
JOURNALED_TOKEN = "aaaaaaaa-0000-0000-0000-000000000042"
TRANSFER = "https://transfer.api.globus.org/v0.10"
TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
LOGIN = f"balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
CONSENT = {"code": "ConsentRequired", "message": "Missing required data_access consent", "request_id": "abc",
           "resource": "/v0.10/transfer",
           "required_scopes": [f"urn:globus:auth:scope:transfer.api.globus.org:all"
                               f"[*https://auth.globus.org/scopes/{REMOTE_EP}/data_access]"]}
SESSION = {"code": "AuthorizationRequired", "message": "You must authenticate with a nersc.gov identity within 12h",
           "request_id": "r", "authorization_parameters": {"session_message": "session too old",
                                                           "session_required_single_domain": ["nersc.gov"]}}


def file_backend() -> GlobusTransfer:
    """A backend as the agent builds it: its client comes from the tokens file."""
    return build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})


def write_login(path: Path, refresh: str, access: str, expires_in: int = 170000) -> None:
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": refresh, "access_token": access,
                       "expires_at_seconds": int(time.time()) + expires_in})


def token_answer(access: str, refresh: str = "") -> dict:
    answer = {"access_token": access, "scope": "x", "expires_in": 172800, "token_type": "Bearer",
              "resource_server": "transfer.api.globus.org", "other_tokens": []}
    return {**answer, "refresh_token": refresh} if refresh else answer


def module_for(tmp_path: Path, **options) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path / "site"), data_path=str(tmp_path / "site" / "data"), site_id=1)
    return TransfersModule(site_config, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                         globus_endpoint_id=SITE_EP, max_attempts=3, **options),
                           client=None)


def task_list(*docs: dict) -> None:
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": list(docs), "DATA_TYPE": "task_list", "length": len(docs), "limit": 1000, "offset": 0, "total": len(docs)})


def submit(backend: GlobusTransfer, tmp_path: Path) -> str:
    return backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))])


# -- F1: logging in again while the agent runs --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["revoked", "consent"])
def test_a_new_login_is_used_by_the_running_agent(tmp_path: Path, monkeypatch, fault: str) -> None:
    """The agent said "run `balsam site globus-login`"; the user did, but the running agent kept the
    client it built at start and failed on every cycle until restarted."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"

    def token(request):
        body = urllib.parse.parse_qs(request.body)
        if body.get("refresh_token") == ["r-old"]:
            return (400, {}, json.dumps({"error": "invalid_grant"}))
        return (200, {}, json.dumps(token_answer("new-access")))

    def transfer(request):
        if request.headers["Authorization"] == "Bearer old-access":
            return (403, {}, json.dumps(CONSENT))
        return (202, {}, json.dumps(OK_SUBMIT))

    responses.add_callback(responses.POST, TOKEN_URL, callback=token, content_type="application/json")
    responses.add_callback(responses.POST, f"{TRANSFER}/transfer", callback=transfer, content_type="application/json")
    # revoked: the access token expired and its refresh token was revoked; consent: a GCS v5
    # collection wants a data_access consent the login lacked.
    write_login(path, "r-old", "old-access", expires_in=-60 if fault == "revoked" else 170000)
    backend = file_backend()
    for _ in range(2):
        with pytest.raises(TransferError, match=f"run `{LOGIN}`") as err:
            submit(backend, tmp_path)
        assert err.value.retryable
    write_login(path, "r-new", "good-access")  # what `balsam site globus-login` writes
    assert submit(backend, tmp_path) == OK_SUBMIT["task_id"]
    assert get_last_request().headers["Authorization"] == "Bearer good-access"


def test_a_changed_tokens_file_replaces_the_client_before_any_error(tmp_path: Path, monkeypatch) -> None:
    """A login run to add a collection's consent is used at the next call, not after a failure."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    write_login(path, "r-old", "old-access")
    backend = file_backend()
    submit(backend, tmp_path)
    assert get_last_request().headers["Authorization"] == "Bearer old-access"
    write_login(path, "r-new", "good-access")
    submit(backend, tmp_path)
    assert get_last_request().headers["Authorization"] == "Bearer good-access"


def test_a_refresh_never_overwrites_a_newer_login(tmp_path: Path, monkeypatch) -> None:
    """The refresh callback saved the tokens read at start plus the refreshed access token, putting
    the old refresh token back over the one `globus-login` had just written: even a restarted
    agent then failed."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    responses.add_callback(responses.POST, TOKEN_URL, content_type="application/json", callback=lambda request: (
        200, {}, json.dumps(token_answer("good-access" if "r-new" in request.body else "refreshed-old"))))
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    write_login(path, "r-old", "old-access", expires_in=-60)
    backend = file_backend()
    client = backend.client()
    write_login(path, "r-new", "good-access")  # the user logs in while a request is on its way
    client.get_submission_id()  # the client refreshes its (expired) access token with r-old
    saved = json.loads(path.read_text())
    assert (saved["refresh_token"], saved["access_token"]) == ("r-new", "good-access")
    submit(backend, tmp_path)  # and the next call uses the new login
    assert get_last_request().headers["Authorization"] == "Bearer good-access"

    # The file still holding this client's login: the refreshed access token is written (a rotated
    # refresh token too), over what the file holds now, 0600.
    save_tokens(path, {**json.loads(path.read_text()), "expires_at_seconds": int(time.time()) - 60, "note": "kept"})
    fresh = file_backend()
    responses.replace(responses.POST, TOKEN_URL, json=token_answer("good-access-2", "r-rotated"))
    fresh.client().get_submission_id()
    saved = json.loads(path.read_text())
    assert (saved["refresh_token"], saved["access_token"], saved["note"]) == ("r-rotated", "good-access-2", "kept")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Its own write is not taken for a new login: the client stays.
    assert fresh.client() is fresh.client()


# -- F7: Globus Auth down while refreshing -------------------------------------------------------------------


def test_globus_auth_down_while_refreshing_is_not_a_revoked_login(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    write_login(tmp_path / "home" / "globus-tokens.json", "r", "stale", expires_in=-60)
    responses.add(responses.POST, TOKEN_URL, status=503, json={"error": "temporarily_unavailable"})
    with pytest.raises(TransferError) as err:
        submit(file_backend(), tmp_path)
    assert err.value.retryable
    assert str(err.value).startswith("Globus Auth unavailable (HTTP 503)") and "globus-login" not in str(err.value)


# -- F2: a refused poll ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status, body", [
    (400, {"code": "ClientError.BadRequest", "message": "Invalid filter: task_id 'x'", "request_id": "r"}),
    (403, SESSION),
])
def test_a_refused_poll_leaves_the_items_in_flight(tmp_path: Path, caplog, status: int, body: dict) -> None:
    """One 4xx answer to the cycle's task_list failed every in-flight Globus item ("cannot succeed;
    its job fails") and forgot their tasks while Globus might still be writing into the workdirs."""
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=status, json=body, content_type="application/json")
    module = module_for(tmp_path)
    module.backends["globus"] = make_backend(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    items = [{"id": i, "job_id": i, "direction": "in", "state": "active", "recursive": False, "local_path": "x",
              "remote_path": "/d/x", "task_id": f"globus:task-{i % 2}",
              "transfer_info": {"dest": f"/s/{i}", "submitted": now.isoformat()}} for i in range(1, 5)]
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.transfers"):
        updates: dict = {}
        assert module._poll(items, updates, now) == 2
        assert all("state" not in u for u in updates.values()) and sorted(updates) == [1, 2, 3, 4]
        reason = updates[1]["transfer_info"]["reason"]
        assert reason.startswith("cannot poll its task: ") and "error" not in updates[1]["transfer_info"]
        assert module._finished_tasks == set()
        for item in items:
            item["transfer_info"] = updates[item["id"]]["transfer_info"]
        again: dict = {}
        assert module._poll(items, again, now) == 2 and again == {}  # nothing new to record
    assert len([r for r in caplog.records if "polling 2 tasks failed" in r.message]) == 1  # once per reason

    # The deadline still applies: past task_timeout_sec the task is cancelled and its items fail a try.
    for task in ("task-0", "task-1"):
        responses.add(responses.POST, f"{TRANSFER}/task/{task}/cancel", json={
            "DATA_TYPE": "result", "code": "Canceled", "message": "canceled", "resource": f"/task/{task}/cancel",
            "request_id": "r"})
    late = now + dt.timedelta(seconds=module.options.task_timeout_sec + 1)
    updates = {}
    assert module._poll(items, updates, late) == 0
    assert {u["state"] for u in updates.values()} == {"pending"}
    assert all(u["transfer_info"]["attempts"] == 1 and "task_timeout_sec" in u["transfer_info"]["error"]
               for u in updates.values())


# -- F4: refusals the user can fix ---------------------------------------------------------------------------


def test_a_session_requirement_waits_for_a_new_login(tmp_path: Path) -> None:
    """A collection's policy (a nersc.gov identity, a recent login) was "refused the request", not
    retryable: every job of the batch failed at once."""
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=403, json=SESSION, content_type="application/json")
    with pytest.raises(TransferError) as err:
        submit(make_backend(tmp_path), tmp_path)
    assert err.value.retryable
    assert str(err.value) == (f"Globus needs a new login session (session too old; log in with an identity from "
                              f"nersc.gov): run `{LOGIN} --session-domain nersc.gov`")


def test_login_with_a_session_domain_asks_for_a_fresh_login_of_that_domain(tmp_path: Path) -> None:
    responses.add(responses.POST, TOKEN_URL, json=token_answer("access", "refresh"))
    shown: list[str] = []
    login(CLIENT_ID, [SITE_EP], tmp_path / "t.json", prompt=lambda _: "code", echo=shown.append,
          session_domains=["nersc.gov"])
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown[1].strip()).query)
    assert query["session_required_single_domain"] == ["nersc.gov"] and query["prompt"] == ["login"]


@pytest.mark.parametrize("message", [f"No such endpoint '{SITE_EP}'", "Endpoint not found"])
def test_an_unknown_site_collection_is_a_settings_error_jobs_wait_for(tmp_path: Path, message: str) -> None:
    """A typo in transfers.globus_endpoint_id failed up to max_concurrent x batch_size jobs a cycle."""
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": message, "request_id": "r"})
    # An error naming no collection: Globus is asked about the site's.
    responses.add(responses.GET, f"{TRANSFER}/endpoint/{SITE_EP}", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": "not found", "request_id": "r"})
    with pytest.raises(TransferError) as err:
        submit(make_backend(tmp_path), tmp_path)
    assert err.value.retryable
    assert str(err.value) == (f"Globus does not know this site's collection {SITE_EP} (HTTP 404 EndpointNotFound): "
                              "check transfers.globus_endpoint_id in settings.yml, then restart the agent")


def test_an_unknown_location_collection_still_fails_its_jobs(tmp_path: Path) -> None:
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": "Endpoint not found", "request_id": "r"})
    responses.add(responses.GET, f"{TRANSFER}/endpoint/{SITE_EP}", json={"DATA_TYPE": "endpoint", "id": SITE_EP})
    with pytest.raises(TransferError, match="refused the request \\(HTTP 404 EndpointNotFound\\)") as err:
        submit(make_backend(tmp_path), tmp_path)
    assert not err.value.retryable


# -- F3: a journaled batch refused for good ------------------------------------------------------------------


def _journaled(tmp_path: Path, item_id: int, alias: str = "aps") -> tuple[TransfersModule, FakeAPI]:
    """A module (its API an in-memory fake) whose journal holds one batch sent with a token whose
    task id was never recorded: its next cycle sends it again with that token."""
    item = {"id": item_id, "job_id": 7, "direction": "in", "state": "pending", "recursive": False, "local_path": "raw.h5",
            "remote_path": "/data/raw.h5", "location_alias": alias, "task_id": "", "transfer_info": {}}
    api = FakeAPI([item], [{"id": 7, "workdir": "job7", "state": "READY"}])
    module = module_for(tmp_path)
    module.client = api
    module.backends["globus"] = make_backend(tmp_path)
    Path(module.journal_path).parent.mkdir(parents=True, exist_ok=True)
    Path(module.journal_path).write_text(json.dumps(
        {"token": JOURNALED_TOKEN, "alias": alias, "direction": "in",
         "files": [[item_id, "/data/raw.h5", "/s/raw.h5", False]]}) + "\n")
    return module, api


@pytest.mark.parametrize("fault", ["collection gone", "alias removed"])
def test_a_journaled_batch_refused_for_good_fails_its_items_once(tmp_path: Path, fault: str) -> None:
    """A batch whose submission timed out (token journaled, no task id) and that Globus then refused
    for good was sent again every cycle forever, its items pending with no reason and no try used.
    Refused by the service, each item fails a try (as a first submission refused for good: backoff,
    then max_attempts); an alias gone from settings.yml fails them at once (as a first submission)."""
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": f"No such endpoint '{REMOTE_EP}'", "request_id": "r"})
    module, api = _journaled(tmp_path, 5, alias="aps" if fault == "collection gone" else "gone")
    module.run_cycle()
    assert not Path(module.journal_path).exists()  # out of the journal
    after = api.items[5]
    state = "pending" if fault == "collection gone" else "error"
    assert after["state"] == state and after["transfer_info"]["attempts"] == 1
    assert ("retry_after" in after["transfer_info"]) is (state == "pending")
    expected = "refused the request (HTTP 404" if fault == "collection gone" else "unknown transfer location 'gone'"
    assert expected in after["transfer_info"]["error"]
    posts = [c for c in responses.calls if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]
    assert len(posts) == (1 if fault == "collection gone" else 0)
    if posts:
        assert json.loads(posts[0].request.body)["submission_id"] == JOURNALED_TOKEN  # sent with its token


def test_a_journaled_batch_that_may_work_later_waits_with_the_reason(tmp_path: Path, caplog) -> None:
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=503, content_type="application/json",
                  json={"code": "ServiceUnavailable", "message": "maintenance", "request_id": "r"})
    module, api = _journaled(tmp_path, 5)
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.transfers"):
        for _ in range(2):
            module.run_cycle()
            lines = Path(module.journal_path).read_text().splitlines()
            assert [json.loads(line)["token"] for line in lines] == [JOURNALED_TOKEN]  # kept, no new token
            after = api.items[5]
            assert after["state"] == "pending" and not after["transfer_info"].get("attempts")
            assert "maintenance" in after["transfer_info"]["reason"]
    posts = [c for c in responses.calls if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]
    assert len(posts) == 2 and {json.loads(c.request.body)["submission_id"] for c in posts} == {JOURNALED_TOKEN}
    assert len([r for r in caplog.records if "journaled batch" in r.message]) == 1


def test_a_journaled_batch_refused_for_good_leaves_the_journal(balsam_env, tmp_path: Path) -> None:
    """Through run_cycle with a real API: one POST, the item fails a try, the journal is gone (was: a
    POST every cycle, the item pending without an error, the journal kept). With no backoff, the next
    cycles send it again in new batches (new submission ids) until its tries run out: its job fails."""
    responses.add_passthru(balsam_env.url)
    client, site_path, site, job, item = stage_in_site(tmp_path, "tok")
    (site_path / JOURNAL_NAME).write_text(json.dumps(
        {"token": "aaaaaaaa-0000-0000-0000-000000000042", "alias": "aps", "direction": "in",
         "files": [[item["id"], "/data/raw.h5", str(Path(site.data_path) / "t/0/raw.h5"), False]]}) + "\n")
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": f"No such endpoint '{REMOTE_EP}'", "request_id": "r"})
    module = TransfersModule(site, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                    globus_endpoint_id=SITE_EP, max_attempts=3, retry_backoff_sec=0),
                             client)
    module.backends["globus"] = make_backend(tmp_path)
    module.run_cycle()
    posts = [c for c in responses.calls if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]
    after = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert len(posts) == 1 and after["state"] == "pending" and after["transfer_info"]["attempts"] == 1
    assert not (site_path / JOURNAL_NAME).exists()
    for _ in range(3):
        module.run_cycle()
    posts = [c for c in responses.calls if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]
    after = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert len(posts) == 3 and after["state"] == "error" and "HTTP 404" in after["transfer_info"]["error"]
    assert client.get(f"/jobs/{job.id}")["state"] == "FAILED"
    assert not (site_path / JOURNAL_NAME).exists()


# -- F5: stage-out to the site's own collection --------------------------------------------------------------


def test_a_stage_out_to_the_sites_own_collection_fails_only_the_skipped_file(tmp_path: Path) -> None:
    """The skipped file's destination was mapped as a site path (the destination collection is the
    site's), matched no item, and every job of the batch was charged a try."""
    task_list({**BASE, "task_id": "t1", "status": "SUCCEEDED", "subtasks_skipped_errors": 1, "label": "balsam stage-out (3 files)",
               "source_endpoint_id": SITE_EP, "destination_endpoint_id": SITE_EP, "files": 3, "files_transferred": 2})
    responses.add(responses.GET, f"{TRANSFER}/task/t1/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": "No such file",
                  "source_path": "/projects/me/site/data/j2/out.h5", "destination_path": "/projects/shared/j2/out.h5",
                  "is_directory": False, "is_symlink": False, "error_time": "2026-11-30T18:00:00+00:00"}]})
    status = make_backend(tmp_path, endpoint_site_path="/projects/me/site").poll(["t1"])["t1"]
    assert status.file_errors == {"/projects/shared/j2/out.h5": "FILE_NOT_FOUND: No such file"}
    module = module_for(tmp_path)
    items = [{"id": j, "job_id": j, "direction": "out", "state": "active", "recursive": False, "local_path": "out.h5",
              "remote_path": f"/projects/shared/j{j}/out.h5", "task_id": "globus:t1",
              "transfer_info": {"dest": f"/projects/shared/j{j}/out.h5"}} for j in (1, 2, 3)]
    updates: dict = {}
    module._apply_status("globus:t1", status, items, updates, dt.datetime.now(dt.timezone.utc))
    assert [updates[j]["state"] for j in (1, 2, 3)] == ["done", "pending", "done"]
    assert updates[2]["transfer_info"]["error"] == "FILE_NOT_FOUND: No such file"


# -- F6: a task looping on a fault, or paused ----------------------------------------------------------------


def test_a_task_looping_on_a_fault_or_paused_says_so(tmp_path: Path, caplog) -> None:
    """`balsam transfer ls` showed "task: 0/1 files" for 6 h x max_attempts, and nothing was logged.
    The reason holds no fault counter (it is in the task's info): the agent logs a reason again
    whenever its text changes, and "57 faults so far" became "58 ..." at every poll."""
    def docs(faults: int) -> tuple[dict, ...]:
        return ({**BASE, "task_id": "t-fault", "status": "ACTIVE", "nice_status": "PERMISSION_DENIED", "faults": faults,
                 "files": 1, "files_transferred": 0, "nice_status_short_description": "Permission denied"},
                {**BASE, "task_id": "t-paused", "status": "ACTIVE", "nice_status": "PAUSED_BY_ADMIN", "is_paused": True,
                 "files": 1, "files_transferred": 0, "nice_status_short_description": "Paused by an activity manager"},
                {**BASE, "task_id": "t-ok", "status": "ACTIVE", "nice_status": "OK", "files": 1, "files_transferred": 0})

    module = module_for(tmp_path)
    module.backends["globus"] = make_backend(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    items = [{"id": i, "job_id": i, "direction": "out", "state": "active", "recursive": False, "local_path": "o",
              "remote_path": "/proj/o", "task_id": f"globus:{t}", "transfer_info": {"dest": "/proj/o", "submitted": now.isoformat()}}
             for i, t in ((1, "t-fault"), (2, "t-paused"), (3, "t-ok"))]
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.transfers"):
        for faults in (57, 58, 59):
            responses.reset()
            task_list(*docs(faults))
            updates: dict = {}
            assert module._poll(items, updates, now) == 3
            for item in items:
                item.update(updates.get(item["id"], {}))
    # The counter is in the task's figures (the agent keeps them in transfer_info.task).
    assert module.backends["globus"].poll(["t-fault"])["t-fault"].info["faults"] == 59
    shown = {item["id"]: _note(item) for item in items}
    assert shown[1] == "Globus keeps retrying: Permission denied (PERMISSION_DENIED) (task: 0/1 files)"
    assert shown[2] == "paused in Globus: Paused by an activity manager (PAUSED_BY_ADMIN) (task: 0/1 files)"
    assert shown[3] == "task: 0/1 files"
    warned = [r.message for r in caplog.records if "is not moving" in r.message]
    assert len(warned) == 2 and any("globus:t-fault" in m for m in warned) and any("globus:t-paused" in m for m in warned)


# -- "will retry" logged once per reason ----------------------------------------------------------------------


def test_a_submission_failing_while_logged_out_is_logged_once(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    module = module_for(tmp_path)
    module.workdirs[7] = ("job7", "READY")
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.transfers"):
        for _ in range(3):
            item = {"id": 5, "job_id": 7, "direction": "in", "state": "pending", "recursive": False, "local_path": "raw.h5",
                    "remote_path": "/data/raw.h5", "location_alias": "aps", "task_id": "", "transfer_info": {}}
            module._submit([item], 1, {}, dt.datetime.now(dt.timezone.utc))
    assert len([r for r in caplog.records if "failed (will retry)" in r.message]) == 1


def test_a_requirement_of_consent_only_asks_for_the_consent(tmp_path: Path) -> None:
    """An AuthorizationRequired naming only scopes (no session): a consent, not a refusal."""
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=403, content_type="application/json", json={
        "code": "AuthorizationRequired", "message": "consent needed", "request_id": "r",
        "authorization_parameters": {"session_message": "consent needed", "required_scopes": CONSENT["required_scopes"]}})
    with pytest.raises(TransferError) as err:
        submit(make_backend(tmp_path), tmp_path)
    assert err.value.retryable
    assert str(err.value) == f"Globus needs your consent to reach these collections: run `{LOGIN}`"
