"""What the CLI tests share: a clean API client state per test, and ``balsam(...)`` through click's runner.

A test module takes both with ``from cli_test_utils import balsam, fresh_api_state  # noqa: F401``
(the fixture is autouse: importing it into the module applies it to the module's tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from click.testing import CliRunner, Result
from failure_proxy import record_requests  # noqa: F401 (the CLI tests import it from here)


@pytest.fixture(autouse=True)
def fresh_api_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """No site selected from the environment, the working directory outside any site, and no
    client or app class cached from another test."""
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client

    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_default_client()
    ApplicationDefinition.clear_cache()
    yield
    reset_default_client()


def balsam(*args: str, input: Optional[str] = None) -> Result:
    """Run ``balsam ARGS...`` in this process (exceptions propagate)."""
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def wait_on_parents(env: Any, campaign: dict, staged: list[int]) -> None:
    """Add AWAITING_PARENTS children to a ``make_campaign`` campaign on ``env``'s server: two of its
    FAILED job (``kid/f0``, ``kid/f1``) and one of each job id in ``staged`` (``kid/s<n>``)."""
    api = httpx.Client(base_url=env.url, headers=env.headers(), timeout=60)
    app_id, failed = campaign["app"]["id"], campaign["failed"]
    kids = ([{"app_id": app_id, "workdir": f"kid/f{i}", "parent_ids": [failed]} for i in range(2)]
            + [{"app_id": app_id, "workdir": f"kid/s{i}", "parent_ids": [p]} for i, p in enumerate(staged)])
    resp = api.post("/jobs/", json=kids)
    assert resp.status_code == 201, resp.text
    assert {j["state"] for j in resp.json()} == {"AWAITING_PARENTS"}




def make_marked_site(tmp_path: Path, name: str) -> Any:
    """A Site ``name`` of the test user at ``tmp_path/name`` (with its data folder), its folder marked
    with the site's id (``.balsam-site``) as ``balsam site init`` marks it."""
    from balsam.api import Site

    path = tmp_path / name
    (path / "data").mkdir(parents=True)
    site = Site.objects.create(name=name, path=str(path))
    (path / ".balsam-site").write_text(f"{site.id}\n")
    return site


def sync_hello(site_name: str, template: str) -> Any:
    """The app ``Hello`` of site ``site_name`` running ``template``, synced to the server."""
    from balsam.api import ApplicationDefinition

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = template

    Hello.sync()
    return Hello


def stage_in_jobs(tmp_path: Path, site_name: str, workdir_prefix: str, count: int) -> tuple[int, list[int]]:
    """A site ``site_name`` at ``tmp_path/site_name`` with a Globus location ``src`` and ``count`` jobs
    (workdirs ``<workdir_prefix>/<i>``), each staging ``src:/data/f<i>`` in:
    ``(site id, the job ids in creation order)``."""
    from balsam.api import ApplicationDefinition, Job, Site

    (tmp_path / site_name / "data").mkdir(parents=True)
    site = Site.objects.create(name=site_name, path=str(tmp_path / site_name),
                               transfer_locations={"src": "globus://0a1b2c3d-0000-0000-0000-000000000000"})

    class Fetch(ApplicationDefinition):
        site = site_name
        command_template = "cat in.dat"
        transfers = {"inp": {"required": True, "direction": "in", "local_path": "in.dat"}}

    Fetch.sync()
    jobs = Job.objects.bulk_create([Job(workdir=f"{workdir_prefix}/{i}", app_id=Fetch.__app_id__,
                                        transfers={"inp": f"src:/data/f{i}"}) for i in range(count)])
    return site.id, [j.id for j in jobs]


@pytest.fixture
def job_requests(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The query parameters of every GET /jobs/ the client sends."""
    from balsam.client.rest import RESTClient

    seen: list[dict] = []
    send = RESTClient._send

    def recording(self: Any, method: str, path: str, **kw: Any) -> Any:
        if method.upper() == "GET" and path.rstrip("/") == "/jobs":
            seen.append(dict(kw.get("params") or {}))
        return send(self, method, path, **kw)

    monkeypatch.setattr(RESTClient, "_send", recording)
    return seen
