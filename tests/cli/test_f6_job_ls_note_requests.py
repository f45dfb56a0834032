"""What `balsam job ls` asks the server for its AWAITING_PARENTS note (one line on stderr under the
table), against a real server on SQLite and on PostgreSQL: parents listed in the same table are
taken from it, only the others are read, and no more than NOTE_MAX_UNLISTED_PARENTS of them.

Before: every parent was read again after the table, even when the table had just listed it (the
common `job ls --site S` of a whole campaign): 10,000 parents and their 10,000 children cost 20
requests for the note against 9 for the listing itself (29 in all instead of 9)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state, record_requests, wait_on_parents  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_note_reads_only_the_parents_the_table_did_not_list(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.cli import job as job_cli
    campaign = make_campaign(env.url, env.token, n_jobs=4)
    site, failed = campaign["site"]["name"], campaign["failed"]
    wait_on_parents(env, campaign, [j["id"] for j in campaign["jobs"][1:3]])
    sent = record_requests(monkeypatch)

    def job_lists(*args: str) -> tuple[Any, int]:
        sent.clear()
        out = balsam("job", "ls", "--site", site, *args)
        assert out.exit_code == 0, out.output
        return out, sent.count(("GET", "/jobs/"))

    expected = ("4 of these jobs wait for their parents (AWAITING_PARENTS): 2 for a FAILED parent, which keeps "
                f"them waiting until it is re-run (`balsam job modify -i {failed} -s RESTART_READY`); ")

    # The whole campaign: every parent is in the table, the note asks nothing.
    _, listing_only = job_lists("-ns", "AWAITING_PARENTS")
    out, with_note = job_lists()
    assert out.stdout.count("AWAITING_PARENTS") == 4 and len(out.stdout.splitlines()) == 1 + 4 + 4
    assert out.stderr.strip() == expected + "2 for parents not finished yet. `balsam job show ID` lists a job's parents."
    assert with_note == listing_only, sent

    # Only the children: their parents are read, in one request.
    out, with_note = job_lists("-s", "AWAITING_PARENTS")
    assert len(out.stdout.splitlines()) == 1 + 4
    assert out.stderr.strip() == expected + "2 for parents not finished yet. `balsam job show ID` lists a job's parents."
    assert with_note == 2, sent  # the page, then the parents

    # More unlisted parents than the note reads: it asks nothing and says which jobs it could not
    # tell about; the parent it listed (FAILED) still counts.
    monkeypatch.setattr(job_cli, "NOTE_MAX_UNLISTED_PARENTS", 1)
    out, with_note = job_lists("-ns", "STAGED_IN")
    assert len(out.stdout.splitlines()) == 1 + 1 + 4
    assert out.stderr.strip() == expected + ("2 for parents outside this listing (more than 1 of them: not read). "
                                             "`balsam job show ID` lists a job's parents."), out.stderr
    assert with_note == 1, sent
