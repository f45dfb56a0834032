"""The dashboard read as a browser would (plain HTTP, real uvicorn): the Plots page leaves its figures
to the one data request plots.js makes, a tag whose value has a space or a comma can be asked for
(quoted) and the page's own links keep it quoted, and a launcher's RUN_TIMEOUT reason is shown at
the top of the job page."""

from __future__ import annotations

import html
import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


@pytest.fixture
def counted_plot_data(database_url: str, monkeypatch: pytest.MonkeyPatch, register: Any,
                      serve_in_process: Any) -> dict[str, Any]:
    """A server in this process whose plot_data counts its calls (a subprocess would not see the patch)."""
    from balsam.server.app import create_app
    from balsam.server.dashboard import views
    from balsam.server.settings import ServerSettings

    calls: list[int] = []
    real = views.plot_data

    def counting(*args: Any, **kwargs: Any) -> dict:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(views, "plot_data", counting)
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="plots-once-secret-0123456789-abcdefghijklmnop"),
        create_tables_now=True))
    username, password, _user_id, token, _ = register(url)
    make_campaign(url, token, n_jobs=2, finished=True, name=f"once-{uuid.uuid4().hex[:6]}")
    return {"client": logged_in_client(url, username, password), "calls": calls}


def test_the_plots_page_leaves_the_figures_to_its_data_request(counted_plot_data: dict) -> None:
    """Before: the page computed plot_data for its summary table, then plots.js fetched plots/data,
    which computed it again (and dashboard.js refetched the page for its live summary): at 100,000
    jobs an open Plots tab kept the server busy 21 % of the time."""
    client, calls = counted_plot_data["client"], counted_plot_data["calls"]
    page = client.get("/dashboard/plots")
    assert page.status_code == 200, page.text
    assert len(calls) == 0
    assert "data-live" not in page.text  # nothing for dashboard.js to refresh besides plots.js
    assert 'id="summary-finished"' in page.text and 'data-url="/dashboard/plots/data"' in page.text
    data = client.get("/dashboard/plots/data")
    assert data.status_code == 200 and data.json()["summary"]["finished"] == 1
    assert len(calls) == 1
    # A filter the data request would refuse is still refused on the page, with the API's message.
    bad = client.get("/dashboard/plots?site_id=abc")
    assert bad.status_code == 422 and "site_id: expected an integer" in html.unescape(text_of(bad.text))
    assert len(calls) == 1


@pytest.fixture
def tagged(live_server: str, register: Any) -> dict[str, Any]:
    username, password, _user_id, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=1, name=f"tags-{uuid.uuid4().hex[:6]}")
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": w, "tags": {"exp": v, "k": "1"}}
                                    for w, v in (("spaced", "a b"), ("plain", "a"), ("comma", "c,d"))])
    assert made.status_code == 201, made.text
    ids = {j["workdir"]: j["id"] for j in made.json()}
    api.close()
    return {"client": logged_in_client(live_server, username, password), "ids": ids, "token": token, "url": live_server}


def _listed(page_html: str) -> set[int]:
    return {int(i) for i in re.findall(r'href="/dashboard/jobs/(\d+)"', page_html)}


@pytest.mark.parametrize("typed, workdir", [
    ('"exp:a b"', "spaced"), ('exp:"a b" k:1', "spaced"), ("'exp:a b',k:1", "spaced"), ('"exp:c,d"', "comma"),
    ("exp:a", "plain"), ("exp:a, k:1", "plain"),
])
def test_a_quoted_tag_keeps_its_space_or_comma(tagged: dict, typed: str, workdir: str) -> None:
    """Before: tags were split on every space and comma: ``"exp:a b"`` was refused ("expected
    KEY:VALUE, got 'b\"'") while the API and ``balsam job ls -t 'exp=a b'`` find the job."""
    client, ids = tagged["client"], tagged["ids"]
    page = client.get("/dashboard/jobs", params={"tags": typed})
    assert page.status_code == 200, html.unescape(text_of(page.text))
    assert _listed(page.text) == {ids[workdir]}
    # The same answer as the API's (one tags parameter per tag there).
    tags = {"spaced": "exp:a b", "comma": "exp:c,d", "plain": "exp:a"}[workdir]
    api = httpx.get(f"{tagged['url']}/jobs/", params={"tags": tags}, headers={"Authorization": f"Bearer {tagged['token']}"})
    assert {j["id"] for j in api.json()["results"]} == {ids[workdir]}
    # The page's own links (a state in the counts table) keep the tag whole, and so does its Tags field.
    link = re.search(r'<a href="(/dashboard/jobs\?[^"]*state=STAGED_IN[^"]*)"', page.text)
    assert link, "no state link in the counts table"
    href = html.unescape(link.group(1))
    assert "STAGED_IN" in dict(parse_qsl(urlsplit(href).query)).get("state", "")
    followed = client.get(href)
    assert followed.status_code == 200, html.unescape(text_of(followed.text))
    assert _listed(followed.text) == {ids[workdir]}
    field = re.search(r'<input name="tags" value="([^"]*)"', page.text)
    assert field, "no Tags field"
    again = client.get("/dashboard/jobs", params={"tags": html.unescape(field.group(1))})
    assert again.status_code == 200 and _listed(again.text) == {ids[workdir]}


def test_a_quoted_tag_on_the_plots_page_and_its_data(tagged: dict) -> None:
    client = tagged["client"]
    page = client.get("/dashboard/plots", params={"tags": '"exp:a b"'})
    assert page.status_code == 200, html.unescape(text_of(page.text))
    data_url = html.unescape(re.search(r'data-url="([^"]*)"', page.text).group(1))
    assert client.get(data_url).status_code == 200


@pytest.mark.parametrize("typed, quote", [('"exp:a b', '"'), ("k:1 exp:'a b", "'")])
def test_an_unbalanced_quote_is_refused_in_one_line(tagged: dict, typed: str, quote: str) -> None:
    client = tagged["client"]
    for path in ("/dashboard/jobs", "/dashboard/plots"):
        page = client.get(path, params={"tags": typed})
        text = html.unescape(text_of(page.text))
        assert page.status_code == 422, text
        assert f"tags: unbalanced quote ({quote}) in {typed!r}" in text
        assert "matching job" not in text
        field = re.search(r'<input name="tags" value="([^"]*)"', page.text)
        assert field and html.unescape(field.group(1)) == typed  # the field keeps what was typed, to correct it


def test_a_launcher_timeout_reason_is_shown_at_the_top(live_server: str, register: Any) -> None:
    """Before: the launcher's RUN_TIMEOUT (state_data {"reason": ...}, runner.report_timeout) showed
    nothing above the history; only the server's own {"message": ...} was shown there."""
    username, password, _user_id, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=2, name=f"timeout-{uuid.uuid4().hex[:6]}")
    job = campaign["jobs"][1]["id"]
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}),
                        ("RUN_TIMEOUT", {"reason": "launcher stopped (wall time)"})):
        answer = api.patch("/jobs/", json=[{"id": job, "state": state, "state_data": data}])
        assert answer.status_code == 200, answer.text
    api.close()
    client = logged_in_client(live_server, username, password)
    text = html.unescape(text_of(client.get(f"/dashboard/jobs/{job}").text))
    top = text[:text.index("History")]
    assert "RUNNING → RUN_TIMEOUT" in top
    assert "Reason: launcher stopped (wall time)" in top
