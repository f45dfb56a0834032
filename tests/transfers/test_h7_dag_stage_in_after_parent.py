"""A DAG whose parent stages its output out to a location and whose child stages it in from there,
end to end: the real server (SQLite and PostgreSQL), the site agent's ``transfers`` module run
cycle by cycle with the built-in ``local`` backend.

The child's stage-in items were ``pending`` from its creation, so the agent's first cycles copied
the child's input while the parent had not run: the file an earlier run had left there (the child
then ran on it, released straight to STAGED_IN), or no file (its tries used up, the child FAILED
while it waited). The child's stage-in now waits until its parent has finished."""

from __future__ import annotations

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


@pytest.mark.parametrize("left_there", ["stale", "missing"])
def test_the_child_stages_in_what_its_parent_staged_out(env: Any, tmp_path: Path, left_there: str) -> None:
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    init_site(tmp_path / "site", "dag-site", "default", client,
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
    if left_there == "stale":
        handoff.write_text("an earlier run's output\n")
    parent = Job("dag/parent", Step, transfers={"result": f"shared:{handoff}"})
    parent.save()
    child = Job("dag/child", Step, parent_ids=[parent.id], transfers={"input": f"shared:{handoff}"})
    child.save()
    assert (parent.state, child.state) == ("STAGED_IN", "AWAITING_PARENTS")
    module = TransfersModule(site, TransfersOptions(transfer_locations=LOCATIONS, service_period=1,
                                                    retry_backoff_sec=0, max_attempts=2), client)

    def settled() -> bool:  # nothing left for the agent to do: no item pending or in flight
        rows = client.get("/transfers/", params={"site_id": site.site_id, "state": ["pending", "active", "inactive"]})
        return rows["count"] == 0

    run_cycles(module, settled, "a settled state while the parent runs")  # the agent, while the parent runs
    assert client.get(f"/jobs/{child.id}")["state"] == "AWAITING_PARENTS"

    data = Path(site.data_path)
    (data / "dag/parent").mkdir(parents=True, exist_ok=True)
    (data / "dag/parent/result.txt").write_text("the parent's output\n")
    finish_as_a_launcher(client, site.site_id, parent.id)
    run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] != "AWAITING_PARENTS" and settled(),
               "the child's release and the end of its stage-in")
    assert client.get(f"/jobs/{parent.id}")["state"] == "JOB_FINISHED"
    assert handoff.read_text() == "the parent's output\n"
    assert client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN"
    assert (data / "dag/child/input.txt").read_text() == "the parent's output\n"
    moves = [(e["from_state"], e["to_state"]) for e in
             sorted(client.get("/events/", params={"job_id": child.id})["results"], key=lambda e: (e["timestamp"], e["id"]))]
    assert moves == [("CREATED", "AWAITING_PARENTS"), ("AWAITING_PARENTS", "READY"), ("READY", "STAGED_IN")]
