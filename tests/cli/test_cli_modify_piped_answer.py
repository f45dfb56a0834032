"""``balsam job modify`` without a terminal goes ahead as Balsam 0.7's did and reads nothing from
standard input: in a script, standard input holds what follows (a ``while read`` loop's next
lines, a ``bash -s`` script's own lines). For a while it read a line as the answer, which took
those lines for answers: the loop's next groups were read as invalid answers and the modify failed,
the rest of a ``bash -s`` script never ran, a closed stdin failed with an AttributeError."""

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


def test_lines_on_standard_input_are_not_taken_for_answers(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    # A `while read g; do balsam job modify ...; done < groups.txt` loop: the next groups are there.
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="2\n3\n")
    assert out.exit_code == 0, out.output
    assert out.stdout == "Set 2 job(s) to FAILED\n", out.output
    assert _states(ids) == {"FAILED"}


def test_a_piped_no_is_not_read_either(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="n\n")
    assert out.exit_code == 0 and _states(ids) == {"FAILED"}, out.output


def test_end_of_input_goes_ahead_without_asking(two_jobs: tuple[Any, list[int]]) -> None:
    site, ids = two_jobs
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="")
    assert out.exit_code == 0, out.output
    assert out.stdout == "Set 2 job(s) to FAILED\n", out.output
    assert _states(ids) == {"FAILED"}


def test_a_closed_standard_input_goes_ahead(two_jobs: tuple[Any, list[int]], monkeypatch: Any) -> None:
    # `balsam job modify ... 0<&-`: Python's sys.stdin is None.
    import sys

    from balsam.cli import job as job_cli

    site, ids = two_jobs
    monkeypatch.setattr(sys, "stdin", None)
    assert job_cli._confirm_unless_input_ended("Set 2 jobs to FAILED?") is True
