"""What a new user following the docs met on the command line (a docs audit), against a real server.

- A site name the server refuses (all digits, ``all``, taken) printed the transport's text
  (``Error: POST unix:///.../sites/ failed with HTTP 422: name: ...``): now the server's reason and
  what to do (``-n NAME`` for ``site init``, another name for ``site rename``).
- ``balsam analytics utilization -t campaign=x`` (a tag no job has) printed a table of zeros and
  ``Peak: 0 jobs busy`` without naming the selection; ``throughput`` says ``No job reached ...
  (site ..., campaign=x)``: utilization now says the same kind of line.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.mark.parametrize("name,reason", [
    ("123", "site name refused: must not be all digits ('123')"),
    ("all", "site name refused: must not be 'all'"),
])
def test_site_init_refused_name_is_the_reason_and_the_hint(balsam_env: Any, tmp_path: Path, name: str, reason: str) -> None:
    out = balsam("site", "init", str(tmp_path / name), "--platform", "default")  # no -n: the directory's name
    assert out.exit_code == 1, out.output
    [line] = out.output.strip().splitlines()
    assert line.startswith(f"Error: {reason}"), line
    assert line.endswith("Choose another name with -n NAME (the default is the directory's name)"), line
    assert "HTTP" not in line and "/sites/" not in line, line
    assert not (tmp_path / name).exists()


def test_site_init_and_rename_with_a_taken_name(balsam_env: Any, tmp_path: Path) -> None:
    assert balsam("site", "init", str(tmp_path / "a"), "-n", "taken", "--platform", "default").exit_code == 0
    assert balsam("site", "init", str(tmp_path / "b"), "-n", "other", "--platform", "default").exit_code == 0

    out = balsam("site", "init", str(tmp_path / "c"), "-n", "taken", "--platform", "default")
    assert out.exit_code == 1, out.output
    [line] = out.output.strip().splitlines()
    assert line.startswith("Error: A site named 'taken' already exists (id "), line
    assert line.endswith("Choose another name with -n NAME (the default is the directory's name)"), line
    assert "HTTP" not in line

    out = balsam("site", "rename", str(tmp_path / "b"), "taken")
    assert out.exit_code == 1, out.output
    assert out.output.strip().startswith("Error: A site named 'taken' already exists") and "HTTP" not in out.output
    assert out.output.strip().endswith(". Choose another name"), out.output
    out = balsam("site", "rename", str(tmp_path / "b"), "all")
    assert out.exit_code == 1, out.output
    assert out.output.strip() == ("Error: site name refused: must not be 'all': `--site all` selects all sites. "
                                  "Choose another name"), out.output
    assert balsam("site", "rename", str(tmp_path / "b"), "fine").exit_code == 0


def test_utilization_of_a_selection_no_job_ran_says_so(balsam_env: Any, tmp_path: Path) -> None:
    from balsam._api.model import get_default_client
    from balsam.api import BatchJob, Site

    site = Site.objects.create(name="util-site", path=str(tmp_path / "util-site"))
    batch_job = BatchJob.objects.create(site_id=site.id, project="local", queue="local", num_nodes=2, wall_time_min=5,
                                        job_mode="serial")
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3)
    get_default_client().put(f"/batch-jobs/{batch_job.id}", json={"state": "running", "start_time": start.isoformat()})
    assert BatchJob.objects.get(id=batch_job.id).start_time is not None  # its nodes count as held

    out = balsam("analytics", "utilization", "--site", "util-site", "-t", "campaign=x")
    assert out.exit_code == 0, out.output
    assert "Peak" not in out.output and "Until" not in out.output, out.output
    [line] = out.output.strip().splitlines()
    assert line.startswith("No job has run yet (site util-site, campaign=x); its BatchJobs held up to 2 nodes "), line
    out = balsam("analytics", "throughput", "--site", "util-site", "-t", "campaign=x")
    assert out.output.strip() == "No job reached JOB_FINISHED yet (site util-site, campaign=x).", out.output
