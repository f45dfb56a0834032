"""What the tests of the ``transfers`` agent module share.

- ``FakeAPI``: an in-memory stand-in for the few routes of balsam's API the module calls, so that
  those tests need no server (``one_stage_in_api``: one holding a single pending stage-in).
- The DAG stage-in tests' set-up on the real server (``env`` in conftest.py): a site with a
  ``shared`` local location (``init_transfer_site``), its apps (``step_app``, ``no_out_app``), a
  parent staging out to a file that its child stages in (``make_handoff_dag``), the module
  (``transfers_module``) run cycle by cycle (``run_cycles``), and the moves a launcher or a user
  would make through the API (``finish_as_a_launcher``, ``move_job``, ``rerun``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import balsam.builtin.local_transfer as lt
from balsam._api.model import reset_default_client
from balsam.api import ApplicationDefinition, Job
from balsam.client import load_client
from balsam.config import SiteConfig
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.site.site_ops import init_site
from balsam.transfer import TransferError

LOCATIONS = {"shared": "local://"}


class FakeAPI:
    """The routes the transfers module uses: GET /transfers/ (filtered by ``state`` and ``id``,
    ``ordering=state``, paged by ``offset``/``limit``), GET /jobs/ (by ``id``), PATCH /transfers/.

    Each GET answers deep copies, made as the wire makes them (JSON, ``transfer_info`` and its
    nested values included): what the module does to a row it read changes nothing here until it
    PATCHes it. The rows of each PATCH
    are counted in ``patched``."""

    def __init__(self, items: list[dict], jobs: list[dict]) -> None:
        self.items = {it["id"]: it for it in items}
        self.jobs = {j["id"]: j for j in jobs}
        self.patched: list[int] = []

    def get(self, path: str, params: Optional[dict] = None) -> dict:
        params = dict(params or {})
        if path == "/jobs/":
            rows = [dict(self.jobs[i]) for i in params.get("id", []) if i in self.jobs]
        else:
            assert path == "/transfers/", path
            rows = [json.loads(json.dumps(it)) for it in self.items.values()]  # as on the wire
            if "state" in params:
                rows = [r for r in rows if r["state"] in params["state"]]
            if "id" in params:
                rows = [r for r in rows if r["id"] in params["id"]]
            rows.sort(key=lambda r: (r["state"], r["id"]) if params.get("ordering") == "state" else r["id"])
        offset, limit = int(params.get("offset", 0)), params.get("limit")
        page = rows[offset:] if limit is None else rows[offset:offset + int(limit)]
        return {"count": len(rows), "results": page}

    def patch(self, path: str, json: list[dict]) -> list[dict]:
        assert path == "/transfers/", path
        self.patched.append(len(json))
        for update in json:
            self.items[update["id"]].update({k: v for k, v in update.items() if k != "id"})
        return json

    def states(self, alias: Optional[str] = None) -> dict[str, int]:
        """{state: how many items} of every item, or of those of location ``alias``."""
        counts: dict[str, int] = {}
        for item in self.items.values():
            if alias is None or item["location_alias"] == alias:
                counts[item["state"]] = counts.get(item["state"], 0) + 1
        return counts


def one_stage_in_api(tmp_path: Path) -> tuple[Path, FakeAPI]:
    """A site folder ``tmp_path/site`` (with its data folder) and a FakeAPI of one pending stage-in:
    item 1 of job 1 (READY, workdir ``job1``), ``aps:/data/1.h5`` to ``in.h5``."""
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    api = FakeAPI([{"id": 1, "job_id": 1, "direction": "in", "location_alias": "aps", "remote_path": "/data/1.h5",
                    "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "",
                    "transfer_info": {}}], [{"id": 1, "workdir": "job1", "state": "READY"}])
    return site, api


def init_transfer_site(tmp_path: Path, name: str, locations: Optional[dict] = None) -> tuple[Any, Any]:
    """A site ``name`` under ``tmp_path/site`` whose transfer locations are ``locations``
    (``LOCATIONS`` by default), for the user of ``env``: (client, site config)."""
    reset_default_client()
    client = load_client()
    init_site(tmp_path / "site", name, "default", client,
              settings_overrides={"transfers": {"transfer_locations": locations or LOCATIONS}})
    return client, SiteConfig(tmp_path / "site")


def step_app(site_id: int, command: str = "cat input.txt > result.txt", stage_out: bool = True,
             name: str = "Step") -> Any:
    """A synced app with an optional stage-in ``input`` (``input.txt``) and, with ``stage_out``, an
    optional stage-out ``result`` (``result.txt``)."""
    transfers = {"input": {"required": False, "direction": "in", "local_path": "input.txt"}}
    if stage_out:
        transfers["result"] = {"required": False, "direction": "out", "local_path": "result.txt"}
    app = type(name, (ApplicationDefinition,), {"site": site_id, "command_template": command, "transfers": transfers})
    app.sync()
    return app


def no_out_app(site_id: int) -> Any:
    """A synced app without transfers."""
    app = type("NoOut", (ApplicationDefinition,), {"site": site_id, "command_template": "true"})
    app.sync()
    return app


def transfers_module(site: Any, client: Any, locations: Optional[dict] = None, **opts: Any) -> TransfersModule:
    """The module with no backoff and two tries, unless ``opts`` say otherwise."""
    options = dict(transfer_locations=locations or LOCATIONS, service_period=1, retry_backoff_sec=0, max_attempts=2)
    options.update(opts)
    return TransfersModule(site, TransfersOptions(**options), client)


def make_site(tmp_path: Path, name: str, **opts: Any) -> tuple[Any, Any, int, Any, Any, TransfersModule]:
    """A site ``name`` with a ``step_app`` and a ``no_out_app``, and its module (``opts``: its options):
    (client, site config, site id, app with a stage-in and a stage-out, app with none, module)."""
    client, site = init_transfer_site(tmp_path, name)
    step, no_out = step_app(site.site_id), no_out_app(site.site_id)
    return client, site, site.site_id, step, no_out, transfers_module(site, client, **opts)


def make_shared_task_dag(tmp_path: Path, Step: Any, NoOut: Any, client: Any) -> tuple[Any, Any, Any, Path]:
    """A finished parent (no stage-out), its READY child staging in ``shared/step1.txt`` ("first"),
    and a job of its own staging in ``shared/lone.txt``: (parent, child, lone, handoff file)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    handoff.write_text("first\n")
    (shared / "lone.txt").write_text("lone input\n")
    parent = Job("dag/parent", NoOut)
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    lone = Job("lone", Step, transfers={"input": f"shared:{shared / 'lone.txt'}"})
    lone.save()
    move_job(client, parent.id, "PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED")
    return parent, child, lone, handoff


