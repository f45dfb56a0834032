"""``balsam job modify`` asks ``Set N jobs to STATE? [y/N]`` only when standard input is a terminal.
Balsam 0.7's modify never asked, and its scripts (``balsam job modify -t exp=1 -s RESTART_READY`` in
a batch job or cron, no terminal) ended with "no answer ... pass -y" and changed nothing; without a
terminal it now goes on as 0.7 did (and as with ``-y``), saying what it set. At a terminal (a real
pseudo-terminal here) the question stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cli_test_utils import balsam, fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (autouse)


def _two_jobs(tmp_path: Path, name: str) -> tuple[Any, list[int]]:
    from balsam.api import Job

    site = make_marked_site(tmp_path, name)
    app_id = sync_hello(name, "echo hi").__app_id__
    jobs = Job.objects.bulk_create([Job(workdir=f"m/{i}", app_id=app_id, tags={"exp": "1"}) for i in range(2)])
    return site, [j.id for j in jobs]


def test_modify_without_a_terminal_goes_on_as_in_0_7(balsam_env: Any, tmp_path: Path) -> None:
    from balsam.api import Job

    site, ids = _two_jobs(tmp_path, "noterm")
    out = balsam("job", "modify", "--site", str(site.id), "-t", "exp=1", "-s", "FAILED", input="")
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == "Set 2 job(s) to FAILED" and "?" not in out.output, out.output
    assert {j.state.value for j in Job.objects.filter(id=ids)} == {"FAILED"}


def test_modify_at_a_terminal_still_asks(balsam_env: Any, tmp_path: Path) -> None:
    from balsam.api import Job

    site, ids = _two_jobs(tmp_path, "term")
    leader, follower = os.openpty()
    try:
        os.write(leader, b"n\n")  # the answer, waiting in the terminal's input
        proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", "job", "modify", "--site",
                               str(site.id), "-t", "exp=1", "-s", "FAILED"], stdin=follower, capture_output=True,
                              text=True, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Set 2 jobs to FAILED? [y/N]" in proc.stdout and "Nothing changed." in proc.stdout, proc.stdout
    assert {j.state.value for j in Job.objects.filter(id=ids)} == {"STAGED_IN"}
