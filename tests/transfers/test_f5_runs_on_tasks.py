"""A transfer task that "runs on" for other jobs' items after one of its items was held again (its
job re-run and sent back to wait for its parents: ``awaiting_job``): the real server (SQLite and
PostgreSQL), the ``transfers`` module run cycle by cycle with the built-in ``local`` backend.

- The held item's file fails inside the task (its source removed with the re-run). The agent used
  to know only the items still on the task: the error matched none of them and the OTHER job's
  item, whose own file was copied, was charged a failed try (its job FAILED at max_attempts=1).
  The module now keeps what each task writes, by item, also for the items that left it: the
  error is the held item's and is dropped (DEBUG). Two ways to leave: the submission's PATCH
  refused (409, held just before it), or the item held by the server while its task runs.
- The held item's job is released while the old task still writes its destination (a slow copy of
  the first output). Submitted at once, the new copy could land first and the old one over it,
  with the job already STAGED_IN. The item now waits for that task ("waiting for task T, which
  still writes its destination"), then is copied again: the job reads the parent's new output.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from balsam.site.modules.transfers import TransfersModule, TransfersOptions

LOCATIONS = {"shared": "local://"}


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Iterator[None]:
    from balsam.plugins.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def run_cycles(module: TransfersModule, predicate: Callable[[], bool], what: str, cycles: int = 100) -> None:
    """Agent cycles until ``predicate()`` holds (the count only keeps a broken test from hanging)."""
    for _ in range(cycles):
        module.run_cycle()
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"transfers never reached {what}")


def finish_as_a_launcher(client: Any, site_id: int, job_id: int) -> None:
    """STAGED_IN -> POSTPROCESSED through the API, as the processing module and a launcher would."""
    client.patch("/jobs/", json=[{"id": job_id, "state": "PREPROCESSED"}])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": job_id, "state": state}])
    client.delete(f"/sessions/{session}")


def make_site(tmp_path: Path, **opts: Any) -> tuple[Any, Any, int, Any, Any, TransfersModule]:
    """(client, site config, site id, app with a stage-in and a stage-out, app with none, module)."""
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    init_site(tmp_path / "site", "f5-site", "default", client,
              settings_overrides={"transfers": {"transfer_locations": LOCATIONS}})
    site = SiteConfig(tmp_path / "site")
    site_id = site.site_id

    class Step(ApplicationDefinition):
        site = site_id
        command_template = "cat input.txt > result.txt"
        transfers = {
            "input": {"required": False, "direction": "in", "local_path": "input.txt"},
            "result": {"required": False, "direction": "out", "local_path": "result.txt"},
        }

    class NoOut(ApplicationDefinition):
        site = site_id
        command_template = "true"

    Step.sync()
    NoOut.sync()
    options = dict(transfer_locations=LOCATIONS, service_period=1, retry_backoff_sec=0, max_attempts=2)
    options.update(opts)
    module = TransfersModule(site, TransfersOptions(**options), client)
    return client, site, site_id, Step, NoOut, module


def site_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("balsam.site") and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_held_items_failed_file_in_a_task_that_runs_on_is_not_charged_to_the_others(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, max_attempts: int) -> None:
    """Held between the module's read and its PATCH: the PATCH is refused (409), the task runs on
    for the other job's item, and the held item's source is gone (removed with the re-run)."""
    from balsam.api import Job

    client, site, site_id, Step, _, module = make_site(tmp_path, max_attempts=max_attempts)
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    (shared / "lone.txt").write_text("lone input\n")
    parent = Job("dag/parent", Step, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    data = Path(site.data_path)
    (data / "dag/parent").mkdir(parents=True, exist_ok=True)
    (data / "dag/parent/result.txt").write_text("first\n")
    finish_as_a_launcher(client, site_id, parent.id)
    run_cycles(module, lambda: client.get(f"/jobs/{parent.id}")["state"] == "JOB_FINISHED", "the parent's finish")
    lone = Job("lone", Step, transfers={"input": f"shared:{shared / 'lone.txt'}"})
    lone.save()
    (lone_in,) = client.get("/transfers/", params={"job_id": lone.id, "direction": "in"})["results"]

    original = module._submit
    done: list[bool] = []

    def rerun_then_submit(due: Any, *a: Any, **k: Any) -> Any:
        if not done:
            done.append(True)
            client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"},
                                         {"id": child.id, "state": "RESTART_READY"}])
            handoff.unlink()  # the user removes the first run's wrong output
        return original(due, *a, **k)

    module._submit = rerun_then_submit  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="balsam"):
        run_cycles(module, lambda: client.get(f"/jobs/{lone.id}")["state"] in ("STAGED_IN", "FAILED"),
                   "the lone job's stage-in")
    try:
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        item = client.get(f"/transfers/{lone_in['id']}")
        assert item["state"] == "done" and "attempts" not in item["transfer_info"], item
        assert (data / "lone/input.txt").read_text() == "lone input\n"
        assert not site_errors(caplog)
        assert any("runs on for its other items" in r.getMessage() for r in caplog.records)
        assert any("which left the task" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
        (child_in,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]
        assert child_in["state"] == "awaiting_job" and client.get(f"/jobs/{child.id}")["state"] == "AWAITING_PARENTS"
    finally:
        module.close()


def test_an_item_held_in_flight_in_a_shared_task_does_not_fail_the_other_job(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held by the server while its task runs (``active``, task id cleared): the task runs on for
    the other job's item, and the held item's file, not read yet (its copy waits, as in a queued
    task), is gone by then."""
    import balsam.builtin.local_transfer as lt
    from balsam.api import Job

    client, site, site_id, Step, NoOut, module = make_site(tmp_path, max_attempts=1)
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
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": parent.id, "state": state}])

    real_copy = lt.copy_into_place
    gate = threading.Event()

    def queued_copy(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if str(dest).endswith("dag/child/input.txt"):
            gate.wait(60)
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", queued_copy)
    try:
        with caplog.at_level(logging.DEBUG, logger="balsam"):
            module.run_cycle()  # one task for the child's and the lone job's items
            tasks = {r["task_id"] for r in client.get("/transfers/", params={"site_id": site_id, "direction": "in"})["results"]}
            assert len(tasks) == 1 and "" not in tasks
            client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"},
                                         {"id": child.id, "state": "RESTART_READY"}])
            handoff.unlink()  # the wrong output removed with the re-run
            gate.set()
            run_cycles(module, lambda: client.get(f"/jobs/{lone.id}")["state"] in ("STAGED_IN", "FAILED"),
                       "the lone job's stage-in")
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        assert (Path(site.data_path) / "lone/input.txt").read_text() == "lone input\n"
        assert not site_errors(caplog)
        assert any("which left the task" in r.getMessage() for r in caplog.records)
    finally:
        gate.set()
        module.close()


