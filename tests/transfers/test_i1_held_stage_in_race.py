"""A DAG child re-run with its parent (sent back to AWAITING_PARENTS, its stage-in held again:
``awaiting_job``) while the site agent's ``transfers`` module is busy with the child's stage-in item:
the real server (SQLite and PostgreSQL), the module run cycle by cycle with the built-in ``local``
backend, the re-run sent through the API at the moment named by each case.

- ``before_submit``: the module has read the item ``pending`` and submits it after the re-run. Its
  PATCH to ``active`` (with the new task id) was accepted: the item left ``awaiting_job``, the
  stale copy (the parent's first output) was followed to ``done``, and at the release the child went
  straight to STAGED_IN and ran on the first run's file. The server now refuses the PATCH (409, the
  item held); the module cancels the task it just submitted, logs one INFO line, and fails nothing.
- ``in_flight``: the item was ``active`` (a task running) when the job was sent back to wait. It was
  left in flight, its stale copy recorded ``done``, with the same end. It is now held as the others
  (``awaiting_job``, its task id cleared); the module cancels the task, no item being left on it.
- ``before_report``: the module has polled the task ``done`` when the re-run comes, then reports it.
  Its PATCH to ``done`` is refused as in ``before_submit``; nothing to cancel.

Each way, the item is copied again once the parent has finished its new run, and the child reads
the parent's second output."""

from __future__ import annotations

import logging
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
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    assert job_id in {j["id"] for j in (got if isinstance(got, list) else got["results"])}
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": job_id, "state": state}])
    client.delete(f"/sessions/{session}")


@pytest.mark.parametrize("when", ["before_submit", "in_flight", "before_report"])
def test_a_child_sent_back_to_wait_mid_stage_in_reads_the_parents_new_output(
        env: Any, tmp_path: Path, when: str, caplog: pytest.LogCaptureFixture) -> None:
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    init_site(tmp_path / "site", "i1-site", "default", client,
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

    Step.sync()
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    parent = Job("dag/parent", Step, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    module = TransfersModule(site, TransfersOptions(transfer_locations=LOCATIONS, service_period=1,
                                                    retry_backoff_sec=0, max_attempts=2), client)
    (item,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]

    def job_state(job_id: int) -> str:
        return client.get(f"/jobs/{job_id}")["state"]

    def item_now() -> dict:
        return client.get(f"/transfers/{item['id']}")

    def settled() -> bool:  # nothing left for the agent to do: no item pending or in flight
        rows = client.get("/transfers/", params={"site_id": site_id, "state": ["pending", "active", "inactive"]})
        return rows["count"] == 0

    # The parent's first run: its output goes out to the location, the child is released (READY, its
    # stage-in pending) by the PATCH that records the stage-out done, at the end of that cycle.
    data = Path(site.data_path)
    (data / "dag/parent").mkdir(parents=True, exist_ok=True)
    (data / "dag/parent/result.txt").write_text("the parent's first output\n")
    finish_as_a_launcher(client, site_id, parent.id)
    run_cycles(module, lambda: job_state(parent.id) == "JOB_FINISHED", "the parent's first finish")
    assert (handoff.read_text(), job_state(child.id), item_now()["state"]) == (
        "the parent's first output\n", "READY", "pending")

    def rerun() -> None:  # `balsam job modify --id P --id C -s RESTART_READY`: the parent's output was wrong
        client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"},
                                     {"id": child.id, "state": "RESTART_READY"}])
        assert (job_state(parent.id), job_state(child.id)) == ("RESTART_READY", "AWAITING_PARENTS")

    def once_after(name: str, before: bool) -> None:
        """Wrap the module's method ``name``: the re-run comes once, right before or after it."""
        original = getattr(module, name)
        done: list[bool] = []

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before and not done:
                done.append(True)
                rerun()
            result = original(*args, **kwargs)
            if not before and not done:
                done.append(True)
                rerun()
            return result

        setattr(module, name, wrapped)

    if when == "before_submit":
        once_after("_submit", before=True)  # the item was read pending; the re-run; then its submission
    else:
        module.run_cycle()  # the child's stage-in is submitted
        assert item_now()["state"] == "active"
        if when == "in_flight":
            rerun()
        else:
            # Let the local copy end, so that this poll finds the task done; the re-run comes
            # between that poll and the PATCH that reports it.
            deadline = 100
            while not (data / "dag/child/input.txt").exists() and deadline:
                time.sleep(0.05)
                deadline -= 1
            once_after("_poll", before=False)

    with caplog.at_level(logging.INFO, logger="balsam"):
        run_cycles(module, settled, "a settled state while the parent runs again")
    assert job_state(child.id) == "AWAITING_PARENTS"
    held = item_now()
    assert (held["state"], held["task_id"]) == ("awaiting_job", "")
    records = [r for r in caplog.records if r.name.startswith("balsam.site")]
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    said = [r.getMessage() for r in records if "held again" in r.getMessage()]
    if when == "in_flight":  # the next cycle finds no item left on the task
        assert said and said[0].endswith("its items are held again (their jobs wait for their parents again); "
                                         "cancelling it"), said
    else:  # the refused PATCH: one line
        assert len(said) == 1 and said[0].startswith(f"1 transfer item held again ({item['id']}): "), said
        if when == "before_submit":
            assert said[0].endswith("cancelled"), said

    # The parent's new run: its new output goes out, the child is released and stages it in.
    (data / "dag/parent/result.txt").write_text("the parent's second output\n")
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
    run_cycles(module, lambda: job_state(child.id) != "AWAITING_PARENTS" and settled(),
               "the child's release and the end of its stage-in")
    assert handoff.read_text() == "the parent's second output\n"
    assert (job_state(parent.id), job_state(child.id)) == ("JOB_FINISHED", "STAGED_IN")
    assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
    moves = [(e["from_state"], e["to_state"]) for e in
             sorted(client.get("/events/", params={"job_id": child.id})["results"], key=lambda e: (e["timestamp"], e["id"]))]
    assert moves[-3:] == [("RESTART_READY", "AWAITING_PARENTS"), ("AWAITING_PARENTS", "READY"), ("READY", "STAGED_IN")]
    assert "FAILED" not in {s for m in moves for s in m}
    module.close()


