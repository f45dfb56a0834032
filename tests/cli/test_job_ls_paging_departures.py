"""``balsam job ls`` reads its listing in pages ordered by id, the pages after the first by id
(``id__gt``, keyset paging). Jobs that leave the filter while it lists (deleted, or no longer
matching: a state change under ``--state RUNNING`` on a live campaign) move no other job: before
(offset pages), one job per departure was skipped at the next page boundary and never listed.

The departures happen between two pages: a hook on the client's ``GET /jobs/`` runs before the
N-th of them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


def _listed_ids(output: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", output, re.M)]


@pytest.fixture
def jobs23(balsam_env: Any, tmp_path: Path) -> list[int]:
    from balsam.api import ApplicationDefinition, Job, Site

    path = tmp_path / "site-pages"
    (path / "data").mkdir(parents=True)
    site = Site.objects.create(name="site-pages", path=str(path))
    (path / ".balsam-site").write_text(f"{site.id}\n")

    class Hello(ApplicationDefinition):
        site = "site-pages"
        command_template = "echo hi"

    Hello.sync()
    Job.objects.bulk_create([Job(workdir=f"w/{i}", app_id=Hello, tags={"keep": "1"}) for i in range(23)])
    return sorted(j.id for j in Job.objects.all())


@pytest.fixture
def between_pages(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[int, Callable[[], None]]], list[int]]:
    """``between_pages({n: action})``: ``action`` runs before the ``n``-th ``GET /jobs/`` (from 0).
    Returns the offsets asked for (0 for a page asked by id), in order."""
    import balsam.cli.job as job_cli
    from balsam.client.rest import RESTClient

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 5, raising=False)
    offsets: list[int] = []
    actions: dict[int, Callable[[], None]] = {}
    send = RESTClient._send

    def hooked(self: Any, method: str, path: str, **kw: Any) -> Any:
        if method.upper() == "GET" and path.rstrip("/") == "/jobs":
            offset = int((kw.get("params") or {}).get("offset", 0))
            offsets.append(offset)
            action = actions.pop(len(offsets) - 1, None)
            if action is not None:
                action()
        return send(self, method, path, **kw)

    monkeypatch.setattr(RESTClient, "_send", hooked)

    def install(wanted: dict[int, Callable[[], None]]) -> list[int]:
        actions.update(wanted)
        return offsets

    return install


def _api(balsam_env: Any) -> httpx.Client:
    return httpx.Client(base_url=balsam_env.url, headers=balsam_env.headers(), timeout=60)


def test_jobs_deleted_below_the_read_position_do_not_hide_later_ones(
        balsam_env: Any, jobs23: list[int], between_pages: Any) -> None:
    """Before: two jobs deleted from the first page while the second was asked for hid the two
    jobs just after it (the 6th and 7th of 23), and one more deleted from a page listed already
    before the next request hid one more."""
    api = _api(balsam_env)
    gone: list[int] = []

    def delete(*ids: int) -> Callable[[], None]:
        def run() -> None:
            for jid in ids:
                assert api.delete(f"/jobs/{jid}").status_code == 204
                gone.append(jid)
        return run

    # request 0 reads jobs 0-4; 1 (offset 5) comes after two of them left; the later deletion
    # comes before the 4th request, of a job listed already (jobs 5-9 are the 2nd or 3rd page)
    offsets = between_pages({1: delete(jobs23[1], jobs23[3]), 3: delete(jobs23[7])})
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    listed = _listed_ids(out.output)
    assert len(listed) == len(set(listed)), out.output  # none printed twice
    assert listed == sorted(listed), listed
    survivors = [j for j in jobs23 if j not in gone]
    # every surviving job listed (the deleted ones were listed before they left)
    assert [j for j in listed if j not in gone] == survivors, (listed, survivors, offsets)
    assert listed == jobs23, (listed, offsets)
    # one request per page: the first by offset, the others by id (no offset)
    assert len(gone) == 3 and offsets == [0, 0, 0, 0, 0], offsets
    api.close()


def test_jobs_leaving_a_tag_filter_and_deletions_above_the_read_position(
        balsam_env: Any, jobs23: list[int], between_pages: Any) -> None:
    """Jobs that stop matching the filter (here their tag changes) move the later ones back as a
    deletion does; jobs deleted above the read position move nothing back: the page read again from
    earlier only brings rows listed already, dropped by id."""
    api = _api(balsam_env)

    def retag(*ids: int) -> Callable[[], None]:
        def run() -> None:
            resp = api.patch("/jobs/", json=[{"id": jid, "tags": {"keep": "0"}} for jid in ids])
            assert resp.status_code == 200, resp.text
        return run

    def delete_later() -> None:
        for jid in (jobs23[20], jobs23[21]):
            assert api.delete(f"/jobs/{jid}").status_code == 204

    between_pages({1: retag(jobs23[0], jobs23[2], jobs23[4]), 3: delete_later})
    out = balsam("job", "ls", "--site", "all", "-t", "keep=1")
    assert out.exit_code == 0, out.output
    listed = _listed_ids(out.output)
    assert len(listed) == len(set(listed)), out.output
    # the first page was listed before its jobs left the filter; every other job but the deleted ones
    expected = [j for j in jobs23 if j not in (jobs23[20], jobs23[21])]
    assert listed == expected, (listed, expected)
    api.close()