def make_released_dag(tmp_path: Path, site_name: str) -> tuple[Any, Any, int, Any, Any, Path, TransfersModule]:
    """A finished parent (no stage-out) and its READY child staging in the parent's output, ``shared:
    step1.txt`` (first run: "first"). (client, site, site id, parent, child, handoff file, module)."""
    client, site = init_transfer_site(tmp_path, site_name)
    site_id = site.site_id
    step, no_out = step_app(site_id, command="cat input.txt", stage_out=False), no_out_app(site_id)
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    handoff.write_text("first\n")
    parent = Job("dag/parent", no_out)
    parent.save()
    child = Job("dag/child", step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    move_job(client, parent.id, "PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED")
    assert client.get(f"/jobs/{child.id}")["state"] == "READY"
    return client, site, site_id, parent, child, handoff, transfers_module(site, client)


def rerun_and_release(client: Any, parent: Any, child: Any, handoff: Path) -> None:
    """The parent and the child re-run (the child waits again: its stage-in held), the parent's new
    output, its finish (the child released: its stage-in pending again)."""
    rerun(client, parent.id, child.id)
    assert client.get(f"/jobs/{child.id}")["state"] == "AWAITING_PARENTS"
    assert client.get("/transfers/", params={"job_id": child.id})["results"][0]["state"] == "awaiting_job"
    handoff.write_text("second\n")
    move_job(client, parent.id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
    assert client.get(f"/jobs/{child.id}")["state"] == "READY"


@dataclass
class HandoffDag:
    """A parent staging its ``result.txt`` out to ``handoff`` (in ``tmp_path/shared``), its child
    staging ``handoff`` in (AWAITING_PARENTS), and the module."""

    client: Any
    site: Any
    site_id: int
    app: Any
    parent: Any
    child: Any
    handoff: Path
    module: TransfersModule

    @property
    def data(self) -> Path:
        return Path(self.site.data_path)

    def state(self, job_id: int) -> str:
        return job_state(self.client, job_id)

    def settled(self) -> bool:
        """Nothing left for the agent to do: no item of the site pending or in flight."""
        return settled(self.client, self.site_id)

    def finish_parent(self, output: str, what: Optional[str] = None, check_acquired: bool = True) -> None:
        """The parent's run wrote ``output``; it goes STAGED_IN -> POSTPROCESSED as a launcher
        would move it (``finish_as_a_launcher``), and, with ``what``, the module runs until its
        stage-out finished it."""
        (self.data / "dag/parent").mkdir(parents=True, exist_ok=True)
        (self.data / "dag/parent/result.txt").write_text(output)
        finish_as_a_launcher(self.client, self.site_id, self.parent.id, check_acquired)
        if what is not None:
            run_cycles(self.module, lambda: self.state(self.parent.id) == "JOB_FINISHED", what)

    def rerun(self) -> None:
        rerun(self.client, self.parent.id, self.child.id)

    def child_moves(self) -> list[tuple[str, str]]:
        """The child's state changes, in order."""
        events = self.client.get("/events/", params={"job_id": self.child.id})["results"]
        return [(e["from_state"], e["to_state"]) for e in sorted(events, key=lambda e: (e["timestamp"], e["id"]))]


def make_handoff_dag(tmp_path: Path, site_name: str, **opts: Any) -> HandoffDag:
    """A ``HandoffDag`` on a new site ``site_name``; ``opts`` go to the module's options."""
    client, site = init_transfer_site(tmp_path, site_name)
    app = step_app(site.site_id)
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    parent = Job("dag/parent", app, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", app, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    return HandoffDag(client, site, site.site_id, app, parent, child, handoff, transfers_module(site, client, **opts))


def run_cycles(module: TransfersModule, predicate: Callable[[], bool], what: str, cycles: int = 100) -> None:
    """Agent cycles until ``predicate()`` holds (the count only keeps a broken test from hanging)."""
    for _ in range(cycles):
        module.run_cycle()
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"transfers never reached {what}")


def finish_as_a_launcher(client: Any, site_id: int, job_id: int, check_acquired: bool = True) -> None:
    """STAGED_IN -> POSTPROCESSED through the API, as the processing module and a launcher would;
    ``check_acquired``: assert that the launcher's session acquired the job."""
    client.patch("/jobs/", json=[{"id": job_id, "state": "PREPROCESSED"}])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    if check_acquired:
        assert job_id in {j["id"] for j in (got if isinstance(got, list) else got["results"])}
    move_job(client, job_id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
    client.delete(f"/sessions/{session}")


def move_job(client: Any, job_id: int, *states: str) -> None:
    """Job ``job_id`` through ``states``, one PATCH each."""
    for state in states:
        client.patch("/jobs/", json=[{"id": job_id, "state": state}])


def rerun(client: Any, parent_id: int, child_id: int) -> None:
    """`balsam job modify --id P --id C -s RESTART_READY`: the child waits for its parent again."""
    client.patch("/jobs/", json=[{"id": parent_id, "state": "RESTART_READY"},
                                 {"id": child_id, "state": "RESTART_READY"}])


def job_state(client: Any, job_id: int) -> str:
    return client.get(f"/jobs/{job_id}")["state"]


def stage_in_item(client: Any, job_id: int) -> dict:
    """The one stage-in item of job ``job_id``."""
    (row,) = client.get("/transfers/", params={"job_id": job_id, "direction": "in"})["results"]
    return row


def settled(client: Any, site_id: int) -> bool:
    """Nothing left for the agent to do: no item of the site pending or in flight."""
    rows = client.get("/transfers/", params={"site_id": site_id, "state": ["pending", "active", "inactive"]})
    return rows["count"] == 0


def site_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("balsam.site") and r.levelno >= logging.ERROR]


def answer_tokens_with_their_tasks(module: TransfersModule) -> dict[str, str]:
    """The module's ``local`` backend as a service with submission tokens (as Globus' submission
    ids): a token it has seen is answered with its task; the first submission's answer is lost (a
    timeout, after the task started). Returns {token: task id}."""
    backend = module.backend("local")
    real_submit = backend.submit
    by_token: dict[str, str] = {}
    tokens = iter(f"token-{n}" for n in range(1000))

    def submit(location: Any, direction: Any, files: Any, token: Any = None) -> str:
        if token in by_token:
            return by_token[token]
        task_id = real_submit(location, direction, files, None)
        by_token[token] = task_id
        if len(by_token) == 1:
            raise TransferError("timed out waiting for the service's answer", retryable=True)
        return task_id

    backend.new_submission_token = lambda: next(tokens)  # type: ignore[method-assign]
    backend.submit = submit  # type: ignore[method-assign]
    return by_token


def journal_a_far_batch_then_delete_its_jobs(api: FakeAPI, module: TransfersModule, backend: Any) -> None:
    """On ``setup``'s scripted backend (test_transfer_module_refusals: a token names its task), a
    cycle journals the batch of location ``far`` with its token, its submission's answer lost (the
    service may have started its task); then submissions go through again, and every job is
    deleted with its items."""
    backend.with_tokens = True
    backend.refusals["far"] = TransferError("submit timed out (may have arrived)", retryable=True)
    module.run_cycle()
    del backend.refusals["far"]
    api.items.clear()
    api.jobs.clear()


def fail_the_first_transfers_patch(monkeypatch: pytest.MonkeyPatch, module: TransfersModule, why: str) -> None:
    """The module's first PATCH /transfers/ raises ConnectionError(``why``); the others go through."""
    real_patch = module.client.patch
    down = [True]

    def patch(path: str, **kw: Any) -> Any:
        if down and path == "/transfers/":
            down.clear()
            raise ConnectionError(why)
        return real_patch(path, **kw)

    monkeypatch.setattr(module.client, "patch", patch)


def hold_copies(monkeypatch: pytest.MonkeyPatch, dest_suffix: str) -> threading.Event:
    """The local backend's copies to a destination ending with ``dest_suffix`` wait (as a queued
    file of a task) until the returned event is set; the others are the real ones."""
    real_copy = lt.copy_into_place
    gate = threading.Event()

    def queued_copy(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if str(dest).endswith(dest_suffix):
            gate.wait(60)
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", queued_copy)
    return gate


def slow_first_copy(monkeypatch: pytest.MonkeyPatch, snapshot: Path, dest_suffix: str = "") -> threading.Event:
    """The first copy of the local backend to a destination ending with ``dest_suffix`` reads its
    source at once (kept in ``snapshot``: the file as the copy opened it) and lands only when the
    returned event is set; the other copies are the real ones."""
    real_copy = lt.copy_into_place
    gate = threading.Event()
    first: list[bool] = []

    def slow_copy(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if str(dest).endswith(dest_suffix) and not first:
            first.append(True)
            shutil.copyfile(src, snapshot)
            gate.wait(60)
            return real_copy(snapshot, dest, *a, **k)
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", slow_copy)
    return gate
