"""The collection's home (one ``ls /~/``, see GlobusTransfer._home): a moment's failure of that ls
(503, 429 with Retry-After, the network) was cached as "home unknown" and the task's outcome read
from it kept as final (every item of the task failed a try, for good); now the task stays active
(held off on a 429) and is read again next cycle. The home was kept across a new ``globus-login``
(another identity, another home): now read per login. And with the home unknown, a delivered path
that may be a home item's was counted for a literal item (``_delivered``), though a skipped one was
told to none (``_skipped_keys``): both now count only what cannot collide."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import globus_sdk
import pytest
import requests
import responses
from globus_sdk.testing import get_response_set, load_response

from balsam.states import TransferDirection
from balsam.transfer import TaskState, TransferFile, build_backend
from balsam_transfer_globus.auth import save_tokens
from balsam_transfer_globus.backend import GlobusTransfer, _delivered, _skipped_keys
from globus_test_utils import (LOCATION, REMOTE_EP, SITE_EP, globus_module, globus_site, make_backend,  # noqa: F401
                               mocked_responses, stage_in_app, succeeded_with)
from test_i2_globus_skipped_home_paths import TASK_ID, apply, home_listing, succeeded_with_skipped

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]
OK_SUBMIT = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
CLIENT_ID = "33333333-3333-3333-3333-333333333333"


def ls_calls() -> int:
    return sum("/ls" in c.request.url for c in responses.calls)


@pytest.mark.parametrize("failure", ["503", "429", "network"])
def test_live_a_failed_ls_of_the_home_keeps_the_task_for_the_next_cycle(balsam_env, tmp_path: Path, failure) -> None:
    responses.add_passthru(balsam_env.url)
    from balsam.api import Job

    client, site_path, site = globus_site(tmp_path, "/~/gsite")
    Fetch = stage_in_app(site, "Fetch", "in.h5")
    jobs = Job.objects.bulk_create([Job(f"run{n}", Fetch, transfers={"raw": f"aps:/data/{n}.h5"}) for n in range(2)])
    module = globus_module(tmp_path, site, client, "/~/gsite")
    clock = [dt.datetime.now(dt.timezone.utc)]
    module.now = lambda: clock[0]
    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()

    ls_url = f"{TRANSFER}/operation/endpoint/{SITE_EP}/ls"
    if failure == "503":
        responses.add(responses.GET, ls_url, status=503, json={"code": "ServiceUnavailable", "message": "down",
                                                               "request_id": "r"})
    elif failure == "429":
        responses.add(responses.GET, ls_url, status=429, headers={"Retry-After": "30"},
                      json={"code": "RateLimited", "message": "slow down", "request_id": "r"})
    else:
        responses.add(responses.GET, ls_url, body=requests.exceptions.ConnectionError("connection reset"))
    home_listing(SITE_EP, "/home/me/")  # the next ls works
    succeeded_with("balsam stage-in (2 files)", [("/data/1.h5", "/home/me/gsite/data/run1/in.h5")], SITE_EP,
                   files=2, files_transferred=1)
    clock[0] += dt.timedelta(seconds=5)
    module.run_cycle()
    # The failed ls decided nothing: both items still in flight on their task.
    items = client.get("/transfers/", params={"job_id": [j.id for j in jobs]})["results"]
    assert [i["state"] for i in items] == ["active", "active"]
    assert [client.get(f"/jobs/{j.id}")["state"] for j in jobs] == ["READY", "READY"]
    assert ls_calls() == 1
    clock[0] += dt.timedelta(seconds=31)  # past a 429's Retry-After
    module.run_cycle()
    assert ls_calls() == 2
    assert [client.get(f"/jobs/{j.id}")["state"] for j in jobs] == ["STAGED_IN", "FAILED"]


def test_a_refused_ls_is_still_home_unknown_and_not_asked_each_poll(tmp_path: Path) -> None:
    home_listing(REMOTE_EP, status=403)
    backend = make_backend(tmp_path)
    files = [TransferFile(str(tmp_path / f"site/data/j{n}/f"), f"/~/{n}.h5") for n in range(2)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/me/1.h5", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "pending"]  # not told: both fail a try
    backend._tasks[TASK_ID].final = None
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/me/1.h5", dest_ep=REMOTE_EP)
    assert backend.poll([TASK_ID])[TASK_ID].state == TaskState.done
    assert ls_calls() == 1


def write_login(path: Path, refresh: str, access: str) -> None:
    save_tokens(path, {"client_id": CLIENT_ID, "refresh_token": refresh, "access_token": access,
                       "expires_at_seconds": int(time.time()) + 170000})


def test_a_new_login_reads_its_own_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    tokens = tmp_path / "home" / "globus-tokens.json"
    write_login(tokens, "r-alice", "alice-access")
    backend = build_backend(GlobusTransfer, "globus", {"endpoint_id": SITE_EP, "http_retries": 0})
    backend.site_path = str(tmp_path / "site")
    files = [TransferFile(str(tmp_path / "site/data/j1/f"), "/~/a.h5"), TransferFile(str(tmp_path / "site/data/j2/f"), "/~/b.h5")]

    home_listing(REMOTE_EP, "/home/alice/")
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/alice/b.h5", dest_ep=REMOTE_EP)
    assert backend.poll([TASK_ID])[TASK_ID].file_errors == {"/~/b.h5": "FILE_NOT_FOUND: No such file"}

    write_login(tokens, "r-bob", "bob-access")  # `balsam site globus-login` with another identity
    responses.replace(responses.GET, f"{TRANSFER}/operation/endpoint/{REMOTE_EP}/ls", json={
        "DATA_TYPE": "file_list", "endpoint": REMOTE_EP, "path": "/~/", "absolute_path": "/home/bob/",
        "rename_supported": True, "symlink_supported": False, "length": 0, "total": 0, "DATA": []})
    backend._tasks.clear()  # the same task id again, submitted with bob's login
    responses.add(responses.POST, f"{TRANSFER}/transfer", json=OK_SUBMIT, status=202)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (2 files)", "/home/bob/a.h5", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    # Bob's home read (with bob's login), not alice's kept: his resolved path is his item's.
    ls = [c.request.headers["Authorization"] for c in responses.calls if "/ls" in c.request.url]
    assert ls == ["Bearer alice-access", "Bearer bob-access"]
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "done"]


def test_with_the_home_unknown_delivered_and_skipped_agree() -> None:
    sent = [("/home/me/x", "L", False), ("/~/x", "H", False), ("/~/y", "Y", False)]
    # /home/me/x may be /~/x itself (a home of /home/me): neither delivers it, nor is a skipped one told.
    assert _delivered(sent, {"/home/me/x"}, None) == set()
    assert _skipped_keys(sent, ["/home/me/x"], None) == {}
    # Reported in home form: told, both ways.
    assert _delivered(sent, {"/~/y"}, None) == {"/~/y"}
    assert _skipped_keys(sent, ["/~/y"], None) == {"/~/y": ["Y"]}
    # The home known: each is its own item's.
    assert _delivered(sent, {"/home/me/x"}, "/home/other") == {"/home/me/x"}
