"""Drill: answers lost after the server applied the request (a proxy drops them or answers 502).

The client retries such requests; every retry must be answered from the server's record of the
first attempt: 3 jobs asked for are 3 jobs stored, one BatchJob is one allocation, and an acquire
whose answer never arrived leaves no job leased to a launcher that never saw it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lossy_proxy import LossyProxy  # noqa: E402


@pytest.fixture
def user(live_server: str, register: Any) -> Iterator[dict]:
    username, _password, _uid, token, _expiry = register(live_server)
    with httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=60) as direct:
        yield {"url": live_server, "token": token, "direct": direct}


def client_through(proxy: LossyProxy, token: str, retry_count: int = 4) -> Any:
    from balsam.client import RESTClient

    return RESTClient(proxy.url, token, retry_count=retry_count, backoff_base=0.01, backoff_max=0.05)


def count(direct: httpx.Client, path: str, **params: Any) -> int:
    resp = direct.get(path, params={"limit": 0, **params})
    resp.raise_for_status()
    return resp.json()["count"]


def every_post_loses_its_first_two_answers(method: str, path: str, count: int) -> "str | None":
    """Each logical POST: the first answer is dropped, the second is a 502, the third arrives."""
    if method != "POST":
        return None
    return ("drop", "502", None)[count % 3]


def test_creates_whose_answers_are_lost_are_applied_once(user: dict) -> None:
    direct = user["direct"]
    with LossyProxy(user["url"], every_post_loses_its_first_two_answers) as proxy:
        client = client_through(proxy, user["token"])
        site = client.Site.objects.create(name="lossy", path="/lossy")
        app = client.App.objects.create(site_id=site.id, name="Lossy", serialized_class="eA==", source_code="class Lossy: ...")
        jobs = client.Job.objects.bulk_create([client.Job(workdir=f"w/{i}", app_id=app.id) for i in range(3)])
        bj = client.BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi",
                                            queue="q", project="p")
        assert proxy.faults["drop"] >= 4 and proxy.faults["502"] >= 4
    assert len(jobs) == 3 and len({j.id for j in jobs}) == 3
    assert count(direct, "/sites/", name="lossy") == 1
    assert count(direct, "/apps/", site_id=site.id) == 1
    assert count(direct, "/jobs/", app_id=app.id) == 3  # not 6 or 9
    assert count(direct, "/batch-jobs/", site_id=site.id) == 1  # one allocation, not three
    assert bj.id is not None


@pytest.mark.parametrize("wait_sec", [None, 0.2], ids=["no-wait", "prefer-wait"])
def test_a_lost_acquire_answer_leaves_no_job_behind(user: dict, wait_sec: "float | None") -> None:
    """300 jobs acquired 40 at a time while two answers in four are lost, some for good (the client
    gives up): every job reaches the launcher once; also when the acquires ask the server to wait
    for jobs (``Prefer: wait``: a resent request does not wait, and a look that finds nothing
    claims no key)."""
    from balsam.client.lease import JobLease

    direct = user["direct"]
    name = f"lossy-acq-{wait_sec}"
    site = direct.post("/sites/", json={"name": name, "path": f"/{name}"}).json()
    app = direct.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "eA==",
                                      "source_code": "class A: ..."}).json()
    ids = [j["id"] for j in direct.post("/jobs/", json=[{"workdir": f"a/{i}", "app_id": app["id"]} for i in range(300)]).json()]
    assert direct.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200

    def lose_acquires(method: str, path: str, count: int) -> "str | None":
        if method == "POST" and path.startswith("/sessions/") and path != "/sessions/":
            return ("drop", "502", None, None)[count % 4]
        return None

    with LossyProxy(user["url"], lose_acquires) as proxy:
        lease = JobLease(client_through(proxy, user["token"]), site["id"], heartbeat_thread=False,
                         acquire_retry_count=0)  # each call one attempt: the client gives up, the lease resends
        received: list[int] = []
        failures = empty_in_a_row = 0
        while empty_in_a_row < 2:
            try:
                got = lease.acquire(40, wait_sec=wait_sec)
            except Exception:
                failures += 1
                continue
            received.extend(job["id"] for job in got)
            empty_in_a_row = 0 if got else empty_in_a_row + 1
        lease.close()
        assert failures >= 4 and proxy.faults["drop"] >= 2
    assert len(received) == len(set(received)), "a job was handed out twice"
    assert sorted(received) == ids, f"{len(set(ids) - set(received))} jobs leased but never received"


def bulk_app(direct: httpx.Client, site_name: str) -> dict:
    site = direct.post("/sites/", json={"name": site_name, "path": f"/{site_name}"}).json()
    return direct.post("/apps/", json={"site_id": site["id"], "name": "B", "serialized_class": "eA==",
                                       "source_code": "class B: ..."}).json()


def drop_job_creates_after_the_first(n: int) -> Any:
    """The first ``POST /jobs/`` is answered, the answers of the ``n`` after it are lost (the
    attempts of the second chunk, with the client's retries), and later ones are answered."""

    def fault(method: str, path: str, count: int) -> "str | None":
        return "drop" if method == "POST" and path == "/jobs/" and 1 <= count <= n else None

    return fault


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db_user(request: pytest.FixtureRequest, register: Any) -> Iterator[dict]:
    url = request.getfixturevalue("live_server" if request.param == "sqlite" else "live_server_pg")
    _username, _password, _uid, token, _expiry = register(url)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as direct:
        yield {"url": url, "token": token, "direct": direct, "db": request.param}


def test_bulk_create_reports_exactly_what_was_stored_and_resumes_without_duplicates(any_db_user: dict) -> None:
    """7,000 jobs go in two chunks; every answer to the chunk that reaches the server second is lost,
    though the server stored it. On SQLite the chunks go one after the other; on PostgreSQL side by
    side with reserved keys, so either may be the one answered."""
    from balsam.api import BulkCreateError

    user = any_db_user
    direct = user["direct"]
    app = bulk_app(direct, "lossy-bulk")
    retries = 2
    with LossyProxy(user["url"], drop_job_creates_after_the_first(retries + 1)) as proxy:
        client = client_through(proxy, user["token"], retry_count=retries)
        jobs = [client.Job(workdir=f"b/{i}", app_id=app["id"]) for i in range(7000)]
        with pytest.raises(BulkCreateError) as caught:
            client.Job.objects.bulk_create(jobs)
        error = caught.value
        assert proxy.faults["drop"] == 1 + retries
        stored = len(error.created)
        # The chunk answered is created (side by side, the second chunk's answer may come first).
        assert stored == 5000 if user["db"] == "sqlite" else stored in (2000, 5000)
        first, second = [f"b/{i}" for i in range(5000)], [f"b/{i}" for i in range(5000, 7000)]
        created_now, not_created = [str(j.workdir) for j in error.created], [str(j.workdir) for j in error.not_created]
        assert (created_now, not_created) in ((first, second), (second, first))
        assert f"stored {stored} of 7000 jobs" in str(error) and "may be stored" in str(error)
        assert count(direct, "/jobs/", app_id=app["id"]) == 7000  # the lost chunk was in fact stored
        created = error.resume()
    ids = [job.id for job in created]
    assert len(created) == 7000 and len(set(ids)) == 7000 and ids == sorted(ids)
    assert [str(j.workdir) for j in created] == [f"b/{i}" for i in range(7000)]
    assert count(direct, "/jobs/", app_id=app["id"]) == 7000  # resumed exactly once


def test_an_acquire_retried_by_the_client_returns_the_jobs_of_the_lost_answer(user: dict) -> None:
    """The public API: ``Session.acquire_jobs`` through a proxy that drops the first answer of every
    acquire; the client's retry used to lease other jobs, stranding the first ones (128 of 300)."""
    direct = user["direct"]
    site = direct.post("/sites/", json={"name": "lossy-api", "path": "/lossy-api"}).json()
    app = direct.post("/apps/", json={"site_id": site["id"], "name": "C", "serialized_class": "eA==",
                                      "source_code": "class C: ..."}).json()
    ids = [j["id"] for j in direct.post("/jobs/", json=[{"workdir": f"c/{i}", "app_id": app["id"]} for i in range(300)]).json()]
    assert direct.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200

    def drop_first_answer(method: str, path: str, count: int) -> "str | None":
        acquire = method == "POST" and path.startswith("/sessions/") and path != "/sessions/"
        return "drop" if acquire and count % 2 == 0 else None

    with LossyProxy(user["url"], drop_first_answer) as proxy:
        client = client_through(proxy, user["token"])
        session = client.Session.objects.create(site_id=site["id"])
        received: list[int] = []
        while True:
            got = session.acquire_jobs(40)
            if not got:
                break
            received.extend(job.id for job in got)
        drops = proxy.faults["drop"]
    assert len(received) == len(set(received)), "a job was handed out twice"
    assert sorted(received) == ids, f"{len(set(ids) - set(received))} of 300 jobs leased but never received"
    assert drops >= 8  # every acquire lost its first answer
