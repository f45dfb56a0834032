"""End-to-end helpers: a real site on a batch scheduler plugin, its agent, and API polling."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest
import yaml

from fake_env import wait_for

#: Settings that make a site react within seconds.
FAST = {
    # Tests look for a line of a running agent's log as soon as what it reports shows in the API:
    # unbuffered (the buffering has its own tests, in tests/foundation/test_foundation_settings.py).
    "logging": {"buffer_num_records": 1},
    "scheduler": {"sync_period": 1},
    "launcher": {"idle_ttl_sec": 3, "delay_sec": 1},
    "processing": {"num_workers": 1},
}


@contextlib.contextmanager
def new_user(url: str, home: Path) -> Iterator[Path]:
    """A new user of the API server at ``url`` with its login file in ``home``, in the environment
    (the Python API's default client, agents started) until the end, as ``balsam_env`` does for one
    test: for module-scoped fixtures, which cannot use that function-scoped one. Yields the login file."""
    login = {"username": f"user-{uuid.uuid4().hex[:12]}", "password": uuid.uuid4().hex}
    httpx.post(f"{url}/auth/password/register", json=login, timeout=30).raise_for_status()
    token = httpx.post(f"{url}/auth/password/login", data=login, timeout=30).raise_for_status().json()
    home.mkdir(parents=True, exist_ok=True)
    client_path = home / "client.yml"
    with os.fdopen(os.open(client_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:  # a token: the user's only
        yaml.safe_dump({"api_root": url, "client_class": "balsam.client.RESTClient", "token": token["access_token"],
                        "token_expiry": token["expiration"], "username": login["username"], "connect_timeout": 6.2,
                        "read_timeout": 120.0, "retry_count": 3}, fh, sort_keys=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALSAM_HOME", str(home))
        mp.setenv("BALSAM_CLIENT_PATH", str(client_path))
        yield client_path


def selected(request: Any, test_name: str) -> bool:
    """Whether the test ``test_name`` (with its parameters, if any) of the requesting module is to
    run in this session (this xdist worker's too: a module's tests all run on one worker in the CI)."""
    return any(item.name == test_name and item.module is request.module for item in request.session.items)


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def create_site(root: Path, scheduler: str, scheduler_settings: dict, template: Optional[str] = None) -> tuple[str, Path, int]:
    """``balsam site init --platform default --scheduler <scheduler>`` (the job template is then the
    scheduler driver's default), or with ``template`` written over it."""
    from balsam.client import load_client
    from balsam.plugins.manager import get_plugin_manager
    from balsam.site.site_ops import init_site

    name = f"{scheduler}-site-{uuid.uuid4().hex[:6]}"
    path = root / name
    overrides = deep_merge(FAST, {"scheduler": scheduler_settings})
    site_id = init_site(path, name, "default", load_client(), settings_overrides=overrides, scheduler_name=scheduler)
    driver = get_plugin_manager().load_driver("scheduler", scheduler)
    assert (path / "job-template.sh").read_text() == driver.default_job_template
    assert f"name: {scheduler}" in (path / "settings.yml").read_text()
    if template is not None:
        (path / "job-template.sh").write_text(template)
    return name, path, site_id


def batch_job(client: Any, batch_job_id: int) -> dict:
    return client.get(f"/batch-jobs/{batch_job_id}")


def wait_batch_job(client: Any, batch_job_id: int, states: set[str], timeout: float) -> dict:
    return wait_for(lambda: (b := batch_job(client, batch_job_id))["state"] in states and b, timeout,
                    f"BatchJob {batch_job_id} to reach {sorted(states)} "
                    f"(now {batch_job(client, batch_job_id)['state']}: {batch_job(client, batch_job_id)['status_info']})",
                    interval=0.5)


def jobs_by_id(client: Any, ids: list[int]) -> dict[int, dict]:
    from balsam.site.service_client import list_all

    return {row["id"]: row for row in list_all(client, "/jobs/", {"id": ids})}


def wait_jobs_done(client: Any, ids: list[int], timeout: float) -> dict[int, dict]:
    def done():
        rows = jobs_by_id(client, ids)
        return len(rows) == len(ids) and all(r["state"] in ("JOB_FINISHED", "FAILED") for r in rows.values()) and rows

    return wait_for(done, timeout, f"jobs {ids} to finish", interval=0.5)


def agent_log(site_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted((site_path / "log").glob("*")) if p.is_file())


def end_site(client: Any, path: Path, site_id: int) -> None:
    """A test site's end: its active BatchJobs deleted (pending_deletion, waited for), then its agent
    stopped, also when the deletions time out (Slurm unreachable): an agent left running outlived
    the test run and kept polling its server."""
    from balsam.site.site_ops import stop_agent

    try:
        active = client.get("/batch-jobs/", params={"site_id": site_id, "state": ["pending_submission", "queued", "running"]})
        if active["results"]:
            client.patch("/batch-jobs/", json=[{"id": b["id"], "state": "pending_deletion"} for b in active["results"]])
            wait_for(lambda: not client.get("/batch-jobs/", params={"site_id": site_id, "state": ["pending_deletion"]})["results"],
                     60, "teardown deletions")
    finally:
        stop_agent(path, timeout=30, force=True)
