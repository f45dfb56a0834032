"""Per-user isolation, as a hostile second user of a shared server would try it (real uvicorn, SQLite
and PostgreSQL): user B (and a launcher credential of user A, limited to one site) against every
route and method with the ids of records it may not reach. Each answer must be the one for an id
that does not exist (404, an empty listing, a refusal naming no data), and A's records must come out
unchanged; on PostgreSQL no request may wait for a lock on A's rows. Also: a revoked or expired
token is refused on every route, credentials sent in a query string stay out of the access log, and
the dashboard's job counts depend on the user's own jobs only."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api, uvicorn_access_line


#: An id no record has (far above what the tests create).
MISSING = 900_000_001


def _world(api: Api, tag: str) -> dict[str, Any]:
    """Two sites, an app each (one with a stage-in slot), a BatchJob each, a parent and a child job
    (with a transfer item), a job leased to a session, a session per site, a launcher credential
    of the first site's BatchJob: every kind of record, and events."""
    site = api.site(transfer_locations={"aps": "globus://aps"})
    site2 = api.site()
    app = api.app(site["id"], "Xfer", transfers={"input": {"required": False, "direction": "in", "local_path": "in.dat"}})
    app2 = api.app(site2["id"])
    bj_body = {"project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 10, "job_mode": "mpi"}
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], **bj_body})
    bj2 = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site2["id"], **bj_body})
    parent, other = api.ok("POST", "/jobs/", 201, json=[
        {"workdir": f"{tag}/p", "app_id": app["id"], "tags": {"k": tag}, "batch_job_id": bj["id"],
         "transfers": {"input": "aps:/x"}},
        {"workdir": f"{tag}/o", "app_id": app2["id"], "tags": {"k": tag}, "batch_job_id": bj2["id"]},
    ])
    child = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"{tag}/c", "app_id": app["id"], "parent_ids": [parent["id"]]}])[0]
    api.patch_states([other["id"]], "PREPROCESSED")
    sess = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})
    sess2 = api.ok("POST", "/sessions/", 201, json={"site_id": site2["id"]})
    leased = [j["id"] for j in api.ok("POST", f"/sessions/{sess2['id']}", json={"max_num_jobs": 5})]
    assert leased == [other["id"]]
    (item,) = api.ok("GET", "/transfers/", params={"job_id": parent["id"]})["results"]
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "batch_job_id": bj["id"], "ttl_sec": 600})
    return {"site": site["id"], "site2": site2["id"], "app": app["id"], "app2": app2["id"], "bj": bj["id"],
            "bj2": bj2["id"], "job": parent["id"], "child": child["id"], "job2": other["id"], "sess": sess["id"],
            "sess2": sess2["id"], "ti": item["id"], "cred": cred["id"], "launcher": cred["access_token"]}


