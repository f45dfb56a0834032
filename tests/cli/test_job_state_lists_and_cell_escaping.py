"""``job ls``/``job rm`` take ``-s`` and ``-ns`` more than once (click kept only the last one:
``job rm -ns JOB_FINISHED -ns FAILED`` offered to delete the finished jobs the user had left out),
and ``job ls`` writes each job on one line in aligned columns: control characters in a cell are
escaped (a tag value holding a newline split a job over two lines) and columns are padded by
terminal width (a CJK workdir is two columns a character)."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    path = tmp_path / "site-states"
    (path / "data").mkdir(parents=True)
    return Site.objects.create(name="site-states", path=str(path))


@pytest.fixture
def hello(site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    class Hello(ApplicationDefinition):
        site = "site-states"
        command_template = "echo hi"

    Hello.sync()
    return Hello


#: The moves that bring a new (STAGED_IN) job to each state the tests use.
PATHS = {
    "STAGED_IN": [],
    "RUN_TIMEOUT": ["RUNNING", "RUN_TIMEOUT"],
    "RESTART_READY": ["RUNNING", "RUN_TIMEOUT", "RESTART_READY"],
    "JOB_FINISHED": ["RUNNING", "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"],
    "FAILED": ["FAILED"],
}


@pytest.fixture
def jobs_by_state(hello: Any) -> dict[str, list[int]]:
    """Two jobs in each state of PATHS."""
    from balsam.api import Job

    made: dict[str, list[int]] = {}
    for state, moves in PATHS.items():
        jobs = Job.objects.bulk_create([Job(workdir=f"{state}/{i}", app_id=hello, tags={"exp": "1"}) for i in range(2)])
        ids = [j.id for j in jobs]
        for move in moves:
            Job.objects.filter(id=ids).update(state=move)
        made[state] = ids
    assert {j.state.value for j in Job.objects.filter(id=made["JOB_FINISHED"])} == {"JOB_FINISHED"}
    return made


def _listed_ids(output: str) -> list[int]:
    return sorted(int(line.split()[0]) for line in output.splitlines()[1:] if line.split())


def test_job_ls_takes_several_states_and_excluded_states(jobs_by_state: dict[str, list[int]]) -> None:
    out = balsam("job", "ls", "--site", "all", "-s", "RUN_TIMEOUT", "-s", "RESTART_READY")
    assert out.exit_code == 0, out.output
    assert _listed_ids(out.output) == sorted(jobs_by_state["RUN_TIMEOUT"] + jobs_by_state["RESTART_READY"])

    out = balsam("job", "ls", "--site", "all", "-ns", "JOB_FINISHED", "-ns", "FAILED")
    assert out.exit_code == 0, out.output
    kept = jobs_by_state["STAGED_IN"] + jobs_by_state["RUN_TIMEOUT"] + jobs_by_state["RESTART_READY"]
    assert _listed_ids(out.output) == sorted(kept)

    # -s and -ns together: the states given less the states left out
    out = balsam("job", "ls", "--site", "all", "-s", "FAILED", "-s", "JOB_FINISHED", "-ns", "FAILED")
    assert _listed_ids(out.output) == sorted(jobs_by_state["JOB_FINISHED"])
    out = balsam("job", "ls", "--site", "all", "-s", "FAILED", "-ns", "FAILED")
    assert out.exit_code == 0 and "No matching jobs." in out.output, out.output

    counts = balsam("job", "ls", "--site", "all", "--by-state", "-ns", "JOB_FINISHED", "-ns", "FAILED").output
    assert "Total: 6" in counts and "JOB_FINISHED" not in counts and "FAILED" not in counts, counts


def test_job_rm_with_two_excluded_states_deletes_and_counts_only_the_others(jobs_by_state: dict[str, list[int]]) -> None:
    from balsam.api import Job

    out = balsam("job", "rm", "--site", "all", "-ns", "JOB_FINISHED", "-ns", "FAILED", input="n\n")
    assert "Really delete 6 jobs?" in out.output and "Nothing deleted." in out.output, out.output
    assert Job.objects.all().count() == 10

    out = balsam("job", "rm", "--site", "all", "-ns", "JOB_FINISHED", "-ns", "FAILED", input="y\n")
    assert out.exit_code == 0 and "Deleted 6 job(s)" in out.output, out.output
    left = sorted(j.id for j in Job.objects.all())
    assert left == sorted(jobs_by_state["JOB_FINISHED"] + jobs_by_state["FAILED"])

    out = balsam("job", "rm", "--site", "all", "-s", "FAILED", "-ns", "FAILED", "-y")
    assert out.exit_code == 0 and "No matching jobs." in out.output, out.output
    out = balsam("job", "rm", "--site", "all", "-s", "FAILED", "-s", "JOB_FINISHED", "-y")
    assert out.exit_code == 0 and "Deleted 4 job(s)" in out.output, out.output
    assert Job.objects.all().count() == 0


def test_job_modify_takes_several_from_states(jobs_by_state: dict[str, list[int]]) -> None:
    from balsam.api import Job

    out = balsam("job", "modify", "--site", "all", "-t", "exp=1", "-f", "RUN_TIMEOUT", "-f", "FAILED",
                 "-s", "RESTART_READY", "-y")
    assert out.exit_code == 0 and "Set 4 job(s) to RESTART_READY" in out.output, out.output
    moved = jobs_by_state["RUN_TIMEOUT"] + jobs_by_state["FAILED"]
    assert {j.state.value for j in Job.objects.filter(id=moved)} == {"RESTART_READY"}
    assert {j.state.value for j in Job.objects.filter(id=jobs_by_state["STAGED_IN"])} == {"STAGED_IN"}


def _columns(text: str) -> int:
    """Terminal columns of ``text`` (the test's own count: wide characters two, combining marks none)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_job_ls_escapes_control_characters(hello: Any) -> None:
    from balsam.api import Job

    jobs = Job.objects.bulk_create([
        Job(workdir="plain/1", app_id=hello, tags={"n": "3\nnewline"}),
        Job(workdir="tab\there", app_id=hello, tags={"n": "esc\x1b[31m", "c1": "\x85"}),
    ])
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    # one line per job, after the header
    assert len(lines) == 1 + len(jobs), out.output
    assert [line.split()[0] for line in lines[1:]] == [str(j.id) for j in jobs]
    assert "n=3\\nnewline" in lines[1], out.output
    assert "tab\\there" in lines[2] and "n=esc\\x1b[31m" in lines[2] and "c1=\\x85" in lines[2], out.output
    assert "\x1b" not in out.output and "\t" not in out.output


def test_job_ls_pads_columns_by_terminal_width(hello: Any) -> None:
    from balsam.api import Job

    jobs = Job.objects.bulk_create([
        Job(workdir="plain/1", app_id=hello),
        Job(workdir="数据/实验一", app_id=hello),
        Job(workdir="e\u0301t\u00e9", app_id=hello),
    ])
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 1 + len(jobs), out.output
    # the State column starts at the same terminal column in every row (and in the header)
    starts = {_columns(line[:line.index(word)]) for line, word in zip(lines, ["State"] + ["STAGED_IN"] * len(jobs))}
    assert len(starts) == 1, out.output
