"""The ``-v`` YAML of ``job ls``, ``job create``'s preview, ``app ls``, ``site ls`` and ``queue ls``
writes text as it is, and ``job show`` of a job with huge parameters or data stays readable, against
a real server on SQLite and on PostgreSQL.

Before: a workdir ``runs/ü 1`` or a tag ``name=日本`` came out of every ``-v`` as ``"runs/\\xFC 1"``
and ``"\\u65E5\\u672C"`` (PyYAML's default), and ``job show`` printed 300,000 characters of
parameters and 400,000 of data on two lines, burying the state history and the error below them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)

WORKDIR = "runs/ü 1"
TAGS = {"name": "日本", "k": "v=w", "quote": 'a "b"'}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_verbose_yaml_writes_unicode_as_is(env: Any) -> None:
    campaign = make_campaign(env.url, env.token, n_jobs=1)
    site = campaign["site"]["name"]
    api = httpx.Client(base_url=env.url, headers=env.headers(), timeout=60)
    resp = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": WORKDIR, "tags": TAGS}])
    assert resp.status_code == 201, resp.text
    job_id = resp.json()[0]["id"]
    resp = api.post("/batch-jobs/", json={"site_id": campaign["site"]["id"], "num_nodes": 1, "wall_time_min": 5,
                                          "job_mode": "mpi", "queue": "débug", "project": "prój",
                                          "filter_tags": {"name": "日本"}, "optional_params": {}})
    assert resp.status_code == 201, resp.text

    out = balsam("job", "ls", "--id", str(job_id), "-v")
    assert out.exit_code == 0, out.output
    assert "\\u65E5" not in out.output and "\\xFC" not in out.output, out.output
    assert f"workdir: {WORKDIR}" in out.output and "日本" in out.output
    doc = yaml.safe_load(out.output)  # still YAML, with the same values
    assert doc["workdir"] == WORKDIR and doc["tags"] == TAGS

    out = balsam("job", "create", "--site", site, "-w", WORKDIR, "-a", "Sim", "-tag", "name=日本", input="n\n")
    assert out.exit_code == 0, out.output
    assert f"workdir: {WORKDIR}" in out.output and "name: 日本" in out.output and "Not created." in out.output

    out = balsam("queue", "ls", "--site", site, "-v")
    assert out.exit_code == 0, out.output
    assert "queue: débug" in out.output and "project: prój" in out.output and "name: 日本" in out.output

    api.put(f"/sites/{campaign['site']['id']}", json={"name": "sité-日本"}).raise_for_status()
    out = balsam("site", "ls", "-v")
    assert out.exit_code == 0, out.output
    assert "name: sité-日本" in out.output, out.output
    out = balsam("app", "ls", "--site", "sité-日本", "-v")
    assert out.exit_code == 0 and "name: Sim" in out.output, out.output


def test_job_show_cuts_huge_values_and_ls_v_keeps_them(env: Any) -> None:
    from balsam.api import App, Job

    campaign = make_campaign(env.url, env.token, n_jobs=1)
    app = App.objects.get(id=campaign["app"]["id"])
    app.parameters = {"x": {"required": False}}
    app.save()
    big = "A" * 300_000
    data = {f"k{i}": list(range(20)) for i in range(5000)}
    job = Job(workdir="huge/1", app_id=app.id, parameters={"x": big}, data=data)
    job.save()
    resp = httpx.patch(f"{env.url}/jobs/", headers=env.headers(), timeout=60,
                       json=[{"id": job.id, "state": "FAILED", "state_data": {"message": "M" * 100_000}}])
    assert resp.status_code == 200, resp.text

    out = balsam("job", "show", str(job.id))
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert max(len(line) for line in lines) < 1000, [len(line) for line in lines]
    params = next(line for line in lines if line.strip().startswith("parameters "))
    assert "AAAA..." in params and "(300,009 characters; `balsam job ls --id" in params and "-v` shows all)" in params
    assert any(line.strip().startswith("data ") and "characters;" in line for line in lines)
    assert "State history:" in out.output and "CREATED -> STAGED_IN" in out.output
    assert "STAGED_IN -> FAILED  message=MMMM" in out.output and "(100,008 characters)" in out.output

    out = balsam("job", "ls", "--id", str(job.id), "-v")
    assert out.exit_code == 0
    doc = yaml.safe_load(out.output)
    assert doc["parameters"] == {"x": big} and doc["data"] == data
