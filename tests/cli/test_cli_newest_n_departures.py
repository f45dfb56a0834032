"""``job ls -n N`` above a page and ``transfer ls -n N`` list exactly the newest N while older records
leave the selection (deleted, or a state change under ``-s`` on a live campaign). They read a
count, then the page at offset count - N one request later: each record leaving below meanwhile
shifted that offset and dropped one of the newest N. Now the N-th newest id comes first (one
record, ``ordering=-id``), then id-ordered pages from it on (``id__gt``), or one request of N up
to a page. A server that ignores ``id__gt`` is read from the offset of that same request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site, stage_in_jobs, sync_hello  # noqa: F401 (autouse)

from balsam.client.rest import RESTClient


def _after_first_get(monkeypatch: pytest.MonkeyPatch, path: str, action: Callable[[], None]) -> list[dict]:
    """Run ``action`` once, right after the command's first GET of ``path``; returns the GETs' params."""
    real = RESTClient._send
    sent: list[dict] = []
    busy: list[bool] = []

    def sending(self: Any, method: str, where: str, **kw: Any) -> Any:
        answer = real(self, method, where, **kw)
        if busy:
            return answer  # the action's own requests
        if method.upper() == "GET" and where.rstrip("/") == path:
            sent.append(dict(kw.get("params") or {}))
            if len(sent) == 1:
                busy.append(True)
                action()
        return answer

    monkeypatch.setattr(RESTClient, "_send", sending)
    return sent


def _job_ids(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", text, re.M)]


@pytest.fixture
def jobs(balsam_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    import balsam.cli.job as job_cli
    from balsam.api import Job

    site = make_marked_site(tmp_path, "dep")
    app_id = sync_hello("dep", "echo hi").__app_id__
    ids = sorted(j.id for j in Job.objects.bulk_create([Job(workdir=f"d/{i}", app_id=app_id) for i in range(11)]))
    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 3)  # -n 7 is above a page
    return site, ids


def test_job_ls_n_keeps_the_newest_when_older_jobs_go(jobs: tuple[Any, list[int]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import Job

    site, ids = jobs
    _after_first_get(monkeypatch, "/jobs", lambda: Job.objects.filter(id=ids[:3]).delete())
    out = balsam("job", "ls", "--site", str(site.id), "-n", "7")
    assert out.exit_code == 0, out.output
    # The 3 deleted jobs were never among the newest 7.
    assert _job_ids(out.stdout) == ids[-7:], out.output


def test_job_ls_n_state_changes_below_under_state_filter(jobs: tuple[Any, list[int]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import Job

    site, ids = jobs

    def fail_oldest() -> None:
        Job.objects.filter(id=ids[:2]).update(state="FAILED")

    _after_first_get(monkeypatch, "/jobs", fail_oldest)
    out = balsam("job", "ls", "--site", str(site.id), "-s", "STAGED_IN", "-n", "5", "--json")
    assert out.exit_code == 0, out.output
    assert [j["id"] for j in json.loads(out.stdout)] == ids[-5:], out.output


def test_server_ignoring_id_after_reads_from_the_offset(jobs: tuple[Any, list[int]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that ignores ``id__gt`` (Balsam 0.7's ignores unknown parameters) answers from the
    listing's start: the pages are read by offset from the N-th newest's position instead."""
    site, ids = jobs
    real = RESTClient._send

    def ignoring(self: Any, method: str, where: str, **kw: Any) -> Any:
        if kw.get("params"):
            kw["params"] = {k: v for k, v in dict(kw["params"]).items() if k != "id__gt"}
        return real(self, method, where, **kw)

    monkeypatch.setattr(RESTClient, "_send", ignoring)
    out = balsam("job", "ls", "--site", str(site.id), "-n", "7")
    assert out.exit_code == 0, out.output
    assert _job_ids(out.stdout) == ids[-7:], out.output
    out = balsam("job", "ls", "--site", str(site.id), "-n", "20")  # more than match: all of them
    assert _job_ids(out.stdout) == ids, out.output


@pytest.fixture
def items(balsam_env: Any, tmp_path: Path) -> tuple[int, list[int]]:
    """A site with 6 jobs of one stage-in item each: (site id, the job ids oldest first)."""
    site_id, job_ids = stage_in_jobs(tmp_path, "tn", "t", 6)
    return site_id, sorted(job_ids)


@pytest.mark.parametrize("page_size", [None, 2])
def test_transfer_ls_n_keeps_the_newest_when_older_items_go(items: tuple[int, list[int]], page_size: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam._api.query import Query
    from balsam.api import Job

    site_id, job_ids = items
    if page_size:
        monkeypatch.setattr(Query, "page_size", page_size)  # -n 3 is above a page
    _after_first_get(monkeypatch, "/transfers", lambda: Job.objects.filter(id=job_ids[:2]).delete())
    out = balsam("transfer", "ls", "--site", str(site_id), "-n", "3")
    assert out.exit_code == 0, out.output
    assert [int(row.split()[1]) for row in out.output.splitlines()[1:]] == job_ids[-3:], out.output
