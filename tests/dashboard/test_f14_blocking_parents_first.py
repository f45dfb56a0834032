"""A job page lists at most 200 parents (d5f9049), in id order: a FAILED parent past the first 200,
which keeps the job waiting, was named in neither the Parents list nor the "Waiting for" line; and
the re-run advice named every FAILED parent (5,000: 68 KB of ``-i``). Now FAILED parents come
first, then the other unfinished ones, in both; the advice names 200 and says how many more."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


def _child_page(live_server: str, register: Any, n: int, states: Callable[[list[int]], dict[int, str]]) -> tuple[list[int], str]:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=1)
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": f"sim/{i}"} for i in range(n)])
    assert made.status_code == 201, made.text
    ids = sorted(j["id"] for j in made.json())
    wanted = states(ids)
    # JOB_FINISHED by way of POSTPROCESSED, as a job gets there.
    for step in ({i: "POSTPROCESSED" for i, s in wanted.items() if s == "JOB_FINISHED"}, wanted):
        changed = api.patch("/jobs/", json=[{"id": i, "state": s} for i, s in step.items()])
        assert changed.status_code < 300, changed.text
    child = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": "reduce", "parent_ids": ids}])
    assert child.status_code == 201, child.text
    assert child.json()[0]["state"] == "AWAITING_PARENTS"
    api.close()
    client = logged_in_client(live_server, username, password)
    page = client.get(f"/dashboard/jobs/{child.json()[0]['id']}")
    client.close()
    assert page.status_code == 200, page.text[:2000]
    return ids, page.text


def _listed(page: str) -> list[int]:
    listed = re.search(r'<ul id="parents">(.*?)</ul>', page, re.S)
    assert listed, page[:2000]
    return [int(i) for i in re.findall(r'<li><a href="[^"]*/jobs/(\d+)"', listed.group(1))]


def _waiting(page: str) -> str:
    waiting = re.search(r'id="waiting-for"[^>]*>(.*?)</p>', page, re.S)
    assert waiting, page[-3000:]
    return text_of(waiting.group(1))


def test_a_failed_parent_past_200_is_listed_first(live_server: str, register: Any) -> None:
    # 300 parents: the last FAILED, the first 50 finished, the rest STAGED_IN.
    ids, page = _child_page(live_server, register, 300,
                            lambda ids: {ids[-1]: "FAILED", **{i: "JOB_FINISHED" for i in ids[:50]}})
    shown = _listed(page)
    assert shown == [ids[-1]] + ids[50:249]  # FAILED, then the unfinished by id; the finished last
    waiting = _waiting(page)
    assert waiting.startswith(f"Waiting for: {ids[-1]} (FAILED), {ids[50]} (STAGED_IN), "), waiting[:200]
    assert "and 50 more" in waiting  # 250 waited for, 200 named
    assert not re.search(rf"(?<!\d){ids[0]} \(", waiting)  # a finished parent is not waited for
    assert f"-i {ids[-1]} -s RESTART_READY" in text_of(page)


def test_the_rerun_advice_names_at_most_200_failed_parents(live_server: str, register: Any) -> None:
    ids, page = _child_page(live_server, register, 1000, lambda ids: {i: "FAILED" for i in ids})
    text = text_of(page)
    rerun = re.search(r"balsam job modify ((?:-i \d+ )+)-s RESTART_READY", text)
    assert rerun, text[-3000:]
    assert rerun.group(1).split()[1::2] == [str(i) for i in ids[:200]]
    assert "-s RESTART_READY and 800 more" in text
    assert text.count("-i ") == 201  # and the child's own, to move it on
    assert _listed(page) == ids[:200]
