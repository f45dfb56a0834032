"""`balsam job create` with the arguments a campaign's scripts pass (quotes, ``=`` in values, unicode,
empty values) against a real server on SQLite and on PostgreSQL: stored as given, and a bad
``--workdir`` is a usage error (status 2) whichever rule it breaks.

Before: ``-w /abs`` was a usage error (2) but ``-w ../x`` went to the server and came back as a
request error (status 1)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_job_create_keeps_tricky_values_and_refuses_a_workdir_outside_data(env: Any) -> None:
    from balsam.api import App, Job

    campaign = make_campaign(env.url, env.token, n_jobs=1)
    site = campaign["site"]["name"]
    app = App.objects.get(id=campaign["app"]["id"])
    app.parameters = {"x": {"required": False}, "y": {"required": False}}
    app.save()
    out = balsam("job", "create", "--site", site, "-w", "runs/ü 1", "-a", "Sim", "-p", 'x=a=b "q" \'s\' ünï',
                 "-p", "y=", "-tag", "k=v=w", "-tag", "name=日本", "-lp", "cpu-bind=depth", "-y")
    assert out.exit_code == 0, out.output
    job = Job.objects.get(id=int(out.output.split("id=")[1].split()[0]))
    assert job.workdir.as_posix() == "runs/ü 1"
    assert job.get_parameters() == {"x": 'a=b "q" \'s\' ünï', "y": ""}
    assert job.tags == {"k": "v=w", "name": "日本"} and job.launch_params == {"cpu-bind": "depth"}

    before = Job.objects.filter(app_id=app.id).count()
    for workdir in ("/abs/run", "../outside", "runs/../../outside"):
        out = balsam("job", "create", "--site", site, "-w", workdir, "-a", "Sim", "-y")
        assert out.exit_code == 2, (workdir, out.exit_code, out.output)
        said = out.output.strip().splitlines()[-1]
        assert said.startswith("Error: --workdir must ") and repr(workdir) in said, out.output
    assert Job.objects.filter(app_id=app.id).count() == before
