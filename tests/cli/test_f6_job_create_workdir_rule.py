"""`balsam job create -w` is checked by the server's own rule (balsam.models.workdir_problem) before
anything is sent, as a usage error naming --workdir (exit status 2), against a real server.

Before: the CLI had its own copy of two of the rules (absolute, '..'); '', '.' and './' went to
the server and came back as an error of the request (exit status 1), '' reported as "got '.'"."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.mark.parametrize("workdir, said", [
    ("", "--workdir must not be empty"),
    (".", "--workdir must name a directory inside the site's data/ directory, not data/ itself (got '.')"),
    ("./", "not data/ itself (got './')"),
    ("/abs", "--workdir must be relative to the site's data/ directory, got the absolute path '/abs'"),
    ("a/../../x", "--workdir must stay inside the site's data/ directory ('..' is not allowed), got 'a/../../x'"),
], ids=["empty", "dot", "dot-slash", "absolute", "dotdot"])
def test_job_create_refuses_a_bad_workdir_as_a_usage_error(balsam_env: Any, workdir: str, said: str) -> None:
    from balsam.api import Job

    campaign = make_campaign(balsam_env.url, balsam_env.token, n_jobs=1)
    out = balsam("job", "create", "--site", campaign["site"]["name"], "-w", workdir, "-a", "Sim", "-y")
    assert out.exit_code == 2, out.output
    assert said in out.output.strip().splitlines()[-1], out.output
    assert len(list(Job.objects.filter(site_id=campaign["site"]["id"]))) == 1  # nothing created

    out = balsam("job", "create", "--site", campaign["site"]["name"], "-w", "runs/ok", "-a", "Sim", "-y")
    assert out.exit_code == 0 and "Added Job" in out.output, out.output
