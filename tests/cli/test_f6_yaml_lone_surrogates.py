"""`job ls -v` and `job create`'s preview of parameters holding a lone surrogate (a byte of argv or of a
file name that is not UTF-8, decoded by Python with surrogateescape: `-p x=$'caf\\xe9'`; the
server keeps parameters as dill+base64, so it stores them), against a real server.

Before: libyaml's emitter (CSafeDumper) raised UnicodeEncodeError on such a string, so `job ls -v`
stopped with exit status 1 part-way through the listing (the jobs after it never printed) and the
`job create` preview failed; the pure-Python emitter of earlier releases wrote "caf\\uDCE9"."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)

CAFE = os.fsdecode(b"caf\xe9")  # "caf\udce9" where the file system encoding is UTF-8


def _app_with_parameter(env: Any) -> dict[str, Any]:
    campaign = make_campaign(env.url, env.token, n_jobs=1)
    api = httpx.Client(base_url=env.url, headers=env.headers(), timeout=60)
    resp = api.put(f"/apps/{campaign['app']['id']}", json={"parameters": {"x": {"required": False}}})
    assert resp.status_code == 200, resp.text
    return campaign


def test_job_ls_verbose_prints_every_job_with_a_lone_surrogate_escaped(balsam_env: Any) -> None:
    from balsam.api import Job

    campaign = _app_with_parameter(balsam_env)
    values = ["ok", CAFE, "ok", "ok"]
    for i, value in enumerate(values):
        Job(workdir=f"w/{i}", app_id=campaign["app"]["id"], parameters={"x": value}).save()

    out = balsam("job", "ls", "--site", campaign["site"]["name"], "-v")
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.output))
    assert [d["workdir"] for d in docs] == ["run/0"] + [f"w/{i}" for i in range(4)], out.output
    assert [d["parameters"].get("x") for d in docs[1:]] == values  # read back as the same text
    assert 'x: "caf\\uDCE9"' in out.output, out.output


def test_job_create_preview_of_a_lone_surrogate(balsam_env: Any) -> None:
    from balsam.api import Job

    campaign = _app_with_parameter(balsam_env)
    site = campaign["site"]["name"]
    out = balsam("job", "create", "--site", site, "-w", "runs/a", "-a", "Sim", "-p", f"x={CAFE}", input="n\n")
    assert out.exit_code == 0, out.output
    assert 'x: "caf\\uDCE9"' in out.output and "Not created." in out.output, out.output
    assert not list(Job.objects.filter(workdir__contains="runs/a"))
