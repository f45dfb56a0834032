"""Closed and failing standard streams, on the real CLI in its own process against a live server.

Before: every command but ``balsam demo`` ended with click's silent status 1 under ``| head``
(a script could not tell it from a failure); ``app rm --all -y | head -1`` deleted one app of
many and stopped; with stderr closed (``2>&-``) every confirmation failed silently ("input(): lost
sys.stderr"); a Ctrl-C with stderr closed or on a full device exited 1, not 130; ``job ls
2>/dev/full`` exited 1 because "No matching jobs." could not be written; ``>/dev/full`` said
``Error: OSError: [Errno 28] ...`` without naming standard output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from cli_test_utils import fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (fixture)

BALSAM = [sys.executable, "-c", "from balsam.cli import main; main(prog_name='balsam')"]


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    return make_marked_site(tmp_path, "pipes")


@pytest.fixture
def jobs(site: Any) -> list[int]:
    from balsam.api import Job

    hello = sync_hello("pipes", "echo hi")
    Job.objects.bulk_create([Job(workdir=f"p/{i}", app_id=hello.__app_id__, tags={"exp": "p"}) for i in range(30)])
    return sorted(j.id for j in Job.objects.all())


def into_closed_pipe(*args: str, stdin: Optional[bytes] = None) -> tuple[int, str]:
    """``balsam ARGS | head`` with ``head`` gone before the first write: (exit status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*BALSAM, *args], stdout=write_end, stderr=subprocess.PIPE, timeout=120,
                              input=stdin if stdin is not None else b"")
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr.decode()


def with_redirect(args: list[str], redirect: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``balsam ARGS REDIRECT`` through the shell (``2>&-``, ``2>/dev/full``, ``>/dev/full``)."""
    import shlex

    line = " ".join(shlex.quote(a) for a in [*BALSAM, *args]) + " " + redirect
    return subprocess.run(["bash", "-c", line], capture_output=True, input=stdin, timeout=120)


@pytest.mark.parametrize("args", [["job", "ls", "--site", "all"], ["job", "ls", "--site", "all", "--json"],
                                  ["job", "show", "FIRST"], ["app", "ls", "-s", "all"], ["site", "ls"],
                                  ["queue", "ls", "-h"], ["--help"], ["job", "rm", "--help"]])
def test_a_listing_into_a_closed_pipe_exits_141_quietly(jobs: list[int], args: list[str]) -> None:
    args = [str(jobs[0]) if a == "FIRST" else a for a in args]
    code, err = into_closed_pipe(*args)
    assert (code, err) == (141, ""), (code, err)


def test_app_rm_all_into_a_closed_pipe_deletes_every_app(site: Any) -> None:
    from balsam.api import App, ApplicationDefinition

    for i in range(6):
        type(f"Pipe{i}", (ApplicationDefinition,), {"site": "pipes", "command_template": "true"}).sync()
    assert App.objects.filter(site_id=site.id).count() == 6
    code, err = into_closed_pipe("app", "rm", "--all", "--site", "pipes", "-y")
    assert App.objects.filter(site_id=site.id).count() == 0  # before: 5 left, the first one deleted
    assert (code, err) == (141, ""), (code, err)


def test_job_modify_and_rm_into_a_closed_pipe_complete_their_change(jobs: list[int]) -> None:
    from balsam.api import Job

    code, err = into_closed_pipe("job", "modify", "-t", "exp=p", "-s", "FAILED", "-y", "--site", "all")
    assert code == 141 and "Error" not in err, (code, err)
    assert Job.objects.filter(tags={"exp": "p"}, state="FAILED").count() == 30
    code, err = into_closed_pipe("job", "rm", "-t", "exp=p", "-y", "--site", "all")
    assert (code, err) == (141, ""), (code, err)
    assert Job.objects.filter(tags={"exp": "p"}).count() == 0


def test_a_question_into_a_closed_pipe_is_not_asked_nor_answered(jobs: list[int]) -> None:
    from balsam.api import Job

    # "y" waits on stdin: the question it would answer was never shown, so nothing is deleted.
    code, err = into_closed_pipe("job", "rm", "-t", "exp=p", "--site", "all", stdin=b"y\n")
    assert (code, err) == (141, ""), (code, err)
    assert Job.objects.filter(tags={"exp": "p"}).count() == 30


def test_a_confirmation_with_stderr_closed_still_asks(jobs: list[int]) -> None:
    from balsam.api import Job

    proc = with_redirect(["job", "rm", "-t", "exp=p", "--site", "all"], "2>&-", stdin=b"y\n")
    assert proc.returncode == 0, proc  # before: 1, "input(): lost sys.stderr", nothing said
    assert b"Deleted 30 job(s)" in proc.stdout, proc.stdout
    assert Job.objects.filter(tags={"exp": "p"}).count() == 0


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full"])
def test_ctrl_c_with_stderr_unwritable_exits_130(jobs: list[int], redirect: str) -> None:
    import shlex

    line = "exec " + " ".join(shlex.quote(a) for a in [*BALSAM, "job", "rm", "-t", "exp=p", "--site", "all"])
    proc = subprocess.Popen(["bash", "-c", f"{line} {redirect}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = b""
    while b"Really delete" not in seen and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 200)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # before: 1


def test_no_matching_jobs_on_a_full_stderr_is_still_status_0(jobs: list[int]) -> None:
    proc = with_redirect(["job", "ls", "--id", str(jobs[-1] + 1000)], "2>/dev/full")
    assert proc.returncode == 0, proc  # before: 1 ("No matching jobs." could not be written)


def test_a_full_stdout_is_one_line_naming_it(jobs: list[int]) -> None:
    proc = with_redirect(["job", "ls", "--site", "all"], ">/dev/full")
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Error: cannot write to standard output: [Errno 28] No space left on device\n"
