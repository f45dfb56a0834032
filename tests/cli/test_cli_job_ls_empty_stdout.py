"""``balsam job ls`` matching no job leaves stdout empty, as Balsam 0.7 did: "No matching jobs."
goes to stderr. On stdout, ``[ -z "$(balsam job ls -s FAILED)" ]`` (nothing failed?) was false
and ``balsam job ls ... | wc -l`` counted the note as a line of the listing."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner
from cli_test_utils import fresh_api_state  # noqa: F401 (autouse)


def test_no_matching_job_writes_nothing_on_stdout(balsam_env: Any) -> None:
    from balsam.cli import main

    out = CliRunner().invoke(main, ["job", "ls", "--site", "all", "-s", "FAILED"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert out.stdout == "", out.stdout
    assert out.stderr == "No matching jobs.\n", out.stderr
