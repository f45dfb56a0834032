"""``balsam queue ls -h -n N`` reads the last N BatchJobs only (one request of N, newest first, listed
oldest to newest): it read the site's whole history and kept the last N (10^5 BatchJobs of a
long-lived elastic queue for five lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site  # noqa: F401 (fresh_api_state: autouse)

from balsam.client import RESTClient


def test_num_reads_only_the_last_n(balsam_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import BatchJob

    site = make_marked_site(tmp_path, "qn")
    ids = [BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, queue="debug", project="p",
                                   job_mode="mpi").id for _ in range(4)]
    sent: list[dict] = []
    real = RESTClient._send

    def recording(self: Any, method: str, path: str, **kw: Any) -> Any:
        if path.rstrip("/") == "/batch-jobs":
            sent.append(dict(kw.get("params") or {}))
        return real(self, method, path, **kw)

    monkeypatch.setattr(RESTClient, "_send", recording)
    out = balsam("queue", "ls", "--site", str(site.id), "-h", "-n", "2", "--json")
    assert out.exit_code == 0, out.output
    assert [b["id"] for b in json.loads(out.output)] == ids[-2:]
    assert sent and all(int(p["limit"]) <= 2 for p in sent), sent
