"""What a transfer task that runs on keeps of the items that left it, in the site agent's
``transfers`` module: the real server (SQLite and PostgreSQL), the module run cycle by cycle with
the built-in ``local`` backend.

- Only an item that left a task still running waits for it. The module used to hold back every due
  item whose destination lay under any destination of any task in flight, compared as bare paths
  (location and direction ignored): a recursive stage-out into a location's root stalled every
  stage-in of the site, one into a shared results folder the other jobs' stage-outs there, for as
  long as it ran. It now looks up the item's own id among the items of the tasks in flight.
- What a task's items write is kept in ``.transfer-tasks-in-flight.json`` with the task: an agent
  restarted while a task runs on (a Globus task outlives the agent) still knows the destination of
  the item that left it, and its failed file is not charged to the other job's item (which was
  FAILED at ``max_attempts=1``). A file of an agent from before (item ids alone) still loads.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from balsam.site.modules.transfers import TASKS_NAME, TransfersModule
from transfer_test_utils import (finish_as_a_launcher, hold_copies, init_transfer_site, make_shared_task_dag, make_site,
                                 rerun, run_cycles, site_errors, stage_in_item, step_app, transfers_module)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


@pytest.mark.parametrize("out_remote", ["/", "/proj/results"])
def test_a_long_directory_stage_out_holds_back_no_other_jobs_transfers(
        env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_remote: str) -> None:
    """A producer's recursive stage-out into the results location's root (or a shared folder of it)
    runs long (a big directory: its copy is held). Meanwhile another job's stage-in from another
    location and its stage-out of one file into the same location (folder) go through."""
    import balsam.builtin.local_transfer as lt
    from balsam.api import ApplicationDefinition, Job

    results = tmp_path / "results"
    results.mkdir()
    locations = {"shared": "local://", "results": f"local://{results}"}
    client, site = init_transfer_site(tmp_path, "f10-site", locations)
    site_id = site.site_id

    class Producer(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"out": {"required": False, "direction": "out", "local_path": "out", "recursive": True}}

    Producer.sync()
    Consumer = step_app(site_id, command="true", name="Consumer")
    module = transfers_module(site, client, locations)
    data = Path(site.data_path)
    producer = Job("prod", Producer, transfers={"out": f"results:{out_remote}"})
    producer.save()
    (data / "prod/out").mkdir(parents=True, exist_ok=True)
    (data / "prod/out/big.bin").write_text("x")

    gate = threading.Event()
    real_copy = lt.copy_into_place

    def slow(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if str(src).endswith("prod/out"):
            gate.wait(60)  # a big directory: a long task
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", slow)
    try:
        finish_as_a_launcher(client, site_id, producer.id, check_acquired=False)
        module.run_cycle()
        (producer_task,) = module.tracked_tasks
        (tmp_path / "in.txt").write_text("input\n")
        consumer = Job("cons", Consumer, transfers={"input": f"shared:{tmp_path / 'in.txt'}",
                                                     "result": f"results:{out_remote.rstrip('/')}/cons.txt"})
        consumer.save()
        run_cycles(module, lambda: client.get(f"/jobs/{consumer.id}")["state"] == "STAGED_IN", "the consumer's stage-in")
        assert (data / "cons/input.txt").read_text() == "input\n"
        (data / "cons/result.txt").write_text("r\n")
        finish_as_a_launcher(client, site_id, consumer.id, check_acquired=False)
        run_cycles(module, lambda: client.get(f"/jobs/{consumer.id}")["state"] == "JOB_FINISHED",
                   "the consumer's stage-out")
        assert (results / out_remote.strip("/") / "cons.txt").read_text() == "r\n"
        # All that while the producer's task ran.
        assert producer_task in module.tracked_tasks
        assert client.get(f"/jobs/{producer.id}")["state"] == "POSTPROCESSED"
        for item in client.get("/transfers/", params={"job_id": consumer.id})["results"]:
            assert "waiting for task" not in str(item["transfer_info"].get("reason")), item
        gate.set()
        run_cycles(module, lambda: client.get(f"/jobs/{producer.id}")["state"] == "JOB_FINISHED", "the producer's stage-out")
        assert (results / out_remote.strip("/") / "big.bin").read_text() == "x"
    finally:
        gate.set()
        module.close()


def test_a_task_running_on_across_an_agent_restart_does_not_charge_the_held_items_file_to_the_others(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """One task copies a DAG child's input and a lone job's. The child is re-run and held while the
    task waits (its copy not started: a queued file), its input removed with the re-run. The agent
    restarts (a new module; the service, here the same local backend, keeps the task), and the task
    ends with the child's file failed: the lone job is STAGED_IN, its item done without a failed try."""
    client, site, site_id, Step, NoOut, module = make_site(tmp_path, "f5-site", max_attempts=1)
    parent, child, lone, handoff = make_shared_task_dag(tmp_path, Step, NoOut, client)
    child_in, lone_in = stage_in_item(client, child.id), stage_in_item(client, lone.id)
    gate = hold_copies(monkeypatch, "dag/child/input.txt")
    again: TransfersModule | None = None
    try:
        module.run_cycle()  # one task for both items
        (task_id,) = module.tracked_tasks
        saved = json.loads((Path(site.site_path) / TASKS_NAME).read_text())
        rerun(client, parent.id, child.id)
        handoff.unlink()  # the first run's output removed with the re-run
        again = TransfersModule(site, module.options, client)  # the agent restarted
        again.backends = module.backends  # the service still runs the task
        gate.set()
        with caplog.at_level(logging.DEBUG, logger="balsam"):
            run_cycles(again, lambda: client.get(f"/jobs/{lone.id}")["state"] in ("STAGED_IN", "FAILED"),
                       "the lone job's stage-in")
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        item = client.get(f"/transfers/{lone_in['id']}")
        assert item["state"] == "done" and "attempts" not in item["transfer_info"], item
        assert (Path(site.data_path) / "lone/input.txt").read_text() == "lone input\n"
        assert not site_errors(caplog)
        assert any("which left the task" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
        assert client.get(f"/transfers/{child_in['id']}")["state"] == "awaiting_job"
        # What the restarted agent read: both items' destinations, kept with the task.
        assert saved[task_id]["dests"] == {str(child_in["id"]): [str(Path(site.data_path) / "dag/child/input.txt"), False],
                                           str(lone_in["id"]): [str(Path(site.data_path) / "lone/input.txt"), False]}
        assert not (Path(site.site_path) / TASKS_NAME).exists()  # the task ended: nothing left to track
    finally:
        gate.set()
        if again is not None:
            again.close()
        module.close()


def test_a_tasks_file_of_an_earlier_agent_still_loads(env: Any, tmp_path: Path) -> None:
    """Item ids alone (no destinations): the tasks are tracked, and a task none of whose items is
    left (deleted) is cancelled, as before."""
    client, site, _, _, _, module = make_site(tmp_path, "f5-site")
    module.close()
    (Path(site.site_path) / TASKS_NAME).write_text(json.dumps({"local:gone-task": [987654]}))
    agent = TransfersModule(site, module.options, client)
    try:
        assert agent.tracked_tasks == {"local:gone-task": {987654}}
        agent.run_cycle()
        assert agent.tracked_tasks == {}
        assert not (Path(site.site_path) / TASKS_NAME).exists()
    finally:
        agent.close()