def test_a_task_shared_with_another_jobs_item_runs_on(env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The held child's stage-in and another job's were submitted as one task (one batch: same
    location, same direction). The child's item is refused as held; the other's is recorded, so the
    task is not cancelled (a task is one unit for its service): it ends ``done`` for the other job,
    the child's item stays held, and is copied after the parent's new run."""
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    init_site(tmp_path / "site", "i1-shared-site", "default", client,
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

    Step.sync()
    shared = tmp_path / "shared"
    shared.mkdir()
    handoff = shared / "step1.txt"
    parent = Job("dag/parent", Step, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    module = TransfersModule(site, TransfersOptions(transfer_locations=LOCATIONS, service_period=1,
                                                    retry_backoff_sec=0, max_attempts=2), client)

    def job_state(job_id: int) -> str:
        return client.get(f"/jobs/{job_id}")["state"]

    def settled() -> bool:
        rows = client.get("/transfers/", params={"site_id": site_id, "state": ["pending", "active", "inactive"]})
        return rows["count"] == 0

    data = Path(site.data_path)
    (data / "dag/parent").mkdir(parents=True, exist_ok=True)
    (data / "dag/parent/result.txt").write_text("the parent's first output\n")
    finish_as_a_launcher(client, site_id, parent.id)
    run_cycles(module, lambda: job_state(parent.id) == "JOB_FINISHED", "the parent's first finish")
    lone = Job("lone", Step, transfers={"input": f"shared:{handoff}"})  # reads the same file, no parent
    lone.save()
    (child_in,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]
    (lone_in,) = client.get("/transfers/", params={"job_id": lone.id, "direction": "in"})["results"]
    assert {child_in["state"], lone_in["state"]} == {"pending"}

    original = module._submit
    submitted: list[list[int]] = []

    def rerun_then_submit(due: list[dict], *args: Any, **kwargs: Any) -> Any:
        if not submitted:
            submitted.append(sorted(it["id"] for it in due))
            client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"},
                                         {"id": child.id, "state": "RESTART_READY"}])
        return original(due, *args, **kwargs)

    module._submit = rerun_then_submit  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="balsam"):
        module.run_cycle()
        assert submitted == [sorted([child_in["id"], lone_in["id"]])]
        task = client.get(f"/transfers/{lone_in['id']}")["task_id"]
        said = [r.getMessage() for r in caplog.records if "held again" in r.getMessage()]
        assert said == [f"1 transfer item held again ({child_in['id']}): their jobs wait for their parents again; "
                        f"not recorded, copied again when their jobs are released; task {task} runs on for its "
                        "other items"]
        run_cycles(module, settled, "the end of the shared task")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (job_state(lone.id), (data / "lone/input.txt").read_text()) == ("STAGED_IN", "the parent's first output\n")
    held = client.get(f"/transfers/{child_in['id']}")
    assert (held["state"], held["task_id"], job_state(child.id)) == ("awaiting_job", "", "AWAITING_PARENTS")
    assert not module.tracked_tasks

    (data / "dag/parent/result.txt").write_text("the parent's second output\n")
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
    run_cycles(module, lambda: job_state(child.id) != "AWAITING_PARENTS" and settled(),
               "the child's release and the end of its stage-in")
    assert job_state(child.id) == "STAGED_IN"
    assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
    module.close()
