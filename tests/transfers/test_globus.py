"""The Globus plugin against globus-sdk's own testing fixtures (``globus_sdk.testing``: registered
real-shaped responses of the Transfer and Auth APIs, served through ``responses``): submit, task
list, skipped errors, consent required, expired credentials, 502s, the login command, and the
transfers agent module resuming a Globus task after a restart instead of submitting it again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from click.testing import CliRunner
from globus_sdk.testing import RegisteredResponse, get_last_request, get_response_set, load_response
from globus_sdk.transport import RetryConfig
from responses import matchers

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferError, TransferFile, TransferLocation, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer
from balsam_transfer_globus.hooks import globus_login
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses, stage_in_site  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")

TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]


def sent_json() -> dict:
    return json.loads(get_last_request().body)


def test_submit_rewrites_site_paths_and_sets_the_task_options(tmp_path: Path) -> None:
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend = make_backend(tmp_path, endpoint_site_path="/~/balsam-site")
    site = tmp_path / "site"
    task = backend.submit(LOCATION, TransferDirection.stage_in, [
        TransferFile("/data/run1/in.h5", str(site / "data/job1/in.h5")),
        TransferFile("/data/run1/dir", str(site / "data/job2/dir"), recursive=True),
    ])
    assert task == TASK_ID
    body = sent_json()
    assert (body["source_endpoint"], body["destination_endpoint"]) == (REMOTE_EP, SITE_EP)
    assert [(d["source_path"], d["destination_path"], d.get("recursive")) for d in body["DATA"]] == [
        ("/data/run1/in.h5", "/~/balsam-site/data/job1/in.h5", False),
        ("/data/run1/dir", "/~/balsam-site/data/job2/dir", True),
    ]
    assert body["sync_level"] == 1  # "size"
    assert body["verify_checksum"] is True and body["encrypt_data"] is True and body["skip_source_errors"] is True
    assert body["notify_on_succeeded"] is False

    # Without endpoint_site_path the local paths go as they are, never an empty batch (0.7's bug).
    load_response(globus_sdk.TransferClient.submit_transfer)
    plain = make_backend(tmp_path)
    plain.submit(LOCATION, TransferDirection.stage_out, [TransferFile(str(site / "data/job1/out.txt"), "/results/out.txt")])
    body = sent_json()
    assert (body["source_endpoint"], body["destination_endpoint"]) == (SITE_EP, REMOTE_EP)
    assert [(d["source_path"], d["destination_path"]) for d in body["DATA"]] == [(str(site / "data/job1/out.txt"), "/results/out.txt")]


def test_a_path_outside_the_site_cannot_be_mapped(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    with pytest.raises(TransferError, match="outside the site directory") as err:
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/r", "/etc/passwd")])
    assert not err.value.retryable


def test_poll_many_tasks_in_one_call(tmp_path: Path) -> None:
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    docs = [
        {**base, "task_id": "t-ok", "status": "SUCCEEDED", "files": 2, "files_transferred": 2},
        {**base, "task_id": "t-run", "status": "ACTIVE", "nice_status": "Queued"},
        {**base, "task_id": "t-paused", "status": "INACTIVE", "nice_status_short_description": "auth expired"},
        {**base, "task_id": "t-bad", "status": "FAILED",
         "fatal_error": {"code": "PERMISSION_DENIED", "description": "permission denied on /data/x"}},
    ]
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list",
                  json={"DATA": docs, "DATA_TYPE": "task_list", "length": 4, "limit": 5, "offset": 0, "total": 4})
    # The one task the list leaves out is asked for by id: Globus no longer has it.
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task/t-gone", status=404,
                  json={"code": "ClientError.NotFound", "message": "Task t-gone not found", "request_id": "r"})
    backend = make_backend(tmp_path)
    statuses = backend.poll(["t-ok", "t-run", "t-paused", "t-bad", "t-gone"])
    assert [urllib.parse.urlsplit(c.request.url).path for c in responses.calls] == [
        "/v0.10/task_list", "/v0.10/task/t-gone"]  # one list for all, one call for the missing one only
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(responses.calls[0].request.url).query)
    assert query["filter"] == ["task_id:t-ok,t-run,t-paused,t-bad,t-gone"]
    assert statuses["t-ok"].state == TaskState.done and statuses["t-ok"].info["files_transferred"] == 2
    assert statuses["t-run"].state == TaskState.active
    assert statuses["t-paused"].state == TaskState.inactive and "globus-login" in statuses["t-paused"].error
    assert statuses["t-bad"].state == TaskState.failed and "permission denied on /data/x" in statuses["t-bad"].error
    assert statuses["t-gone"].state == TaskState.unknown
    assert statuses["t-gone"].error == "Globus does not know task t-gone (HTTP 404 ClientError.NotFound)"


def test_skipped_source_errors_fail_only_those_files(tmp_path: Path) -> None:
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    doc = {**base, "task_id": "t1", "status": "SUCCEEDED", "subtasks_skipped_errors": 1,
           "destination_endpoint_id": SITE_EP}
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list",
                  json={"DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1, "offset": 0, "total": 1})
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task/t1/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": "No such file",
                  "source_path": "/data/missing.h5", "destination_path": "/~/site/data/job7/in.h5",
                  "is_directory": False, "is_symlink": False, "error_time": "2026-11-30T18:00:00+00:00"}],
    })
    backend = make_backend(tmp_path, endpoint_site_path="/~/site")
    status = backend.poll(["t1"])["t1"]
    local = str(tmp_path / "site" / "data" / "job7" / "in.h5")
    assert status.state == TaskState.done and status.file_errors == {local: "FILE_NOT_FOUND: No such file"}


def test_consent_required_names_the_login_command(tmp_path: Path) -> None:
    responses.add(responses.POST, "https://transfer.api.globus.org/v0.10/transfer", status=403, json={
        "code": "ConsentRequired", "message": "Missing required data_access consent",
        "request_id": "abc", "resource": "/v0.10/transfer",
        "required_scopes": [f"urn:globus:auth:scope:transfer.api.globus.org:all[*https://auth.globus.org/scopes/{REMOTE_EP}/data_access]"],
    })
    backend = make_backend(tmp_path)
    with pytest.raises(TransferError) as err:
        backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "site/data/a"))])
    assert err.value.retryable
    assert str(err.value) == (f"Globus needs your consent to reach these collections: "
                              f"run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}`")


def test_502_is_retryable_and_400_is_not(tmp_path: Path) -> None:
    responses.add(responses.POST, "https://transfer.api.globus.org/v0.10/transfer", status=502,
                  json={"code": "ExternalError.DirListingFailed.ServerError", "message": "Bad gateway", "request_id": "x"})
    backend = make_backend(tmp_path)
    files = [TransferFile("/a", str(tmp_path / "site/data/a"))]
    with pytest.raises(TransferError, match="unavailable \\(HTTP 502") as err:
        backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert err.value.retryable
    responses.reset()
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer, case="failure")
    with pytest.raises(TransferError, match="refused the request \\(HTTP 400 ClientError.BadRequest.NoTransferItems") as err:
        backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert not err.value.retryable
    responses.reset()
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list", status=503, json={"code": "ServiceUnavailable"})
    with pytest.raises(TransferError, match="HTTP 503") as err:
        backend.poll(["t1"])
    assert err.value.retryable


def test_not_logged_in_and_expired_credentials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    files = [TransferFile("/a", str(tmp_path / "a"))]
    with pytest.raises(TransferError, match=f"not logged in to Globus .*run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}`") as err:
        backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert err.value.retryable

    save_tokens(tmp_path / "home" / "globus-tokens.json", {
        "client_id": "33333333-3333-3333-3333-333333333333", "refresh_token": "secret-refresh",
        "access_token": "stale-access", "expires_at_seconds": int(time.time()) - 60,
    })
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens, case="invalid_grant")
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    with pytest.raises(TransferError) as err:
        backend.submit(LOCATION, TransferDirection.stage_in, files)
    assert str(err.value) == f"Globus credentials expired or were revoked: run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP}`"
    assert "secret" not in str(err.value)


def test_the_not_logged_in_reason_names_the_collections_of_every_globus_location(tmp_path: Path, monkeypatch) -> None:
    """The backend learnt a location's collection only in submit_batch, after submission_token()
    had already failed: the waiting item's reason named only the site's collection, and a login
    following it would lack the consent for the remote one."""
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    module = _transfers_module(tmp_path, backend_options={"globus": {"tokens_file": str(tmp_path / "none.json")}})
    site = tmp_path / "site"
    module.workdirs[7] = ("job7", "READY")
    item = {"id": 5, "job_id": 7, "direction": "in", "state": "pending", "recursive": False, "local_path": "raw.h5",
            "remote_path": "/data/raw.h5", "location_alias": "aps", "task_id": "", "transfer_info": {}}
    updates: dict = {}
    assert module._submit([item], 1, updates, dt.datetime.now(dt.timezone.utc)) == (0, [])
    reason = updates[5]["transfer_info"]["reason"]
    assert reason.startswith(f"not logged in to Globus ({tmp_path / 'none.json'} missing)")
    assert f"run `balsam site globus-login -e {SITE_EP} -e {REMOTE_EP} --tokens-file {tmp_path / 'none.json'}`" in reason
    assert "state" not in updates[5]  # waiting, no try used
    assert (site / "data" / "job7").is_dir()
    assert not responses.calls  # nothing was sent


def test_a_task_whose_items_were_deleted_is_cancelled_once(tmp_path: Path, caplog) -> None:
    """A deleted job's (or campaign's) Globus task ran to its end: the module never called cancel."""
    task_id = load_response(globus_sdk.TransferClient.cancel_task).metadata["task_id"]
    gets: list = []
    module = _transfers_module(tmp_path)
    # The API has none of the task's items left (deleted with their jobs).
    module.client = SimpleNamespace(get=lambda path, params=None: gets.append((path, params)) or {"count": 0, "results": []})
    module.backends["globus"] = make_backend(tmp_path)
    module.tracked_tasks = {f"globus:{task_id}": {5, 6}}
    with caplog.at_level("INFO", logger="balsam.site.modules.transfers"):
        module._cancel_orphaned_tasks([])
        module._cancel_orphaned_tasks([])
    cancels = [c for c in responses.calls if c.request.url.endswith(f"/task/{task_id}/cancel")]
    assert len(cancels) == 1 and module.tracked_tasks == {}
    assert len(gets) == 1 and sorted(gets[0][1]["id"]) == [5, 6]  # one GET for all of them
    assert f"transfer task globus:{task_id} cancelled" in caplog.text

    # Already finished: said so, and forgotten all the same.
    responses.add(responses.POST, f"https://transfer.api.globus.org/v0.10/task/{task_id}/cancel", json={
        "DATA_TYPE": "result", "code": "TaskComplete", "message": "The task completed before it could be cancelled.",
        "resource": f"/task/{task_id}/cancel", "request_id": "abc"})
    responses.calls.reset()
    module.tracked_tasks = {f"globus:{task_id}": {5}}
    caplog.clear()
    with caplog.at_level("INFO", logger="balsam.site.modules.transfers"):
        module._cancel_orphaned_tasks([])
    assert module.tracked_tasks == {} and "had already finished" in caplog.text


def test_refreshed_tokens_are_saved_and_used(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "home" / "globus-tokens.json"
    save_tokens(path, {"client_id": "33333333-3333-3333-3333-333333333333", "refresh_token": "r1",
                       "access_token": "old", "expires_at_seconds": int(time.time()) - 60})
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens)  # the refresh answer
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP})
    assert backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))]) == TASK_ID
    assert get_last_request().headers["Authorization"] == "Bearer transfer_access_token"
    saved = json.loads(path.read_text())
    assert saved["access_token"] == "transfer_access_token" and saved["refresh_token"] == "r1"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_globus_login_stores_the_refresh_token_0600(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    exchange = get_response_set(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens).lookup("default")
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token",
                  json={**exchange.json, "refresh_token": "the-refresh-token"})
    result = CliRunner().invoke(globus_login, ["--client-id", "33333333-3333-3333-3333-333333333333", "-e", REMOTE_EP],
                                input="the-code\n")
    assert result.exit_code == 0, result.output
    assert "https://auth.globus.org/v2/oauth2/authorize?" in result.output
    assert "the-refresh-token" not in result.output and "transfer_access_token" not in result.output
    assert "Authorization code:" in result.output and "the-code" not in result.output  # a credential: not echoed
    sent = urllib.parse.parse_qs(get_last_request().body)
    assert sent["code"] == ["the-code"] and sent["grant_type"] == ["authorization_code"]
    authorize = result.output.split("https://auth.globus.org/v2/oauth2/authorize?", 1)[1].split()[0]
    scope = urllib.parse.parse_qs(authorize)["scope"][0]
    assert f"https://auth.globus.org/scopes/{REMOTE_EP}/data_access" in scope
    path = tmp_path / "home" / "globus-tokens.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["refresh_token"] == "the-refresh-token" and saved["collections"] == [REMOTE_EP]

    no_client = CliRunner().invoke(globus_login, ["--tokens-file", str(tmp_path / "other.json")], env={"BALSAM_GLOBUS_CLIENT_ID": ""})
    assert no_client.exit_code != 0 and "register a native app" in no_client.output


def test_the_section_keys_reach_the_backend(tmp_path: Path) -> None:
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    site_config = SimpleNamespace(site_path=tmp_path, data_path=tmp_path / "data", site_id=1)
    module = TransfersModule(site_config, TransfersOptions(
        transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP,
        globus_endpoint_site_path="/~/site", backend_options={"globus": {"sync_level": "checksum"}},
    ), client=None)
    backend = module.backend("globus")
    assert (backend.options.endpoint_id, backend.options.endpoint_site_path, backend.options.sync_level) == (
        SITE_EP, "/~/site", "checksum")
    assert backend.site_path == str(tmp_path)


@pytest.mark.parametrize("max_concurrent, deadline", [(5, "2030-01-01T16:10:00+00:00"), (3, "2030-01-01T14:10:00+00:00"),
                                                      (10, "2030-01-01T20:10:00+00:00")])
def test_the_task_gets_a_deadline_of_task_timeout_sec(tmp_path: Path, max_concurrent: int, deadline: str) -> None:
    """transfers.task_timeout_sec and max_concurrent_transfers reach the backend (section_keys, as
    globus_endpoint_id does) and each task is submitted with a Globus deadline: task_timeout_sec to
    run, after the rounds of task_timeout_sec it may wait in Globus's queue (3 tasks of a user run
    at once; the agent stops each within task_timeout_sec), plus 10 min. Globus stops a task the
    agent gives up on even when the agent's cancel never reaches it, and no longer cuts short a
    task that waited (the deadline was submission + task_timeout_sec)."""
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    load_response(globus_sdk.TransferClient.submit_transfer)
    site_config = SimpleNamespace(site_path=tmp_path, data_path=tmp_path / "data", site_id=1)
    module = TransfersModule(site_config, TransfersOptions(
        transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP, task_timeout_sec=7200,
        max_concurrent_transfers=max_concurrent,
    ), client=None)
    backend = module.backend("globus")
    assert (backend.options.task_timeout_sec, backend.options.max_concurrent_transfers) == (7200, max_concurrent)
    backend._client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("test-token"),
                                                retry_config=RetryConfig(max_retries=0))
    backend.now = lambda: dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/data/a.h5", str(tmp_path / "data/j/a.h5"))])
    assert sent_json()["deadline"] == deadline
    # A backend built without the section (by hand): no deadline, as before.
    load_response(globus_sdk.TransferClient.submit_transfer)
    make_backend(tmp_path).submit(LOCATION, TransferDirection.stage_in, [TransferFile("/data/a.h5", "/s/a.h5")])
    assert "deadline" not in sent_json()


def test_a_restarted_agent_resumes_the_globus_task(balsam_env, tmp_path: Path) -> None:
    """The transfers module submits one Globus task for a job's stage-in; the agent then dies and a
    new module (a restarted agent) polls that task id instead of submitting the files again."""
    responses.add_passthru(balsam_env.url)  # the balsam API itself is real (httpx does not go through requests anyway)
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    client, site_path, site, job, _ = stage_in_site(tmp_path, "globus-site", "g/0", globus_endpoint_id=SITE_EP)
    options = TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP)

    def module_with_mocked_globus() -> TransfersModule:
        module = TransfersModule(site, options, client)
        module.backends["globus"] = make_backend(tmp_path)
        module.backends["globus"].site_path = str(site_path)
        return module

    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]

    load_response(globus_sdk.TransferClient.submit_transfer)
    first = module_with_mocked_globus()
    first.run_cycle()
    item = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert (item["state"], item["task_id"]) == ("active", f"globus:{TASK_ID}")
    body = json.loads(next(c.request.body for c in responses.calls if c.request.url.endswith("/v0.10/transfer")))
    assert body["DATA"][0]["destination_path"] == str(Path(site.data_path) / "g/0/raw.h5")
    del first  # the agent dies here

    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list", json={
        "DATA": [{**base, "task_id": TASK_ID, "status": "INACTIVE", "nice_status_short_description": "credentials expired"}],
        "DATA_TYPE": "task_list", "length": 1, "limit": 1, "offset": 0, "total": 1})
    second = module_with_mocked_globus()
    second.run_cycle()
    paused = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert paused["state"] == "inactive" and paused["transfer_info"]["reason"].startswith("credentials expired; ")
    assert "balsam site globus-login" in paused["transfer_info"]["reason"]
    responses.replace(responses.GET, "https://transfer.api.globus.org/v0.10/task_list", json={
        "DATA": [{**base, "task_id": TASK_ID, "status": "SUCCEEDED"}], "DATA_TYPE": "task_list",
        "length": 1, "limit": 1, "offset": 0, "total": 1})
    second.run_cycle()
    submits = [c for c in responses.calls if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]
    assert len(submits) == 1
    assert client.get("/transfers/", params={"job_id": [job.id]})["results"][0]["state"] == "done"
    assert client.get(f"/jobs/{job.id}")["state"] == "STAGED_IN"


def test_a_batch_sent_before_a_crash_is_sent_again_with_its_submission_id(balsam_env, tmp_path: Path) -> None:
    """The agent died after Globus accepted a batch but before the task id reached the journal: the
    token (submission id) journaled before the submission is reused, so Globus answers with the task
    it already has instead of starting a second one."""
    from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule, TransfersOptions

    client, site_path, site, job, item = stage_in_site(tmp_path, "token-site")
    dest = str(Path(site.data_path) / "t/0/raw.h5")
    token = "aaaaaaaa-0000-0000-0000-000000000042"
    (site_path / JOURNAL_NAME).write_text(json.dumps(
        {"token": token, "alias": "aps", "direction": "in", "files": [[item["id"], "/data/raw.h5", dest, False]]}) + "\n")

    responses.reset()  # no submission_id fixture: a new token must not be fetched for this batch
    load_response(globus_sdk.TransferClient.submit_transfer)
    module = TransfersModule(site, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                    globus_endpoint_id=SITE_EP), client)
    module.backends["globus"] = make_backend(tmp_path)
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list", json={
        "DATA": [{**base, "task_id": TASK_ID, "status": "ACTIVE"}], "DATA_TYPE": "task_list",
        "length": 1, "limit": 1, "offset": 0, "total": 1})
    module.run_cycle()
    submits = [c for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]
    assert len(submits) == 1
    body = json.loads(submits[0].request.body)
    assert body["submission_id"] == token
    assert [(d["source_path"], d["destination_path"]) for d in body["DATA"]] == [("/data/raw.h5", dest)]
    after = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert (after["state"], after["task_id"]) == ("active", f"globus:{TASK_ID}")
    assert not (site_path / JOURNAL_NAME).exists()


def test_new_batches_carry_a_journaled_submission_id(tmp_path: Path) -> None:
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend = make_backend(tmp_path)
    token = backend.submission_token()
    assert token == get_response_set(globus_sdk.TransferClient.get_submission_id).lookup("default").metadata["submission_id"]
    backend.submit(LOCATION, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))], token)
    assert sent_json()["submission_id"] == token


def _skipped(path: str, code: str = "PERMISSION_DENIED") -> dict:
    return {"DATA_TYPE": "skipped_error", "error_code": code, "error_details": "Permission denied",
            "source_path": "/data/run/frames/x", "destination_path": path,
            "is_directory": False, "is_symlink": False, "error_time": "2026-11-30T18:00:00+00:00"}


def _succeeded_with_skipped_errors(task_id: str, count: int) -> None:
    base = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
    doc = {**base, "task_id": task_id, "status": "SUCCEEDED", "subtasks_skipped_errors": count,
           "destination_endpoint_id": SITE_EP, "files": 3, "files_transferred": 3 - count, "files_skipped": count}
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task_list",
                  json={"DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1, "offset": 0, "total": 1})


def _transfers_module(tmp_path: Path, **options) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path / "site"), data_path=str(tmp_path / "site" / "data"), site_id=1)
    return TransfersModule(site_config, TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"},
                                                         globus_endpoint_id=SITE_EP, max_attempts=3, **options),
                           client=None)


@pytest.mark.parametrize("item_dest", ["{site}/data/job7/frames", "{site}/data/job7/frames/", "{site}//data/job7//frames"])
def test_a_file_skipped_inside_a_directory_item_fails_that_item(tmp_path: Path, item_dest: str) -> None:
    """Globus names a file skipped inside a recursive (directory) item by the file's own path: the
    agent looked the exact dest up, found no item, and called the directory item done."""
    site = tmp_path / "site"
    _succeeded_with_skipped_errors("t1", 1)
    responses.add(responses.GET, "https://transfer.api.globus.org/v0.10/task/t1/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [_skipped(f"{site}/data/job7/frames/f0002.h5")]})
    status = make_backend(tmp_path).poll(["t1"])["t1"]
    assert status.state == TaskState.done and list(status.file_errors) == [f"{site}/data/job7/frames/f0002.h5"]

    module = _transfers_module(tmp_path)
    frames = {"id": 5, "job_id": 7, "direction": "in", "state": "active", "recursive": True, "local_path": "frames",
              "remote_path": "/data/run/frames", "task_id": "globus:t1",
              "transfer_info": {"dest": item_dest.format(site=site)}}
    # A sibling file item whose name starts like the directory's: not inside it, done.
    sibling = {**frames, "id": 6, "recursive": False, "local_path": "frames.txt",
               "transfer_info": {"dest": f"{site}/data/job7/frames.txt"}}
    updates: dict = {}
    module._apply_status("globus:t1", status, [frames, sibling], updates, dt.datetime.now(dt.timezone.utc))
    assert updates[5]["state"] == "pending" and updates[5]["transfer_info"]["attempts"] == 1
    assert updates[5]["transfer_info"]["error"] == f"{site}/data/job7/frames/f0002.h5: PERMISSION_DENIED: Permission denied"
    assert updates[6]["state"] == "done"


def test_skipped_errors_are_read_from_every_page(tmp_path: Path) -> None:
    """task_skipped_errors is paged (next_marker): only the first page was read, and a file whose
    error was on a later page was called done."""
    site = tmp_path / "site"
    _succeeded_with_skipped_errors("t2", 2)
    url = "https://transfer.api.globus.org/v0.10/task/t2/skipped_errors"
    responses.add(responses.GET, url, match=[matchers.query_param_matcher({"marker": "page-2"})], json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None, "DATA": [_skipped(f"{site}/data/j/b.h5", "FILE_NOT_FOUND")]})
    responses.add(responses.GET, url, match=[matchers.query_param_matcher({})], json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": "page-2", "DATA": [_skipped(f"{site}/data/j/a.h5")]})
    status = make_backend(tmp_path).poll(["t2"])["t2"]
    assert status.file_errors == {f"{site}/data/j/a.h5": "PERMISSION_DENIED: Permission denied",
                                  f"{site}/data/j/b.h5": "FILE_NOT_FOUND: Permission denied"}


@pytest.mark.parametrize("url, problem", [
    ("globus://", "expected globus://<collection-id>, got 'globus://'"),
    (f"globus:///{REMOTE_EP}", rf"one '/' too many\? globus://{REMOTE_EP}"),
    ("globus://aps-dtn", "with a collection UUID, got 'aps-dtn'"),
    (f"globus://{REMOTE_EP}/~/prefix", "takes no path, got '/~/prefix'"),
])
def test_malformed_globus_locations_are_settings_errors(url: str, problem: str) -> None:
    """They passed settings validation and failed every job using them at submit time."""
    with pytest.raises(TransferError, match=problem):
        GlobusTransfer.check_location(TransferLocation.parse("aps", url))
    with pytest.raises(SettingsError) as info:
        loads_settings(f"transfers:\n  transfer_locations:\n    home: 'local://'\n    aps: '{url}'\n")
    (error,) = info.value.errors
    assert error.startswith("settings.yml:4 transfers.transfer_locations.aps: ")
    GlobusTransfer.check_location(LOCATION)