def _requests(x: dict[str, Any], mine: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(method, path, JSON body, query) of every route and method, naming the records ``x`` (the
    victim's, or ids that do not exist) beside the caller's own ``mine`` where a request needs them."""
    bj_body = {"project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 1, "job_mode": "mpi"}
    fresh = uuid.uuid4().hex
    return [
        ("GET", f"/sites/{x['site']}", None, None),
        ("GET", f"/sites/{x['site']}/backlog", None, None),
        ("PUT", f"/sites/{x['site']}", {"name": "taken-over"}, None),
        ("GET", "/sites/", None, {"id": x["site"]}),
        ("GET", f"/apps/{x['app']}", None, None),
        ("PUT", f"/apps/{x['app']}", {"description": "taken over"}, None),
        ("GET", "/apps/", None, {"site_id": x["site"]}),
        ("POST", "/apps/", {"site_id": x["site"], "name": "Z", "serialized_class": "", "source_code": ""}, None),
        ("GET", f"/jobs/{x['job']}", None, None),
        ("PUT", f"/jobs/{x['job']}", {"data": {"x": 1}}, None),
        ("PUT", f"/jobs/{x['job']}", {"state": "RESTART_READY"}, None),
        ("PATCH", "/jobs/", [{"id": x["job"], "data": {"x": 1}}], None),
        ("PATCH", "/jobs/", [{"id": mine["job"], "batch_job_id": x["bj"]}], None),
        ("PATCH", "/jobs/", [{"id": x["job2"], "state": "RUNNING", "session_id": x["sess2"]}], None),
        *[("GET", "/jobs/", None, params) for params in (
            {"id": x["job"]}, {"parent_id": x["job"]}, {"app_id": x["app"]}, {"site_id": x["site"]},
            {"site_id": x["site"], "state": "READY"}, {"batch_job_id": x["bj"]}, {"app_id": x["app"], "tags": "k:a"})],
        ("PUT", "/jobs/", {"data": {"x": 2}}, {"site_id": x["site"]}),
        ("PUT", "/jobs/", {"state": "RESTART_READY"}, {"parent_id": x["job"]}),
        ("DELETE", "/jobs/", None, {"id": x["job"]}),
        ("DELETE", "/jobs/", None, {"app_id": x["app"]}),
        ("POST", "/jobs/", [{"workdir": fresh, "app_id": x["app"]}], None),
        ("POST", "/jobs/", [{"workdir": fresh, "app_id": mine["app"], "parent_ids": [x["job"]]}], None),
        ("POST", "/jobs/", [{"workdir": fresh, "app_id": mine["app"], "batch_job_id": x["bj"]}], None),
        ("GET", f"/batch-jobs/{x['bj']}", None, None),
        ("PUT", f"/batch-jobs/{x['bj']}", {"state": "queued"}, None),
        ("PUT", f"/batch-jobs/{x['bj']}", {"site_id": x["site"], "queue": "q"}, None),
        ("PATCH", "/batch-jobs/", [{"id": x["bj"], "state": "queued"}], None),
        ("POST", "/batch-jobs/", {"site_id": x["site"], **bj_body}, None),
        ("GET", "/batch-jobs/", None, {"site_id": x["site"]}),
        ("POST", "/sessions/", {"site_id": x["site"]}, None),
        ("POST", "/sessions/", {"site_id": mine["site"], "batch_job_id": x["bj"]}, None),
        ("POST", f"/sessions/{x['sess']}", {"max_num_jobs": 5}, None),
        ("POST", f"/sessions/{mine['sess2']}", {"max_num_jobs": 5, "app_ids": [x["app2"]]}, None),
        ("GET", f"/sites/{mine['site']}/backlog", None, {"batch_job_id": x["bj"], "state": "READY"}),
        ("PUT", f"/sessions/{x['sess']}", {}, None),
        ("PUT", f"/sessions/{mine['sess2']}", {"job_ids": [x["job2"]]}, None),
        ("POST", f"/sessions/{x['sess2']}/release", {"job_ids": [x["job2"]]}, None),
        ("POST", f"/sessions/{mine['sess2']}/release", {"job_ids": [x["job2"]]}, None),
        ("GET", "/sessions/", None, {"id": x["sess"]}),
        ("GET", f"/transfers/{x['ti']}", None, None),
        ("PUT", f"/transfers/{x['ti']}", {"state": "done"}, None),
        ("PATCH", "/transfers/", [{"id": x["ti"], "state": "done"}], None),
        ("GET", "/transfers/", None, {"job_id": x["job"]}),
        ("GET", "/events/", None, {"job_id": x["job"]}),
        ("GET", "/events/", None, {"batch_job_id": x["bj"]}),
        ("POST", "/auth/credentials", {"site_id": x["site"], "ttl_sec": 60}, None),
        ("POST", "/auth/credentials", {"site_id": mine["site"], "batch_job_id": x["bj"], "ttl_sec": 60}, None),
        ("POST", f"/auth/credentials/{x['cred']}/renew", {"ttl_sec": 60}, None),
        ("GET", "/auth/credentials", None, {"site_id": x["site"]}),
        ("DELETE", f"/sessions/{x['sess']}", None, None),
        ("DELETE", f"/auth/credentials/{x['cred']}", None, None),
        ("DELETE", f"/batch-jobs/{x['bj']}", None, None),
        ("DELETE", f"/jobs/{x['child']}", None, None),
        ("DELETE", f"/apps/{x['app2']}", None, None),
        ("DELETE", f"/sites/{x['site2']}", None, None),
    ]


def _dashboard_requests(x: dict[str, Any]) -> list[tuple[str, Any]]:
    """(path, query) of the dashboard's pages and its JSON (the plots' data) naming the records ``x``."""
    return [
        (f"/dashboard/jobs/{x['job']}", None),
        ("/dashboard/jobs", {"site_id": x["site"]}),
        ("/dashboard/jobs", {"parent_id": x["job"], "app_id": x["app"]}),
        ("/dashboard/jobs", {"batch_job_id": x["bj"], "tags": "k:a"}),
        ("/dashboard/events", {"job_id": x["job"]}),
        ("/dashboard/batch-jobs", {"site_id": x["site"]}),
        ("/dashboard/plots/data", {"site_id": x["site"]}),
        ("/dashboard/plots/data", {"tags": "k:a"}),
    ]


def _snapshot(api: Api) -> dict[str, Any]:
    out = {}
    for path in ("/sites/", "/apps/", "/jobs/", "/batch-jobs/", "/sessions/", "/transfers/", "/events/", "/auth/credentials"):
        body = api.ok("GET", path, params={"limit": 1000})
        for row in body["results"]:
            row.pop("heartbeat", None)  # the sessions' own clock
            row.pop("last_used", None)
        out[path] = body
    return out


def _answer(resp: httpx.Response) -> tuple[int, str]:
    """The answer with its digits left out (the ids it names are those the request sent)."""
    return resp.status_code, re.sub(r"\d+", "N", resp.text)


class _RowLocks:
    """PostgreSQL: the victim's rows of every table locked FOR UPDATE by a connection of its own
    (their owner's writes in flight), and a look at whether a request waits for them: a request of
    another user must never lock (or wait for) a row it may not see. Waiting told that user which
    ids exist and when their owner writes (a 404 that comes late only for those), and held up the
    owner's own writes meanwhile."""

    TABLES = {"sites": ("site", "site2"), "apps": ("app", "app2"), "batch_jobs": ("bj", "bj2"),
              "jobs": ("job", "child", "job2"), "sessions": ("sess", "sess2"), "transfer_items": ("ti",),
              "credentials": ("cred",)}

    def __init__(self, database_url: str, victim: dict[str, Any]) -> None:
        self.engine = sa.create_engine(database_url)
        self.holder, self.look = self.engine.connect(), self.engine.connect()
        self.tx = self.holder.begin()
        for table, names in self.TABLES.items():
            self.holder.execute(sa.text(f"SELECT id FROM {table} WHERE id = ANY(:ids) FOR UPDATE"),
                                {"ids": [victim[name] for name in names]})
        self.pid = self.holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()

    def request(self, http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The request, sent from a thread while this looks whether it waits for the locks (it
        fails at once if it does; the locks go at :meth:`close`, and the request with them)."""
        answer: list[Any] = []
        sender = threading.Thread(target=lambda: answer.append(http.request(method, path, **kwargs)), daemon=True)
        sender.start()
        while sender.is_alive():
            waits = self.look.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                                      {"pid": self.pid}).scalar()
            self.look.rollback()  # pg_stat_activity is read once per transaction
            assert not waits, f"{method} {path} {kwargs} waited for a lock on another user's row"
            sender.join(0.01)
        return answer[0]

    def close(self) -> None:
        self.tx.rollback()
        self.holder.close()
        self.look.close()
        self.engine.dispose()


def _probe(http: httpx.Client, victim: dict[str, Any], mine: dict[str, Any], locks: "_RowLocks | None" = None) -> list[str]:
    """What differs between the answers for the victim's records and for ids that do not exist, and
    any request that changed something or listed a record (each a line). ``locks``: the victim's
    rows are held meanwhile (PostgreSQL), and no request may wait for them."""
    missing = {name: MISSING + i for i, name in enumerate(victim)}
    send = http.request if locks is None else lambda *args, **kwargs: locks.request(http, *args, **kwargs)
    problems = []
    for (method, path, body, params), (_m, path_x, body_x, params_x) in zip(_requests(victim, mine), _requests(missing, mine)):
        theirs = send(method, path, json=body, params=params)
        nobody = send(method, path_x, json=body_x, params=params_x)
        said = f"{method} {path} {json.dumps(body)} {params}: {theirs.status_code} {theirs.text[:200]}"
        if _answer(theirs) != _answer(nobody):
            problems.append(f"{said} (for a missing id: {nobody.status_code} {nobody.text[:200]})")
        elif theirs.status_code < 300 and not (theirs.text in ("0", "[]") or '"count":0' in theirs.text
                                               or '"released":[]' in theirs.text or '"gone":[' in theirs.text
                                               or '"states":{}' in theirs.text):
            problems.append(said)
    return problems


@pytest.fixture
def two_users(server_url: str, db_kind: str, register: Any, request: pytest.FixtureRequest) -> Any:
    """Users A and B with a world each; B also holds a launcher credential of one second (expired by
    the time a test reads it) and a login it logged out of. On PostgreSQL, the database's URL."""
    a, b = Api(server_url, register), Api(server_url, register)
    database_url = request.getfixturevalue("_live_server_pg_obj").database_url if db_kind == "postgresql" else None
    try:
        site = b.site()
        short = b.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 1})["access_token"]
        login = httpx.post(f"{b.url}/auth/password/login", data={"username": b.username, "password": b.password},
                           timeout=30).json()["access_token"]
        assert httpx.post(f"{b.url}/auth/logout", headers={"Authorization": f"Bearer {login}"}, timeout=30).status_code == 204
        yield a, _world(a, "a"), b, _world(b, "b"), {"expired": short, "logged out": login}, database_url
    finally:
        a.close()
        b.close()


#: Every authenticated route and method (each answers 401 before looking at its path, query or body).
AUTHENTICATED = [
    ("GET", "/sites/"), ("POST", "/sites/"), ("GET", "/sites/1"), ("PUT", "/sites/1"), ("DELETE", "/sites/1"),
    ("GET", "/sites/1/backlog"), ("GET", "/apps/"), ("POST", "/apps/"), ("GET", "/apps/1"), ("PUT", "/apps/1"),
    ("DELETE", "/apps/1"), ("GET", "/jobs/"), ("POST", "/jobs/"), ("PATCH", "/jobs/"), ("PUT", "/jobs/"),
    ("DELETE", "/jobs/"), ("POST", "/jobs/reservations"), ("GET", "/jobs/1"), ("PUT", "/jobs/1"), ("DELETE", "/jobs/1"),
    ("GET", "/batch-jobs/"), ("POST", "/batch-jobs/"), ("PATCH", "/batch-jobs/"), ("GET", "/batch-jobs/1"),
    ("PUT", "/batch-jobs/1"), ("DELETE", "/batch-jobs/1"), ("GET", "/sessions/"), ("POST", "/sessions/"),
    ("POST", "/sessions/1"), ("PUT", "/sessions/1"), ("DELETE", "/sessions/1"), ("POST", "/sessions/1/release"),
    ("GET", "/transfers/"), ("PATCH", "/transfers/"), ("GET", "/transfers/1"), ("PUT", "/transfers/1"),
    ("GET", "/events/"), ("GET", "/auth/password/me"), ("POST", "/auth/logout"), ("GET", "/auth/credentials"),
    ("POST", "/auth/credentials"), ("DELETE", "/auth/credentials/1"), ("POST", "/auth/credentials/1/renew"),
    ("POST", "/dashboard/login-link"),
]


def test_another_users_records_answer_as_missing(two_users: Any) -> None:
    """User B against A's records, then A's launcher credential (limited to A's first site) against
    A's other site: nothing read, counted, changed or told apart from a missing id. Then B's expired
    and logged-out tokens against every route, and a token sent in the query string: 401. On
    PostgreSQL B's requests run while A's rows are locked (:class:`_RowLocks`): none may wait."""
    a, mine_a, b, mine_b, dead_tokens, database_url = two_users
    before = _snapshot(a)
    locks = _RowLocks(database_url, mine_a) if database_url is not None else None
    try:
        assert _probe(b.http, mine_a, mine_b, locks) == []
    finally:
        if locks is not None:
            locks.close()
    other_site = dict(mine_a, site=mine_a["site2"], app=mine_a["app2"], bj=mine_a["bj2"], job=mine_a["job2"],
                      child=mine_a["job2"], sess=mine_a["sess2"], ti=MISSING - 1, cred=MISSING - 2)
    locks = _RowLocks(database_url, other_site) if database_url is not None else None
    try:
        with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {mine_a['launcher']}"}, timeout=60) as launcher:
            assert _probe(launcher, other_site, mine_a, locks) == []
    finally:
        if locks is not None:
            locks.close()
    assert _snapshot(a) == before

    # The dashboard (B logged in with a one-time link): its pages and its JSON as for missing ids.
    link = b.ok("POST", "/dashboard/login-link")
    missing = {name: MISSING + i for i, name in enumerate(mine_a)}
    with httpx.Client(base_url=b.url, timeout=60) as browser:
        assert browser.get(link["path"]).status_code == 303
        for (path, params), (path_x, params_x) in zip(_dashboard_requests(mine_a), _dashboard_requests(missing)):
            theirs, nobody = browser.get(path, params=params), browser.get(path_x, params=params_x)
            assert _answer(theirs) == _answer(nobody), (path, params, theirs.text[-300:], nobody.text[-300:])
            assert all(name not in theirs.text for name in ("a/p", "a/c", "a/o", a.username)), (path, params)

    assert httpx.get(f"{a.url}/jobs/", params={"access_token": a.token}, timeout=30).status_code == 401
    for what, token in dead_tokens.items():
        with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as dead:
            deadline = time.monotonic() + 30
            while dead.get("/sites/").status_code != 401:  # the one-second credential's second may not be over yet
                assert time.monotonic() < deadline, what
                time.sleep(0.1)
            assert [(m, p, r.status_code) for m, p in AUTHENTICATED for r in [dead.request(m, p, json={})]
                    if r.status_code != 401] == [], what


@pytest.mark.parametrize("url, logged", [
    ("http://h/jobs/?access_token=eyJ0.eyJ1.c2ln", '"GET /jobs/?access_token=[redacted] HTTP/1.1" 401'),
    ("http://h/sites/?id=1&Token=eyJ0.eyJ1.c2ln", '"GET /sites/?id=1&Token=[redacted] HTTP/1.1" 401'),
    ("http://h/auth/password/login?username=u&password=hunter2%20secret",
     '"GET /auth/password/login?username=u&password=[redacted] HTTP/1.1" 401'),
    ("http://h/auth/token?grant_type=refresh_token&refresh%5Ftoken=bsr1.1.c2Vj",
     '"GET /auth/token?grant_type=refresh_token&refresh%5Ftoken=[redacted] HTTP/1.1" 401'),
    ("http://h/dashboard/ticket?t=eyJ0.eyJ1.c2ln", '"GET /dashboard/ticket?t=[redacted] HTTP/1.1" 401'),
    # Other parameters, and ``t`` of other paths, are logged as they were.
    ("http://h/jobs/?id=7&t=kept&tags=token:x", '"GET /jobs/?id=7&t=kept&tags=token:x HTTP/1.1" 401'),
])
def test_credentials_in_a_query_string_stay_out_of_the_access_log(url: str, logged: str) -> None:
    """No route takes a credential from the query (the request is refused), but uvicorn logs the
    target first: a client that sent its token, password or refresh code there left it in the log."""
    line = uvicorn_access_line(url)
    assert logged in line
    assert "c2ln" not in line and "hunter2" not in line and "c2Vj" not in line


@pytest.mark.postgres
def test_the_dashboards_job_counts_tell_nothing_of_other_users_tags(_live_server_pg_obj: Any, register: Any) -> None:
    """PostgreSQL: the Jobs page counts a filter of two tags over every matching job (exact) when one
    of them is rare (at most window // RARE_TAG_SHARE jobs), else over the user's newest ``window``
    jobs (not exact once the user has more). Decided on every user's jobs, B (with a window's worth
    of jobs) learned from "exact" whether more than that many jobs of *A* carry a tag B has none of."""
    from starlette.datastructures import QueryParams as StarletteQueryParams

    from balsam.server import jobs_logic
    from balsam.server.http import QueryParams

    a, b = Api(_live_server_pg_obj.url, register), Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    try:
        a_tag, b_tag = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
        app_a = a.app(a.site()["id"])
        a.ok("POST", "/jobs/", 201, json=[{"workdir": f"x/{i}", "app_id": app_a["id"], "tags": {"x": a_tag}} for i in range(3)])
        app_b = b.app(b.site()["id"])
        b.ok("POST", "/jobs/", 201, json=[{"workdir": f"z/{i}", "app_id": app_b["id"], "tags": {"z": b_tag} if i < 3 else {}}
                                          for i in range(21)])
        query = QueryParams(StarletteQueryParams([("tags", f"x:{a_tag}"), ("tags", f"z:{b_tag}")]))
        with engine.connect() as conn:
            # B has no job tagged x: nothing matches, exactly (as if A's three jobs did not exist).
            assert jobs_logic.count_jobs_by_state(conn, b.user_id, query, window=20) == ({}, True)
    finally:
        engine.dispose()
        a.close()
        b.close()


# An Idempotency-Key replay stays within a launcher credential's site: before, site 1's launcher
# sending the body and key its user had sent for site 2 got site 2's job (with data written since)
# and BatchJob back.
def test_a_launcher_cannot_replay_keys_of_another_scope(api: Api) -> None:
    site1, site2 = api.site(), api.site()
    app2 = api.app(site2["id"])
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site1["id"], "ttl_sec": 600})
    body = [{"workdir": "keyed/1", "app_id": app2["id"]}]
    job = api.ok("POST", "/jobs/", 201, json=body, headers={"Idempotency-Key": "k-create"})[0]
    api.ok("PUT", f"/jobs/{job['id']}", json={"data": {"secret": "written later"}})
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site2["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 1, "job_mode": "mpi"})
    patch = [{"id": bj["id"], "status_info": {"x": "y"}}]
    api.ok("PATCH", "/batch-jobs/", json=patch, headers={"Idempotency-Key": "k-patch"})
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"}, timeout=30) as launcher:
        for method, path, sent, key in (("POST", "/jobs/", body, "k-create"), ("PATCH", "/batch-jobs/", patch, "k-patch")):
            resp = launcher.request(method, path, json=sent, headers={"Idempotency-Key": key})
            # Refused as a key used for another request: nothing of it answered (not even whether
            # its records still exist, which a 404 or 409 would tell).
            assert resp.status_code == 422 and "already used for a different request" in resp.text, resp.text
            assert "written later" not in resp.text and f'"site_id":{site2["id"]}' not in resp.text.replace(" ", "")
