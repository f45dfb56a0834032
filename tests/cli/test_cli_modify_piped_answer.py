"""``balsam job modify`` without a terminal reads its answer from standard input when one is there:
``echo n | balsam job modify ...`` changes nothing (it went ahead, ignoring the piped 'n'), ``y``
goes ahead; only at end of input (``< /dev/null``, cron, a batch job, Balsam 0.7's scripts) does
it go ahead without an answer. An answer that is neither, then end of input, changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (autouse)


@pytest.fixture
def two_jobs(balsam_env: Any, tmp_path: Path) -> tuple[Any, list[int]]:
    from balsam.api import Job

    site = make_marked_site(tmp_path, "pipe")
    app_id = sync_hello("pipe", "echo hi").__app_id__
    jobs = Job.objects.bulk_create([Job(workdir=f"m/{i}", app_id=app_id, tags={"exp": "1"}) for i in range(2)])
    return site, [j.id for j in jobs]


def _states(ids: list[int]) -> set[str]:
    from balsam.api import Job

    return {j.state.value for j in Job.objects.filter(id=ids)}


@pytest.mark.parametrize("piped", ["n\n", "no\n", "\n", "N"])
def test_a_piped_no_changes_nothing(two_jobs: tuple[Any, list[int]], piped: str) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input=piped)
    assert out.exit_code == 0, out.output
    assert out.stdout == f"Set 2 jobs to FAILED? [y/N]: {piped.strip()}\nNothing changed.\n", out.output
    assert _states(ids) == {"STAGED_IN"}


def test_a_piped_yes_goes_ahead(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="y\n")
    assert out.exit_code == 0, out.output
    assert out.stdout == "Set 2 jobs to FAILED? [y/N]: y\nSet 2 job(s) to FAILED\n", out.output
    assert _states(ids) == {"FAILED"}


def test_end_of_input_goes_ahead_without_asking(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="")
    assert out.exit_code == 0, out.output
    assert out.stdout == "Set 2 job(s) to FAILED\n", out.output
    assert _states(ids) == {"FAILED"}


def test_an_answer_neither_yes_nor_no_then_end_of_input(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="maybe\n")
    assert out.exit_code == 1, out.output
    assert out.stderr.splitlines()[-1] == ("Error: no answer to 'Set 2 jobs to FAILED?': standard input ended; "
                                           "pass -y/--yes to go on without asking"), out.stderr
    assert _states(ids) == {"STAGED_IN"}
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="maybe\ny\n")
    assert out.exit_code == 0 and _states(ids) == {"FAILED"}, out.output
