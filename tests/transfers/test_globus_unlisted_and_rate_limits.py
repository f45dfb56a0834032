"""The Globus plugin and the transfers module, from an audit against a stateful fake Globus Transfer API
(globus-sdk's testing fixtures here, through ``responses``):

- F1: a task one ``task_list`` answer left out (a task is listed only to the identity that submitted
  it: a login with another, or a linked, identity hides it) was taken for dead: "unknown", its items
  back to pending, "agent restarted?" logged, and its files submitted a second time while it ran.
  Now the backend asks ``GET /task/<id>`` for such a task: 404 is unknown, found is its status, a 403
  (another identity's) or another error keeps it active with the reason.
- F2: a 429's ``Retry-After`` was dropped after globus-sdk's own retries (at most 10 s each): the
  next cycle asked again a few seconds later. It now travels as ``TransferError.retry_after_sec`` and
  the module neither polls nor submits to that backend until then.
- F3: ``balsam site globus-login`` with a wrong or expired code said "HTTP 400 None".
- F4: an INFO "cycle: ... updates none" every cycle while a task ran; "credentials expired; if
  credentials expired run ..."; "stage-in (3 files)" for 3 directories.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from click.testing import CliRunner
from globus_sdk.testing import get_last_request, get_response_set

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferError, TransferFile
from balsam_transfer_globus.backend import LABEL_DIRECTION
from balsam_transfer_globus.hooks import globus_login
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from transfer_test_utils import FakeAPI

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").metadata["task_id"]
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
LOGGER = "balsam.site.modules.transfers"
T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def task_list(*docs: dict) -> None:
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": list(docs), "DATA_TYPE": "task_list", "length": len(docs), "limit": 1000, "offset": 0, "total": len(docs)})


def paths(method: str = "") -> list[str]:
    return [urllib.parse.urlsplit(c.request.url).path for c in responses.calls if not method or c.request.method == method]


def globus_site(tmp_path: Path, items: int = 1, **options):
    """A transfers module on an in-memory API with ``items`` pending stage-ins from the Globus
    location ``aps``, its backend on the mocked Globus API: (api, module, clock)."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    rows = [{"id": i, "job_id": i, "direction": "in", "location_alias": "aps", "remote_path": f"/data/{i}.h5",
             "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}}
            for i in range(1, items + 1)]
    api = FakeAPI(rows, [{"id": i, "workdir": f"job{i}", "state": "READY"} for i in range(1, items + 1)])
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP,
                                              **options), api)
    module.backends["globus"] = make_backend(tmp_path)
    module.backends["globus"].site_path = str(site)
    clock = [T0]
    module.now = lambda: clock[0]
    return api, module, clock


# -- F1 ---------------------------------------------------------------------------------------------------


def test_a_running_task_the_task_list_leaves_out_is_not_submitted_again(tmp_path: Path, caplog) -> None:
    """The audit's double transfer: task_list stops listing the task (another identity logged in)
    while it runs; GET /task/<id> still finds it ACTIVE. Its item stays active on the same task and
    nothing is submitted a second time; once it succeeds (found by id) the item is done."""
    api, module, clock = globus_site(tmp_path)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert api.items[1]["state"] == "active" and api.items[1]["task_id"] == f"globus:{TASK_ID}"

    task_list()  # the task is not listed
    running = responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}",
                            json={**BASE, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK"})
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for cycle in range(1, 4):
            clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
            module.run_cycle()
    assert paths("POST") == ["/v0.10/transfer"]  # one submission, not two
    assert (api.items[1]["state"], api.items[1]["task_id"]) == ("active", f"globus:{TASK_ID}")
    assert running.call_count == 3
    assert "unknown to its backend" not in caplog.text and "submitted again" not in caplog.text

    responses.replace(responses.GET, f"{TRANSFER}/task/{TASK_ID}",
                      json={**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "files": 1, "files_transferred": 1})
    clock[0] = T0 + dt.timedelta(seconds=30)
    module.run_cycle()
    assert api.items[1]["state"] == "done" and paths("POST") == ["/v0.10/transfer"]


def test_a_task_of_another_identity_stays_active_with_the_login_to_run(tmp_path: Path) -> None:
    """403 for GET /task/<id>: not the logged-in identity's task. It may still run: active, with one
    line naming the login command, never unknown (whose files would go a second time)."""
    task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/t-other", status=403,
                  json={"code": "PermissionDenied", "message": "Task t-other is not yours", "request_id": "r"})
    responses.add(responses.GET, f"{TRANSFER}/task/t-down", status=502,
                  json={"code": "ExternalError", "message": "Bad gateway", "request_id": "r"})
    statuses = make_backend(tmp_path).poll(["t-other", "t-down"])
    other = statuses["t-other"]
    assert other.state == TaskState.active
    assert other.reason == ("Globus task t-other is not visible to the logged-in identity (logged in as another "
                            f"identity?): run `balsam site globus-login -e {SITE_EP}` with the identity that submitted it")
    down = statuses["t-down"]
    assert down.state == TaskState.active and down.reason.startswith("Globus task t-down is missing from the task list "
                                                                      "and cannot be read (will retry): ")
    assert "HTTP 502" in down.reason


