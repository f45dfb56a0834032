"""The dashboard shown hostile and odd data that users control, in a real headless Chromium (as
test_dashboard_layout_browser.py): markup and scripts in every value (site names, paths, queues,
tags, job data, workdirs, error tails, event data, BatchJob fields) show as text and run nothing;
bidi controls reorder only their own value; names thousands of characters long wrap inside the
window; odd query parameters get one clear message; the static files carry the pages' security
headers; a login's ``next`` never leaves the dashboard."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, login  # noqa: E402
from test_dashboard_layout_browser import _page, chromium  # noqa: E402,F401  (the browser fixture)

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE, never closed


def xss(name: str) -> str:
    """Markup that runs a script wherever it is not escaped (``window.__pwned``; a dialog)."""
    return (f'<img src=x onerror="window.__pwned=\'{name}\';alert(1)">"><script>window.__pwned="{name}"</script>'
            f"</script><a href=\"javascript:window.__pwned='{name}'\">x</a>")


def _api(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _made(resp: httpx.Response) -> Any:
    assert resp.status_code in (200, 201), resp.text[:500]
    return resp.json()


def _hostile_campaign(api: httpx.Client) -> dict[str, Any]:
    """Three sites of one user: one with markup in every field, one with bidi controls, one with
    names and values thousands of characters long without a space."""
    tag = uuid.uuid4().hex[:6]
    queued = lambda queue, message: {"1": {"scheduler_id": 1, "queue": queue, "num_nodes": 1, "wall_time_min": 5,  # noqa: E731
                                           "project": "p", "state": "queued", "queued_time_min": 1,
                                           "time_remaining_min": 5, "message": message}}
    evil = _made(api.post("/sites/", json={
        "name": f"evil-{tag} " + xss("site-name"), "path": "/tmp/" + xss("site-path").replace("/", "_"),
        "backfill_windows": {xss("backfill")[:256]: [{"num_nodes": 2, "wall_time_min": 10}]},
        "allowed_queues": {xss("queue-name")[:256]: {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 1}},
        "queued_jobs": queued(xss("queued-queue"), xss("queued-message"))}))
    bidi = _made(api.post("/sites/", json={"name": f"bidi-{tag}{RLO}", "path": f"/tmp/bidi{RLO}"}))
    long = _made(api.post("/sites/", json={
        "name": "N" * 3000, "path": "/" + "p" * 3000, "backfill_windows": {"b" * 256: [{"num_nodes": 2, "wall_time_min": 10}]},
        "allowed_queues": {"a" * 256: {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 1}},
        "queued_jobs": queued("q" * 3000, "m" * 3000)}))
    app = lambda site, name: _made(api.post("/apps/", json={  # noqa: E731
        "site_id": site["id"], "name": name, "serialized_class": xss("class"), "source_code": "", "parameters": {},
        "transfers": {}, "description": xss("description")}))["id"]
    evil_app, bidi_app, long_app = app(evil, "Sim"), app(bidi, "Sim"), app(long, "A" * 3000)  # an identifier
    evil_job, bidi_job, long_job = (j["id"] for j in _made(api.post("/jobs/", json=[
        {"app_id": evil_app, "workdir": "w/" + xss("workdir").replace("/", "_"),
         "tags": {xss("tag-key")[:256]: xss("tag-value")},
         "data": {xss("data-key")[:256]: xss("data-value"), "embedded": "</script><script>window.__pwned='json'</script>"}},
        {"app_id": bidi_app, "workdir": f"run{RLO}/1", "tags": {f"k{RLO}": "v", "next": "after"}},
        {"app_id": long_app, "workdir": "w" * 3000, "tags": {"k" * 256: "v" * 1024}, "data": {"d" * 256: "x" * 10240}},
    ])))
    for job, extra in ((evil_job, xss), (long_job, lambda n: n[0] * 5000)):
        for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}),
                            ("RUN_ERROR", {"returncode": 3, "error": extra("error-tail") + "\n" + RLO, "note": extra("note")}),
                            ("FAILED", {"message": extra("message"), "reason": extra("reason")})):
            _made(api.patch("/jobs/", json=[{"id": job, "state": state, "state_data": data}]))
    for site, job, value in ((evil, evil_job, xss), (long, long_job, lambda n: n[0] * 3000)):
        bj = _made(api.post("/batch-jobs/", json={
            "site_id": site["id"], "project": value("project"), "queue": value("queue"), "num_nodes": 1, "wall_time_min": 5,
            "job_mode": "mpi", "filter_tags": {value("filter-key")[:256]: value("filter-value")[:1024]},
            "status_info": {"submitted_by": value("submitted-by"), value("status-key")[:256]: value("status-value")}}))
        _made(api.patch("/jobs/", json=[{"id": job, "batch_job_id": bj["id"]}]))
    return {"evil": evil, "bidi": bidi, "long": long, "evil_job": evil_job, "bidi_job": bidi_job, "long_job": long_job,
            "evil_app": evil_app}


#: Per page: nothing ran, nothing was made of the markup, nothing widened the page past the window.
_INSPECT = """() => ({
  pwned: window.__pwned === undefined ? null : String(window.__pwned),
  made: [...document.querySelectorAll('main img, main iframe, main svg, main object, main script, a[href^="javascript:" i]')]
        .map(e => e.outerHTML.slice(0, 80)),
  overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  text: document.querySelector('main').innerText,
})"""


def _cells(page: Any, table: str) -> list[int]:
    return page.evaluate(f"() => [...document.querySelectorAll('{table} tbody tr')].map(tr => tr.children.length)")


def test_hostile_values_show_as_text_on_every_page(chromium: Any, live_server: str, register: Any) -> None:
    """Before: a site, app or queue name of 3,000 characters made pages up to 60,000 px wide (the
    Site and App selects, the Jobs table's Site and App columns, the site card's queue tables, the
    job page's header); a bidi override in a site's name or path, or in a workdir, reversed the
    text after it ("#12 idle", "agent last heard never", "(stdout and stderr ...)"); a username of
    150 characters (the most allowed) made every page 518 px too wide."""
    username = "h" + uuid.uuid4().hex + "u" * 117
    _username, password, _user_id, token, _ = register(live_server, username)
    api = _api(live_server, token)
    made = _hostile_campaign(api)
    page = _page(chromium, live_server, username, password)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    marker = 'onerror="window.__pwned='
    pages = {  # path: (status, whether the page shows the stored markup as text)
        "/dashboard/": (200, True),
        "/dashboard/jobs": (200, True),
        f"/dashboard/jobs/{made['evil_job']}": (200, True),
        f"/dashboard/jobs/{made['long_job']}": (200, False),
        "/dashboard/batch-jobs": (200, True),
        "/dashboard/events": (200, True),
        # filters with markup, shown back in the filter form (and in the plots' data URL)
        "/dashboard/plots?" + urlencode({"tags": "'k:\"><img src=x onerror=window.__pwned=1>'"}): (200, False),
        "/dashboard/jobs?" + urlencode({"workdir__contains": xss("query")}): (200, False),
        "/dashboard/events?" + urlencode({"tags": xss("bad-tags")}): (422, False),
        "/dashboard/" + quote(xss("address")): (404, True),  # "No page at ..."
    }
    for path, (status, shows_markup) in pages.items():
        answer = page.goto(path)
        assert answer.status == status, (path, answer.status)
        seen = page.evaluate(_INSPECT)
        assert seen["pwned"] is None and seen["made"] == [], (path, seen["pwned"], seen["made"])
        assert seen["overflow"] <= 0, (path, seen["overflow"])
        if shows_markup:
            assert marker in seen["text"], path
        if path == "/dashboard/jobs":  # one row per job, each with its 7 cells: no value broke out of its cell
            assert _cells(page, "#jobs-table") == [7, 7, 7]
        elif path == "/dashboard/batch-jobs":
            assert _cells(page, "#batch-jobs") == [15, 15]
        elif path == "/dashboard/events":
            assert set(_cells(page, "#events-table")) == {6}
    # no dialog; no script refused by the CSP, none failed (the 422 and 404 pages' own statuses are logged too)
    assert dialogs == [] and [e for e in page.errors if not re.search("status of (422|404)", e)] == []

    # A bidi override reorders only its own value: what follows it keeps its order.
    page.goto("/dashboard/")
    card = f"#site-{made['bidi']['id']}"
    order = page.evaluate("""card => {
      const c = document.querySelector(card), left = e => e.getBoundingClientRect().left;
      const code = c.querySelector('p.muted code'), after = document.createRange();
      after.setStartAfter(code); after.setEndBefore(c.querySelector('p.muted time'));
      return {id_before_badge: left(c.querySelector('h2 .muted')) < left(c.querySelector('h2 .badge')),
              text_before_time: after.getBoundingClientRect().right <= left(c.querySelector('p.muted time')) + 1};
    }""", card)
    assert order == {"id_before_badge": True, "text_before_time": True}
    page.goto(f"/dashboard/jobs/{made['bidi_job']}")
    assert page.evaluate("""() => {
      const code = document.getElementById('job-out'), after = document.createRange();
      after.setStartAfter(code); after.setEndAfter(code.parentNode.lastChild);
      return after.getBoundingClientRect().left >= code.getBoundingClientRect().right - 1;
    }""")
    assert [e for e in page.errors if not re.search("status of (422|404)", e)] == []

    # The dashboard's one state-changing form (logout), posted by another site's page in this browser.
    page.route("http://attacker.invalid/**", lambda route: route.fulfill(content_type="text/html", body=(
        f'<form id="f" method="post" action="{live_server}/dashboard/logout"><input name="csrf_token" value="guess"></form>'
        '<script>document.getElementById("f").submit()</script>')))
    page.goto("http://attacker.invalid/")
    page.wait_for_url(f"{live_server}/dashboard/logout")
    assert page.goto("/dashboard/jobs").url == f"{live_server}/dashboard/jobs"  # still logged in

    # A live refresh brings a new job's markup into the page as the server escaped it: nothing runs.
    page.clock.install()
    page.goto("/dashboard/jobs")
    _made(api.post("/jobs/", json=[{"app_id": made["evil_app"], "workdir": "live", "tags": {"live": xss("live-refresh")}}]))
    with page.expect_response(lambda response: response.url.endswith("/dashboard/jobs")):
        page.clock.fast_forward(6000)
    page.wait_for_function("() => document.querySelectorAll('#jobs-table tbody tr').length === 4")
    seen = page.evaluate(_INSPECT)
    assert (seen["pwned"], seen["made"], dialogs) == (None, [], [])


#: Odd values for every query parameter of every page: each answered with one line saying what
#: is wrong (422) or the page (200), never a server error.
ODD_VALUES = ["-1", "99999999999999999999999", "abc", "1e999", "' OR 1=1 --", "\x00", "<b>", '"unbalanced']
PAGE_PARAMS = {
    "jobs": ["state", "tags", "site_id", "app_id", "batch_job_id", "workdir__contains", "parent_id", "before", "after",
             "limit", "count"],
    "batch-jobs": ["state", "site_id", "id", "page"],
    "events": ["job_id", "batch_job_id", "site_id", "from_state", "to_state", "tags", "timestamp_after", "before", "after"],
    "plots": ["site_id", "tags"],
}


def test_odd_query_parameters_get_one_clear_message(live_server: str, register: Any) -> None:
    username, password, _user_id, token, _ = register(live_server)
    client = logged_in_client(live_server, username, password)
    for page, names in PAGE_PARAMS.items():
        for name in names:
            for value in ODD_VALUES:
                answer = client.get(f"/dashboard/{page}", params={name: value})
                errors = re.findall(r'<p class="error" role="alert">(.*?)</p>', answer.text, re.S)
                assert answer.status_code in (200, 422), (page, name, value, answer.status_code)
                assert "Traceback" not in answer.text
                assert len(errors) == (1 if answer.status_code == 422 else 0), (page, name, value, errors)
                if errors:
                    assert name in errors[0] and "\n" not in errors[0].strip(), (page, name, value, errors)
    # Before: some 500 tags made SQLite refuse the statement, answered as a database outage (503).
    many_tags = [("tags", f"k{i}:v") for i in range(600)]
    for page in ("jobs", "events", "plots", "plots/data"):
        answer = client.get(f"/dashboard/{page}", params=many_tags)
        assert answer.status_code == 422 and "tags: at most 100 tags, got 600" in answer.text, (page, answer.status_code)
    assert client.get("/dashboard/jobs", params=many_tags[:100]).status_code == 200


def test_the_jobs_page_pages_past_32_bit_job_ids(live_server: str, register: Any) -> None:
    """Before: ``?before=2147483648`` (the "Older" link below a job id past 2**31; job ids are
    64-bit, as the Events page's event ids) answered "before: integer out of range"."""
    username, password, _user_id, token, _ = register(live_server)
    _made(_api(live_server, token).post("/sites/", json={"name": f"s-{uuid.uuid4().hex[:6]}", "path": "/tmp/s"}))
    client = logged_in_client(live_server, username, password)
    for cursor in ("before", "after"):
        answer = client.get("/dashboard/jobs", params={cursor: str(2 ** 31)})
        assert answer.status_code == 200, re.findall(r'class="error" role="alert">(.*?)</p>', answer.text)
    assert client.get("/dashboard/jobs", params={"before": str(2 ** 63)}).status_code == 422


def test_static_files_carry_the_pages_security_headers(live_server: str) -> None:
    """Before: the scripts, the stylesheet and the SVG icon came without ``nosniff`` or a CSP."""
    for path in ("/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css", "/dashboard/static/favicon.svg",
                 "/dashboard/static/vendor/uplot/uPlot.iife.min.js"):
        answer = httpx.get(live_server + path)
        assert answer.status_code == 200, path
        assert answer.headers.get("x-content-type-options") == "nosniff", path
        assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", ""), path
        assert answer.headers.get("x-frame-options") == "DENY", path
    assert httpx.get(live_server + "/dashboard/static/nope.js").headers.get("x-content-type-options") == "nosniff"


def test_login_next_never_leaves_the_dashboard(live_server: str, register: Any) -> None:
    """Before: ``next=/dashboard/../../elsewhere`` sent the browser, logged in, to ``/elsewhere`` (a
    browser resolves the dots): another application behind the same host."""
    username, password, _user_id, _token, _ = register(live_server)
    answer = login(httpx.Client(base_url=live_server), username, password, next_url="/dashboard/../../elsewhere")
    assert (answer.status_code, answer.headers["location"]) == (303, "/dashboard/")
    client = logged_in_client(live_server, username, password)  # (the login page sends a session on to its next)
    for target in ("/dashboard/%2e%2e/elsewhere", "/dashboard/jobs/./../../x", "/dashboard/.%09./elsewhere",
                   "/dashboard/%2E%2E?x=1"):
        answer = client.get("/dashboard/login", params={"next": target})
        assert (answer.status_code, answer.headers["location"]) == (303, "/dashboard/"), target
    kept = "/dashboard/jobs?tags=a:..&x=%2e%2e"  # dots in the query are a filter, not a path
    assert client.get("/dashboard/login", params={"next": kept}).headers["location"] == kept


def test_a_refused_login_link_page_sends_no_referrer(live_server: str) -> None:
    """The page of a refused link has the ticket in its address: its stylesheet, script and links
    (a proxy's access log records a Referer) must not repeat it."""
    answer = httpx.get(live_server + "/dashboard/ticket", params={"t": "not-a-ticket"})
    assert answer.status_code == 401
    assert answer.headers["referrer-policy"] == "no-referrer"


def test_an_oversized_form_is_refused_with_a_page(live_server: str) -> None:
    """Before: the API's JSON (``{"detail": ...}``), without the pages' security headers."""
    answer = httpx.post(live_server + "/dashboard/login", content=b"username=" + b"x" * 70_000,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413 and answer.headers["content-type"].startswith("text/html")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert re.findall(r'<p class="error" role="alert">(.*?)</p>', answer.text) == [
        "Request body of 70009 bytes exceeds the limit of 65536 bytes"]
