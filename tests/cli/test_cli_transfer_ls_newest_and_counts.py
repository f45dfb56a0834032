"""``balsam transfer ls -n N`` and ``--by-state`` read no more than they show. Before, both read
every transfer item of the selection (a campaign's 10^5 stage-ins: 3.7 s and 250 MB for
``-n 3``, 1.8 s and 190 MB for the counts); now ``-n N`` is one read of N (``ordering=-id``), and
``--by-state`` one count request (``limit=0``) per direction and state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, stage_in_jobs  # noqa: F401 (autouse)

from balsam.client import RESTClient


def _record_params(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict]]:
    sent: list[tuple[str, str, dict]] = []
    real = RESTClient._send

    def recording(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path, dict(kwargs.get("params") or {})))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "_send", recording)
    return sent


@pytest.fixture
def staged(balsam_env: Any, tmp_path: Path) -> tuple[int, list[int]]:
    """A site with 5 jobs, each with one stage-in item: (site id, the job ids in creation order)."""
    return stage_in_jobs(tmp_path, "xs", "f", 5)


def test_num_reads_only_the_newest_items(staged: tuple[int, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    site_id, job_ids = staged
    sent = _record_params(monkeypatch)
    out = balsam("transfer", "ls", "--site", str(site_id), "-n", "2")
    assert out.exit_code == 0, out.output
    rows = out.output.splitlines()[1:]
    assert [int(r.split()[1]) for r in rows] == job_ids[-2:], out.output
    reads = [p for m, path, p in sent if path.rstrip("/") == "/transfers"]
    assert reads and all(int(p.get("limit", 10**9)) <= 2 for p in reads), reads


def test_by_state_counts_without_reading_the_items(staged: tuple[int, list[int]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    site_id, _ = staged
    sent = _record_params(monkeypatch)
    out = balsam("transfer", "ls", "--site", str(site_id), "--by-state")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[1].split() == ["in", "pending", "5"], out.output
    reads = [p for m, path, p in sent if path.rstrip("/") == "/transfers"]
    assert reads and all(int(p.get("limit", 10**9)) == 0 for p in reads), reads
    out = balsam("transfer", "ls", "--site", str(site_id), "--by-state", "-s", "done", "-d", "out")
    assert out.exit_code == 0 and out.output.strip() == "No matching transfer items.", out.output
