"""Helpers of the dashboard tests: logging in through the form, reading pages."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

TOKEN_RE = re.compile(r'name="(login_token|csrf_token)" value="([^"]+)"')


def hidden_field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name} in the page"
    return match.group(1)


def login(client: "httpx.Client | Any", username: str, password: str, next_url: str = "") -> httpx.Response:
    """Log in through the dashboard's form (GET for the nonce cookie, then POST). Returns the POST answer."""
    page = client.get("/dashboard/login")
    assert page.status_code == 200, page.text
    return client.post("/dashboard/login", data={
        "username": username, "password": password, "login_token": hidden_field(page.text, "login_token"),
        "next": next_url,
    }, follow_redirects=False)


def logged_in_client(url: str, username: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    answer = login(client, username, password)
    assert answer.status_code == 303, answer.text
    return client


def make_campaign(url: str, token: str, n_jobs: int = 5, name: "str | None" = None, finished: bool = False) -> dict[str, Any]:
    """A site, an app and jobs of one user, made through the REST API: the first job failed with an
    error (as a launcher reports it), the second finished (``finished=True``), the rest are STAGED_IN."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    name = name or f"site-{uuid.uuid4().hex[:6]}"
    site = api.post("/sites/", json={"name": name, "path": f"/tmp/{name}"}).json()
    app = api.post("/apps/", json={"site_id": site["id"], "name": "Sim", "serialized_class": "", "source_code": "",
                                   "parameters": {}, "transfers": {}, "description": ""}).json()
    jobs = api.post("/jobs/", json=[{"app_id": app["id"], "workdir": f"run/{i}", "tags": {"batch": str(i % 2)}}
                                    for i in range(n_jobs)]).json()
    failed = jobs[0]["id"]
    for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}),
                        ("RUN_ERROR", {"returncode": 3, "error": "Traceback (most recent call last):\nValueError: bad mesh 42"}),
                        ("FAILED", {"message": "the run failed"})):
        resp = api.patch("/jobs/", json=[{"id": failed, "state": state, "state_data": data}])
        assert resp.status_code == 200, resp.text
    if finished:
        for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}), ("RUN_DONE", {}), ("POSTPROCESSED", {})):
            resp = api.patch("/jobs/", json=[{"id": jobs[1]["id"], "state": state, "state_data": data}])
            assert resp.status_code == 200, resp.text
    api.close()
    return {"site": site, "app": app, "jobs": jobs, "failed": failed, "finished": jobs[1]["id"] if finished else None}


def text_of(html: str) -> str:
    """The page's visible text, whitespace collapsed (for simple assertions)."""
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


#: Browser tests, per element of a selector: on how many lines its text is laid out (the tops of
#: its text's boxes; a name broken inside a word has two).
LINES_JS = """selector => [...document.querySelectorAll(selector)].map(cell => {
  const lines = new Set(), texts = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  for (let text = texts.nextNode(); text; text = texts.nextNode()) {
    const range = document.createRange(); range.selectNodeContents(text);
    [...range.getClientRects()].filter(r => r.width > 0).forEach(r => lines.add(Math.round(r.top)));
  }
  return lines.size;
})"""

#: Browser tests, in the window as it is: how far each table's box (.table-scroll, which scrolls
#: sideways where its table is wider than the window) is wider than it shows, for the boxes that
#: scroll (px, by the table's id or class): the page's own width hides them.
BOXES_JS = """() => Object.fromEntries([...document.querySelectorAll('.table-scroll')].map((box, i) => {
  const table = box.querySelector('table');
  return [table && table.id || `${table && table.className || 'table'} ${i + 1}`, box.scrollWidth - box.clientWidth];
}).filter(([_, over]) => over > 0))"""

#: Browser tests, in the window as it is: how far the page is wider than the window (px; <= 0: it
#: does not scroll sideways), the tables' boxes that scroll (BOXES_JS), the header's and the filter
#: forms' controls and the pager's links that lie outside the window, the table headers broken
#: inside a word (on more lines than words), and the tables' boxes a screen reader cannot name (role
#: region, aria-label), or whose place in the Tab order is wrong: one that scrolls is a stop (to
#: scroll it with the arrow keys), one that does not is none (a stop that would do nothing).
LAYOUT_JS = """() => {
  const w = window.innerWidth, outside = [], broken = [];
  const unreachable = [...document.querySelectorAll('.table-scroll')].filter(box =>
    (box.scrollWidth > box.clientWidth ? box.tabIndex !== 0 : box.tabIndex >= 0)
    || box.getAttribute('role') !== 'region' || !(box.getAttribute('aria-label') || '').trim()).map(box => box.outerHTML.slice(0, 80));
  const controls = 'header.top a, header.top button, form.filters input:not([type=hidden]), form.filters select, '
                 + 'form.filters button, form.filters a, nav.pager a';
  for (const el of document.querySelectorAll(controls)) {
    const r = el.getBoundingClientRect();
    if (r.left < -0.5 || r.right > w + 0.5) outside.push(el.outerHTML.slice(0, 80));
  }
  for (const th of document.querySelectorAll('main thead th')) {
    const lines = new Set(), range = document.createRange();
    range.selectNodeContents(th);
    [...range.getClientRects()].filter(r => r.width > 0).forEach(r => lines.add(Math.round(r.top)));
    if (lines.size > th.textContent.trim().split(/[\\s\\u2013-]+/).length) broken.push(th.textContent);
  }
  return {overflow: document.documentElement.scrollWidth - w, boxes: (""" + BOXES_JS + """)(), outside, broken, unreachable};
}"""
