"""The dashboard shown hostile and odd data that users control, in a real headless Chromium (as
test_dashboard_layout_browser.py): markup and scripts in every value (site names, paths, queues,
tags, job data, workdirs, error tails, event data, BatchJob fields) show as text and run nothing;
bidi controls reorder only their own value; names thousands of characters long wrap inside the
window while a name of 20 characters keeps its line; the header wraps in a phone's window; odd
query parameters get one clear message; the static files carry the pages' security headers; a
login's ``next`` never leaves the dashboard."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import LINES_JS, logged_in_client, login  # noqa: E402
from test_dashboard_layout_browser import VIEWPORT, chromium  # noqa: E402,F401  (the browser fixture)

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


#: An app name of 20 characters: on one line in the Jobs table beside workdirs hundreds long.
SHORT_NAME = "MolecularDynamicsSim"


#: A Jobs page filter with markup in it (shown back in the filter form), held by the workdirs of
#: the jobs of the app named :data:`SHORT_NAME`.
QUERY = xss("query").replace("/", "_")


def hostile(name: str, length: int = 3000) -> str:
    """Every kind of hostile value at once: markup (:func:`xss`), a bidi override never closed, and
    ``length`` characters without a space."""
    return xss(name) + RLO + name[0] * length


def _hostile_campaign(api: httpx.Client) -> dict[str, Any]:
    """One site carrying every kind of hostile value (markup, a bidi override, thousands of
    characters without a space) in every field; its apps: one named 3,000 characters, one named
    :data:`SHORT_NAME` whose two jobs have long workdirs holding the filter :data:`QUERY`."""
    tag = uuid.uuid4().hex[:6]
    site = _made(api.post("/sites/", json={
        "name": f"evil-{tag} " + hostile("site-name"), "path": "/tmp/" + hostile("site-path").replace("/", "_"),
        "backfill_windows": {hostile("backfill")[:256]: [{"num_nodes": 2, "wall_time_min": 10}]},
        "allowed_queues": {hostile("queue-name")[:256]: {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 1}},
        "queued_jobs": {"1": {"scheduler_id": 1, "queue": hostile("queued-queue"), "num_nodes": 1, "wall_time_min": 5,
                              "project": "p", "state": "queued", "queued_time_min": 1, "time_remaining_min": 5,
                              "message": hostile("queued-message")}}}))
    app = lambda name: _made(api.post("/apps/", json={  # noqa: E731
        "site_id": site["id"], "name": name, "serialized_class": xss("class"), "source_code": "", "parameters": {},
        "transfers": {}, "description": xss("description")}))["id"]
    long_app, short_app = app("A" * 3000), app(SHORT_NAME)  # (an app's name is an identifier)
    job = _made(api.post("/jobs/", json=[
        {"app_id": long_app, "workdir": "w/" + hostile("workdir").replace("/", "_"),
         "tags": {hostile("tag-key")[:256]: hostile("tag-value")[:1024], "next": "after"},
         "data": {hostile("data-key")[:256]: hostile("data-value"),
                  "embedded": "</script><script>window.__pwned='json'</script>"}},
    ] + [{"app_id": short_app, "workdir": "x" * 400 + f"/{i}/" + QUERY, "tags": {"t" * 100: "y" * 300}} for i in range(2)]))[0]["id"]
    for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}),
                        ("RUN_ERROR", {"returncode": 3, "error": hostile("error-tail") + "\n" + RLO, "note": hostile("note")}),
                        ("FAILED", {"message": hostile("message"), "reason": hostile("reason")})):
        _made(api.patch("/jobs/", json=[{"id": job, "state": state, "state_data": data}]))
    bj = _made(api.post("/batch-jobs/", json={
        "site_id": site["id"], "project": hostile("project"), "queue": hostile("queue"), "num_nodes": 1, "wall_time_min": 5,
        "job_mode": "mpi", "filter_tags": {hostile("filter-key")[:256]: hostile("filter-value")[:1024]},
        "status_info": {"submitted_by": hostile("submitted-by"), hostile("status-key")[:256]: hostile("status-value")}}))
    _made(api.patch("/jobs/", json=[{"id": job, "batch_job_id": bj["id"]}]))
    return {"site": site, "job": job, "app": long_app}


#: Per page: nothing ran, nothing was made of the markup, nothing widened the page past the window.
_INSPECT = """() => ({
  pwned: window.__pwned === undefined ? null : String(window.__pwned),
  made: [...document.querySelectorAll('main img, main iframe, main svg, main object, main script, a[href^="javascript:" i]')]
        .map(e => e.outerHTML.slice(0, 80)),
  overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  text: document.querySelector('main').innerText,
})"""

#: Whether ``after`` (an element or a range) is laid out after ``before``'s last line: to its right
#: on that line, or on a line below. A bidi override that leaks reverses the order on the line.
_FOLLOWS = """(before, after) => {
  const last = [...before.getClientRects()].pop(), first = after.getClientRects()[0];
  return first.top >= last.bottom - 1 || first.left >= last.right - 1;
}"""


def _ticket_page(chromium: Any, url: str, api: httpx.Client) -> Any:
    """A logged-in tab, as :func:`_page` but through a one-time login link (no password to check:
    some 1 s less of the server's CPU)."""
    page = chromium.new_context(base_url=url, viewport=VIEWPORT).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.errors = errors
    assert page.goto(_made(api.post("/dashboard/login-link"))["path"]).url == f"{url}/dashboard/"
    return page


def _cells(page: Any, table: str) -> list[int]:
    return page.evaluate(f"() => [...document.querySelectorAll('{table} tbody tr')].map(tr => tr.children.length)")


def test_hostile_values_show_as_text_on_every_page(chromium: Any, live_server: str, register: Any) -> None:
    """Before: a site, app or queue name of 3,000 characters made pages up to 60,000 px wide (the
    Site and App selects, the Jobs table's Site and App columns, the site card's queue tables, the
    job page's header); a bidi override in a site's name or path, or in a workdir, reversed the
    text after it ("#12 idle", "agent last heard never", "(stdout and stderr ...)"); a username of
    150 characters (the most allowed) made every page 518 px too wide. Then: the Jobs table broke
    app names of 20 characters in the middle (its name columns shrank to a character beside long
    workdirs); at 390 px the header's links made every page 112 px too wide."""
    username = "h" + uuid.uuid4().hex + "u" * 117
    _username, _password, _user_id, token, _ = register(live_server, username)
    api = _api(live_server, token)
    made = _hostile_campaign(api)
    page = _ticket_page(chromium, live_server, api)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.clock.install()  # (for the live refresh at the end)
    marker = 'onerror="window.__pwned='
    pages = {  # path: (status, whether the page shows the stored markup as text)
        "/dashboard/": (200, True),
        "/dashboard/jobs": (200, True),
        f"/dashboard/jobs/{made['job']}": (200, True),
        "/dashboard/batch-jobs": (200, True),
        "/dashboard/events": (200, True),
        # filters with markup, shown back in the filter form (and in the plots' data URL)
        "/dashboard/plots?" + urlencode({"tags": "'k:\"><img src=x onerror=window.__pwned=1>'"}): (200, False),
        "/dashboard/jobs?" + urlencode({"workdir__contains": QUERY}): (200, True),
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
        if path == "/dashboard/":
            # A bidi override reorders only its own value: what follows it keeps its order.
            card = f"#site-{made['site']['id']}"
            assert page.evaluate(f"""card => {{
              const follows = {_FOLLOWS}, c = document.querySelector(card), code = c.querySelector('p.muted code');
              const after = document.createRange();
              after.setStartAfter(code); after.setEndBefore(c.querySelector('p.muted time'));
              return [follows(c.querySelector('h2 bdi'), c.querySelector('h2 .muted')),
                      follows(c.querySelector('h2 .muted'), c.querySelector('h2 .badge')),
                      follows(code, after), follows(after, c.querySelector('p.muted time'))];
            }}""", card) == [True] * 4
        elif path == "/dashboard/jobs":  # one row per job, each with its 7 cells: no value broke out of its cell
            assert _cells(page, "#jobs-table") == [7, 7, 7]
        elif path.startswith("/dashboard/jobs/"):
            assert page.evaluate(f"""() => {{
              const code = document.getElementById('job-out'), after = document.createRange();
              after.setStartAfter(code); after.setEndAfter(code.parentNode.lastChild);
              return ({_FOLLOWS})(code, after);
            }}""")
        elif path == "/dashboard/batch-jobs":
            assert _cells(page, "#batch-jobs") == [15]
        elif path == "/dashboard/events":
            assert set(_cells(page, "#events-table")) == {6}
        elif path.startswith("/dashboard/jobs?"):
            # the app's name on one line in each row, beside workdirs of 400 characters and more
            assert page.evaluate(LINES_JS, "#jobs-table tbody td:nth-child(3)") == [1, 1], path
            assert page.evaluate(LINES_JS, "#jobs-table tbody td:nth-child(4)") != [1, 1]
        elif status == 422:
            # in a phone's window the header's links wrap: the page is no wider than the window
            page.set_viewport_size({"width": 390, "height": 800})
            assert page.evaluate(_INSPECT)["overflow"] <= 0
            assert page.evaluate("() => document.querySelector('header.top').getBoundingClientRect().right") <= 390
            page.set_viewport_size(VIEWPORT)
    # no dialog; no script refused by the CSP, none failed (the 422 and 404 pages' own statuses are logged too)
    assert dialogs == [] and [e for e in page.errors if not re.search("status of (422|404)", e)] == []

    # The dashboard's one state-changing form (logout), posted by another site's page in this browser.
    page.route("http://attacker.invalid/**", lambda route: route.fulfill(content_type="text/html", body=(
        f'<form id="f" method="post" action="{live_server}/dashboard/logout"><input name="csrf_token" value="guess"></form>'
        '<script>document.getElementById("f").submit()</script>')))
    page.goto("http://attacker.invalid/")
    page.wait_for_url(f"{live_server}/dashboard/logout")
    assert page.goto("/dashboard/jobs").url == f"{live_server}/dashboard/jobs"  # still logged in

    # A live refresh brings a new job's markup into the page as the server escaped it: nothing runs.
    _made(api.post("/jobs/", json=[{"app_id": made["app"], "workdir": "live", "tags": {"live": xss("live-refresh")}}]))
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


def test_login_next_never_leaves_the_dashboard(chromium: Any, live_server: str, register: Any) -> None:
    """Before: ``next=/dashboard/../../elsewhere`` sent the browser, logged in, to ``/elsewhere`` (a
    browser resolves the dots): another application behind the same host. Then: ``//`` or ``\\``
    in the query (``workdir__contains=a//b``) was refused too, as if in the path."""
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
    # Before: slashes in the query (a bookmarked filter) landed on /dashboard/ after the login.
    for kept, location in (("/dashboard/jobs?workdir__contains=a//b", "/dashboard/jobs?workdir__contains=a//b"),
                           ("/dashboard/jobs?workdir__contains=a\\b", "/dashboard/jobs?workdir__contains=a%5Cb")):
        assert client.get("/dashboard/login", params={"next": kept}).headers["location"] == location, kept
    # Where Chromium goes with each Location: inside the dashboard, whatever the target.
    locations = [client.get("/dashboard/login", params={"next": target}) for target in HOSTILE_NEXT]
    assert {answer.status_code for answer in locations} == {303}
    page = chromium.new_page()
    landed = page.evaluate("([base, locations]) => locations.map(l => new URL(l, base).href)",
                           [live_server + "/dashboard/login", [answer.headers["location"] for answer in locations]])
    page.close()
    assert [url for url in landed if not url.startswith(live_server + "/dashboard/")] == []
    refused = {target for target, answer in zip(HOSTILE_NEXT, locations) if answer.headers["location"] == "/dashboard/"}
    assert refused == {  # every dot segment, '//' or '\\' in the path, every address outside the dashboard
        "/dashboard/\\evil.example", "/dashboard//evil.example", "/dashboard/..%2f..%2fx", "/dashboard/%2e%2e/x",
        "/dashboard/%2E./x", "/dashboard/.%2e/x", "/dashboard/.\t./x", "/dashboard/.\n./x", "/dashboard/x/..",
        "/dashboard/x/%2e", "/dashboard/\\/evil", "https://evil.example/dashboard/", "//evil.example/dashboard/"}


#: Targets for a login's ``next`` that try to leave the dashboard (a reviewer's list): slashes and
#: backslashes, encoded or not; dot segments encoded every way (fullwidth and one-dot-leader dots
#: too); a host after ``@``; ``..;``; tabs and line breaks; NUL; a whole URL; dots in a fragment.
HOSTILE_NEXT = [
    "/dashboard/\\evil.example", "/dashboard//evil.example", "/dashboard/%2f%2fevil.example", "/dashboard/%5c%5cevil.example",
    "/dashboard/..%2f..%2fx", "/dashboard/%2e%2e/x", "/dashboard/%2E./x", "/dashboard/.%2e/x", "/dashboard/%252e%252e/x",
    "/dashboard/%2e%252e/x", "/dashboard/\uff0e\uff0e/x", "/dashboard/\u2024\u2024/x", "/dashboard/@evil.example",
    "/dashboard/..;/x", "/dashboard/.\t./x", "/dashboard/.\n./x", "/dashboard/\t/evil.example", "/dashboard/\n/evil.example",
    "/dashboard/%09/evil.example", "/dashboard/x/..", "/dashboard/x/%2e", "/dashboard/x/.%00.", "/dashboard/\\/evil",
    "/dashboard/%E3%80%82%E3%80%82/x", "/dashboard/ ../x", "/dashboard/.. /x", "/dashboard/..%20/x", "/dashboard/%20../x",
    "https://evil.example/dashboard/", "//evil.example/dashboard/", "/dashboard/jobs?x=1#/../..", "/dashboard/x#\\evil",
    "/dashboard/jobs?workdir__contains=/a/../b", "/dashboard/plots?tags=x:../..", "/dashboard/events?before=123#x",
]


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