def test_an_unknown_task_says_why_instead_of_agent_restarted(tmp_path: Path, caplog) -> None:
    api, module, clock = globus_site(tmp_path)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}", status=404,
                  json={"code": "ClientError.NotFound", "message": "not found", "request_id": "r"})
    clock[0] = T0 + dt.timedelta(seconds=5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        module.run_cycle()
    assert api.items[1]["state"] == "pending"  # gone for Globus: copied again
    assert f"is unknown to its backend (Globus does not know task {TASK_ID} (HTTP 404 ClientError.NotFound))" in caplog.text
    assert "agent restarted?" not in caplog.text


# -- F2 ---------------------------------------------------------------------------------------------------


def test_a_429_retry_after_reaches_the_transfer_error(tmp_path: Path) -> None:
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=429, headers={"Retry-After": "120"},
                  json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    with pytest.raises(TransferError) as err:
        make_backend(tmp_path).poll(["t1"])
    assert err.value.retryable and err.value.retry_after_sec == 120
    responses.replace(responses.GET, f"{TRANSFER}/task_list", status=429,
                      headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, json={"code": "RateLimited"})
    with pytest.raises(TransferError) as err:
        make_backend(tmp_path).poll(["t1"])
    assert err.value.retry_after_sec == 3600  # bounded: a far date is not a day without transfers
    responses.replace(responses.GET, f"{TRANSFER}/task_list", status=503, json={"code": "ServiceUnavailable"})
    with pytest.raises(TransferError) as err:
        make_backend(tmp_path).poll(["t1"])
    assert err.value.retry_after_sec is None


def test_the_module_holds_a_rate_limited_backend_off_until_its_retry_after(tmp_path: Path, caplog) -> None:
    """Polls and submissions to a backend that answered 429 with Retry-After: 120 wait 120 s (they
    went again every cycle, 5 s later); said in one log line. Its task stays in flight, a new batch
    waits without using a try."""
    api, module, clock = globus_site(tmp_path, items=2, max_concurrent_transfers=2)
    api.items[2]["state"] = "done"  # kept out of the first cycle
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert api.items[1]["state"] == "active"

    responses.calls.reset()
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=429, headers={"Retry-After": "120"},
                  json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        clock[0] = T0 + dt.timedelta(seconds=5)
        module.run_cycle()
        assert paths() == ["/v0.10/task_list"]
        api.items[2]["state"] = "pending"  # a new batch while the backend is held off
        for cycle in range(2, 25):  # 5 s cycles up to 120 s: no request to Globus
            clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
            module.run_cycle()
    assert paths() == ["/v0.10/task_list"]
    assert api.items[1]["state"] == "active" and api.items[1]["task_id"] == f"globus:{TASK_ID}"
    assert api.items[2]["state"] == "pending" and "rate limited" in api.items[2]["transfer_info"]["reason"]
    assert "attempts" not in api.items[2]["transfer_info"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "polling" in r.getMessage()]
    assert len(said) == 1 and "its service asked for 120 s without requests: none until then" in said[0], said

    # After the pause: polled and submitted again.
    responses.replace(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [{**BASE, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK"}], "DATA_TYPE": "task_list",
        "length": 1, "limit": 1000, "offset": 0, "total": 1})
    clock[0] = T0 + dt.timedelta(seconds=126)
    module.run_cycle()
    assert paths().count("/v0.10/task_list") == 2 and "/v0.10/transfer" in paths()
    assert api.items[2]["state"] == "active"


# -- F3 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401])
def test_a_wrong_or_expired_authorization_code_says_so(tmp_path: Path, monkeypatch, status: int) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    responses.add(responses.POST, "https://auth.globus.org/v2/oauth2/token", status=status, json={"error": "invalid_grant"})
    result = CliRunner().invoke(globus_login, ["--client-id", "33333333-3333-3333-3333-333333333333"], input="bad-code\n")
    assert result.exit_code != 0
    assert "None" not in result.output
    assert (f"Error: Globus Auth refused the login (HTTP {status} invalid_grant): the authorization code was wrong or "
            "has expired") in result.output
    assert "run the command again" in result.output
    responses.replace(responses.POST, "https://auth.globus.org/v2/oauth2/token", status=400,
                      json={"error": "invalid_client", "error_description": "Unknown client"})
    result = CliRunner().invoke(globus_login, ["--client-id", "33333333-3333-3333-3333-333333333333"], input="c\n")
    assert "Error: Globus Auth refused the login (HTTP 400 invalid_client): Unknown client" in result.output


# -- F4 ---------------------------------------------------------------------------------------------------


def test_a_cycle_that_only_polls_a_running_task_logs_at_debug(tmp_path: Path, caplog) -> None:
    api, module, clock = globus_site(tmp_path)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    task_list({**BASE, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK", "files": 1, "files_transferred": 0})
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        module.run_cycle()  # submitted: INFO
        for cycle in range(1, 30):  # 145 s running (progress written twice): DEBUG
            clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
            module.run_cycle()
        responses.replace(responses.GET, f"{TRANSFER}/task_list", json={
            "DATA": [{**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "files": 1, "files_transferred": 1}],
            "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
        clock[0] = T0 + dt.timedelta(seconds=150)
        module.run_cycle()  # done: INFO
    cycles = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("cycle:")]
    assert len(cycles) == 31
    info = [m for level, m in cycles if level >= logging.INFO]
    assert len(info) == 2 and "1 tasks submitted" in info[0] and "'done': 1" in info[1], info
    assert api.items[1]["state"] == "done"


def test_an_inactive_tasks_reason_says_credentials_once(tmp_path: Path) -> None:
    task_list({**BASE, "task_id": "t1", "status": "INACTIVE", "nice_status_short_description": "credentials expired"},
              {**BASE, "task_id": "t2", "status": "INACTIVE", "nice_status_short_description": "endpoint paused"})
    statuses = make_backend(tmp_path).poll(["t1", "t2"])
    assert statuses["t1"].error == f"credentials expired; run `balsam site globus-login -e {SITE_EP}`"
    assert statuses["t2"].error == f"endpoint paused; if credentials expired run `balsam site globus-login -e {SITE_EP}`"


@pytest.mark.parametrize("recursive, label", [
    ((False, False, False), "balsam stage-in (3 files)"),
    ((True, True, True), "balsam stage-in (3 directories)"),
    ((False, False, True), "balsam stage-in (2 files, 1 directory)"),
    ((False, True), "balsam stage-in (1 file, 1 directory)"),
])
def test_the_task_label_counts_files_and_directories(tmp_path: Path, recursive: tuple, label: str) -> None:
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    files = [TransferFile(f"/data/{i}", str(tmp_path / "site" / "data" / str(i)), recursive=r) for i, r in enumerate(recursive)]
    make_backend(tmp_path).submit(LOCATION, TransferDirection.stage_in, files)
    sent = json.loads(get_last_request().body)["label"]
    assert sent == label
    # The direction is still read back from the label (and from the labels of earlier versions).
    assert LABEL_DIRECTION.search(sent).group(1) == "in"
    assert LABEL_DIRECTION.search("balsam stage-out (7 files)").group(1) == "out"


def test_a_429_on_the_lookup_of_an_unlisted_task_holds_the_backend_off(tmp_path: Path) -> None:
    """GET /task/<id> of a task the list left out answers 429 Retry-After: 120. Before: the task
    read "active" (will retry) and the next ids were asked at once; the agent never held the
    backend off. Now the poll raises the TransferError with its retry_after_sec; the other
    unlisted task is not asked."""
    task_list()
    limited = responses.add(responses.GET, f"{TRANSFER}/task/t-1", status=429, headers={"Retry-After": "120"},
                            json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    other = responses.add(responses.GET, f"{TRANSFER}/task/t-2", json={**BASE, "task_id": "t-2", "status": "ACTIVE"})
    with pytest.raises(TransferError) as err:
        make_backend(tmp_path).poll(["t-1", "t-2"])
    assert err.value.retryable and err.value.retry_after_sec == 120
    assert limited.call_count >= 1 and other.call_count == 0
    # A 429 without Retry-After also stops the poll (no hold: asked again next cycle).
    responses.replace(responses.GET, f"{TRANSFER}/task/t-1", status=429, json={"code": "RateLimited", "request_id": "r"})
    with pytest.raises(TransferError) as err:
        make_backend(tmp_path).poll(["t-1", "t-2"])
    assert err.value.retry_after_sec is None and other.call_count == 0


def test_the_module_holds_off_a_backend_rate_limited_on_an_unlisted_task(tmp_path: Path) -> None:
    api, module, clock = globus_site(tmp_path)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    responses.calls.reset()
    task_list()
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}", status=429, headers={"Retry-After": "120"},
                  json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    for cycle in range(1, 20):  # 95 s of 5 s cycles: one poll, then nothing until the 120 s pass
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
    assert paths().count(f"/v0.10/task/{TASK_ID}") == 1, paths()
    assert paths().count("/v0.10/task_list") == 1
    assert api.items[1]["state"] == "active" and api.items[1]["task_id"] == f"globus:{TASK_ID}"


def test_a_task_past_its_deadline_during_a_hold_says_so_and_is_cancelled_once_it_lifts(tmp_path: Path, caplog) -> None:
    """task_timeout_sec 60; a 429 Retry-After: 120 at 5 s holds the backend until 125 s. Past 60 s
    the task is not ended during the hold (its cancel is a request the service asked not to get;
    uncancelled, its files would go a second time beside it): a warning says once that it is
    cancelled when the hold lifts. Before: nothing said so. At 126 s it is
    cancelled and its file fails a try."""
    api, module, clock = globus_site(tmp_path, task_timeout_sec=60)
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT)
    module.run_cycle()
    assert api.items[1]["state"] == "active"
    responses.calls.reset()
    responses.add(responses.GET, f"{TRANSFER}/task_list", status=429, headers={"Retry-After": "120"},
                  json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for cycle in range(1, 25):  # 5 s cycles to 120 s
            clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
            module.run_cycle()
    assert paths() == ["/v0.10/task_list"]  # no cancel during the hold
    item = api.items[1]
    assert (item["state"], item["task_id"]) == ("active", f"globus:{TASK_ID}")
    assert "attempts" not in item["transfer_info"]
    assert "HTTP 429" in item["transfer_info"]["reason"], item  # the failed poll's reason stays
    said = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "ran past transfers.task_timeout_sec" in r.getMessage()]
    assert len(said) == 1 and "it is cancelled once its backend may be called again" in said[0], said

    running = {"DATA": [{**BASE, "task_id": TASK_ID, "status": "ACTIVE", "nice_status": "OK"}], "DATA_TYPE": "task_list",
               "length": 1, "limit": 1000, "offset": 0, "total": 1}
    responses.replace(responses.GET, f"{TRANSFER}/task_list", json=running)
    responses.add(responses.POST, f"{TRANSFER}/task/{TASK_ID}/cancel",
                  json={"DATA_TYPE": "result", "code": "Canceled", "message": "The task has been cancelled.",
                        "request_id": "r", "resource": f"/task/{TASK_ID}/cancel"})
    clock[0] = T0 + dt.timedelta(seconds=126)
    module.run_cycle()
    assert f"/v0.10/task/{TASK_ID}/cancel" in paths()
    item = api.items[1]
    assert item["state"] == "pending" and item["transfer_info"]["attempts"] == 1, item
    assert "did not finish within 60 s (transfers.task_timeout_sec); cancelled" in item["transfer_info"]["error"]
