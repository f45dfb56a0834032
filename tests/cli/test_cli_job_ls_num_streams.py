"""``balsam job ls -n N`` with N above a page streams the newest N a page at a time (the N-th
newest id, then pages from it on), as the listing without ``-n`` does: one request of N held every job at once
(``-n 100000`` of 10^5 jobs: 340 MB against 70 MB for the whole streamed listing). N up to a
page stays one request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import (balsam, fresh_api_state, job_requests,  # noqa: F401 (fixtures; fresh_api_state: autouse)
                            make_marked_site, sync_hello)


def test_num_above_a_page_reads_pages(balsam_env: Any, tmp_path: Path, job_requests: list[dict],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam.cli.job as job_cli
    from balsam.api import Job

    site = make_marked_site(tmp_path, "num")
    app_id = sync_hello("num", "echo hi").__app_id__
    ids = sorted(j.id for j in Job.objects.bulk_create([Job(workdir=f"n/{i}", app_id=app_id) for i in range(11)]))
    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 3)
    job_requests.clear()
    out = balsam("job", "ls", "--site", str(site.id), "-n", "7")
    assert out.exit_code == 0, out.output
    assert [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", out.output, re.M)] == ids[-7:], out.output
    assert job_requests and all(int(p["limit"]) <= 3 for p in job_requests), job_requests
    # Up to a page: one request of N, as before.
    job_requests.clear()
    out = balsam("job", "ls", "--site", str(site.id), "-n", "2", "--json")
    assert out.exit_code == 0 and [j["id"] for j in json.loads(out.output)] == ids[-2:], out.output
    assert len(job_requests) == 1, job_requests