def test_a_released_item_waits_for_the_old_task_that_still_writes_its_destination(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old task (running on for another job's item) copies the parent's first output slowly: it
    opened the source before the re-run and ends after the release. The child's item waits for it,
    then is copied again: the child reads the parent's second output, and nothing overwrites it."""
    import balsam.builtin.local_transfer as lt
    from balsam.api import Job

    client, site, site_id, Step, _, module = make_site(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    (shared / "lone.txt").write_text("lone input\n")
    parent = Job("dag/parent", Step, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    data = Path(site.data_path)
    (data / "dag/parent").mkdir(parents=True, exist_ok=True)
    (data / "dag/parent/result.txt").write_text("the parent's first output\n")
    finish_as_a_launcher(client, site_id, parent.id)
    run_cycles(module, lambda: client.get(f"/jobs/{parent.id}")["state"] == "JOB_FINISHED", "the parent's finish")
    lone = Job("lone", Step, transfers={"input": f"shared:{shared / 'lone.txt'}"})
    lone.save()
    (child_in,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]

    real_copy = lt.copy_into_place
    gate = threading.Event()
    slow: list[str] = []

    def slow_copy(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if str(dest).endswith("dag/child/input.txt") and not slow:
            slow.append(str(dest))
            snapshot = tmp_path / "old-inode"  # the source as the slow copy opened it
            shutil.copyfile(src, snapshot)
            gate.wait(60)
            return real_copy(snapshot, dest, *a, **k)
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", slow_copy)
    original = module._submit
    done: list[bool] = []

    def rerun_then_submit(due: Any, *a: Any, **k: Any) -> Any:
        if not done:
            done.append(True)
            client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"},
                                         {"id": child.id, "state": "RESTART_READY"}])
        return original(due, *a, **k)

    module._submit = rerun_then_submit  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()  # the old task: [child (refused: held), lone]; it runs on for lone
            (old_task,) = [t for t in module.tracked_tasks]
            # The parent's new run and stage-out release the child: its item is pending again.
            (data / "dag/parent/result.txt").write_text("the parent's second output\n")
            for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
                client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
            run_cycles(module, lambda: client.get(f"/transfers/{child_in['id']}")["state"] == "pending"
                       and "waiting for task" in str(client.get(f"/transfers/{child_in['id']}")["transfer_info"]),
                       "the child's item waiting for the old task")
            item = client.get(f"/transfers/{child_in['id']}")
            assert item["transfer_info"]["reason"] == (
                f"waiting for task {old_task}, which still writes its destination"), item
            assert client.get(f"/jobs/{child.id}")["state"] == "READY"
            module.run_cycle()
            assert client.get(f"/transfers/{child_in['id']}")["state"] == "pending"  # still waits
            gate.set()  # the old task ends (its stale copy lands now)
            run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
            run_cycles(module, lambda: client.get("/transfers/", params={
                "site_id": site_id, "state": ["pending", "active", "inactive"]})["count"] == 0, "no transfer left")
        assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        assert not site_errors(caplog)
    finally:
        gate.set()
        module.close()
