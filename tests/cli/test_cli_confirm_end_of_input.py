"""A confirmation that gets no answer because standard input ended (a script or batch job without
``-y``) fails with one line naming the question and ``-y``, status 1: it was click's bare
"Aborted!", which said neither."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cli_test_utils import balsam, fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (autouse)


def test_rm_without_yes_and_no_input_names_the_question_and_yes(balsam_env: Any, tmp_path: Path) -> None:
    # (job modify asks at a terminal only, as 0.7 never asked: tests/cli/test_cli_modify_without_terminal.py)
    from balsam.api import Job

    site = make_marked_site(tmp_path, "eoi")
    app_id = sync_hello("eoi", "echo hi").__app_id__
    Job.objects.bulk_create([Job(workdir=f"e/{i}", app_id=app_id, tags={"exp": "1"}) for i in range(2)])
    out = balsam("job", "rm", "--site", str(site.id), "-t", "exp=1", input="")
    assert out.exit_code == 1, out.output
    assert out.stderr.strip().splitlines()[-1] == ("Error: no answer to 'Really delete 2 jobs?': standard input "
                                                   "ended; pass -y/--yes to go on without asking"), out.stderr
    assert "Aborted!" not in out.output
    assert {j.state.value for j in Job.objects.filter(site_id=site.id)} == {"STAGED_IN"}
    out = balsam("app", "rm", "--site", str(site.id), "-n", "Hello", input="")
    assert out.exit_code == 1 and "standard input ended; pass -y/--yes" in out.stderr, out.output
