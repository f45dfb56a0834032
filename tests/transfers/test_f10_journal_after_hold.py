"""The site agent's journal of submissions (``.transfer-tasks.jsonl``) after a DAG child's stage-in
is held again (``awaiting_job``: the child re-run, waiting for its parents): the real server
(SQLite and PostgreSQL), the ``transfers`` module run cycle by cycle with the built-in ``local``
backend. In each case the task submitted before the hold copies the parent's first output slowly
(it opened the file before the re-run): left running, its copy lands over the fresh one after the
release, with the child already STAGED_IN.

- A batch journaled with a submission token (its submission's answer lost) whose item is still held
  at the next cycle was dropped from the journal, neither sent again nor its task cancelled. It is
  now sent again with its token and the task that answers is cancelled.
- A task line left by a cycle whose PATCH failed (the API down), its item held meanwhile: the next
  cycle dropped the line without tracking the task (only the start-up tracked journal lines). It is
  now tracked, and cancelled as a task whose items left it.
- A task line of an agent from before the holds were journaled (no count): the item's own count
  stood in for the line's, so a hold since never showed and the item was re-attached to that task.
  A line without a count now reads as 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule
from test_f5_held_items_journal_and_refusals import make_dag, rerun_and_release, run_cycles


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Iterator[None]:
    from balsam.plugins.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def stale_first_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The first copy made (the pre-hold task's) reads its source at once and lands only when the
    returned event is set; the other copies are the real ones."""
    import balsam.builtin.local_transfer as lt

    gate = threading.Event()
    real_copy = lt.copy_into_place
    first: list[bool] = []

    def slow_copy(src: Any, dest: Any, *a: Any, **k: Any) -> Any:
        if not first:
            first.append(True)
            snapshot = tmp_path / "old-inode"  # the source as the slow copy opened it
            shutil.copyfile(src, snapshot)
            gate.wait(60)
            return real_copy(snapshot, dest, *a, **k)
        return real_copy(src, dest, *a, **k)

    monkeypatch.setattr(lt, "copy_into_place", slow_copy)
    yield gate
    gate.set()


@pytest.fixture
def cancels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every LocalTransfer.cancel_task call (the real one still runs)."""
    import balsam.builtin.local_transfer as lt

    calls: list[str] = []
    real = lt.LocalTransfer.cancel_task

    def cancel_task(self: Any, task_id: str) -> Any:
        calls.append(task_id)
        return real(self, task_id)

    monkeypatch.setattr(lt.LocalTransfer, "cancel_task", cancel_task)
    return calls


def wait_for_local_tasks(module: TransfersModule) -> None:
    """Let every copy thread of the local backend end (a cancelled one writes nothing more)."""
    for future in list(module.backend("local")._tasks._running.values()):
        future.result(30)


def test_a_token_batch_whose_item_is_still_held_is_sent_again_and_its_task_cancelled(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from balsam.transfer import TransferError

    client, site, _, parent, child, handoff, module = make_dag(tmp_path)
    backend = module.backend("local")
    real_submit = backend.submit
    by_token: dict[str, str] = {}
    tokens = iter(f"token-{n}" for n in range(1000))

    def submit(location: Any, direction: Any, files: Any, token: Any = None) -> str:
        """A service with submission ids: a token it has seen is answered with its task."""
        if token in by_token:
            return by_token[token]
        task_id = real_submit(location, direction, files, None)
        by_token[token] = task_id
        if len(by_token) == 1:
            raise TransferError("timed out waiting for the service's answer", retryable=True)
        return task_id

    backend.new_submission_token = lambda: next(tokens)  # type: ignore[method-assign]
    backend.submit = submit  # type: ignore[method-assign]
    try:
        module.run_cycle()  # token-0's task started, its answer lost: the token stays journaled
        assert '"token": "token-0"' in module.journal_path.read_text()
        client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"}, {"id": child.id, "state": "RESTART_READY"}])
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()  # the item is held: the batch is sent again, its task cancelled
        assert cancels == [by_token["token-0"]]
        assert any("some of its items were held again since" in r.getMessage() for r in caplog.records)
        assert not module.journal_path.exists()
        handoff.write_text("second\n")
        for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
            client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
        run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        stale_first_copy.set()
        wait_for_local_tasks(module)
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
    finally:
        stale_first_copy.set()
        module.close()


def test_a_task_line_left_by_a_failed_patch_is_cancelled_when_its_item_is_held(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, site, _, parent, child, handoff, module = make_dag(tmp_path)
    real_patch = module.client.patch
    down = [True]

    def patch(path: str, **kw: Any) -> Any:
        if down and path == "/transfers/":
            down.clear()
            raise ConnectionError("the API is unreachable")
        return real_patch(path, **kw)

    monkeypatch.setattr(module.client, "patch", patch)
    try:
        with pytest.raises(ConnectionError):
            module.run_cycle()  # submitted and journaled; the PATCH recording it fails
        (line,) = module.journal_path.read_text().splitlines()
        task_id = json.loads(line)["task_id"]
        client.patch("/jobs/", json=[{"id": parent.id, "state": "RESTART_READY"}, {"id": child.id, "state": "RESTART_READY"}])
        module.run_cycle()  # the item is held: not read, its journal line dropped
        assert cancels == [task_id.partition(":")[2]]
        assert not module.journal_path.exists()
        handoff.write_text("second\n")
        for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
            client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
        run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        stale_first_copy.set()
        wait_for_local_tasks(module)
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
    finally:
        stale_first_copy.set()
        module.close()


def test_a_journal_line_without_counts_is_not_re_attached_after_a_hold(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent from before the counts submitted the child's item (its task copies the parent's
    first output, slowly) and died before its PATCH; the child was re-run, held (counted) and
    released. The upgraded agent, started while the service still runs that task, submits the item
    again and cancels the old task."""
    client, site, _, parent, child, handoff, module = make_dag(tmp_path)
    real_patch = module.client.patch
    dead = [True]

    def patch(path: str, **kw: Any) -> Any:
        if dead and path == "/transfers/":
            dead.clear()
            raise ConnectionError("the agent died before its PATCH")
        return real_patch(path, **kw)

    monkeypatch.setattr(module.client, "patch", patch)
    agent: TransfersModule | None = None
    try:
        with pytest.raises(ConnectionError):
            module.run_cycle()
        (line,) = module.journal_path.read_text().splitlines()
        old = json.loads(line)
        # As an agent from before the counts wrote it.
        module.journal_path.write_text(json.dumps({"task_id": old["task_id"], "item_ids": old["item_ids"]}) + "\n")
        rerun_and_release(client, parent, child, handoff)
        (item,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]
        assert item["state"] == "pending" and item["transfer_info"]["holds"] == 1
        agent = TransfersModule(site, module.options, client)  # the upgraded agent
        agent.backends = module.backends  # the service still runs the old task
        agent.run_cycle()
        assert cancels == [old["task_id"].partition(":")[2]]
        assert client.get(f"/transfers/{item['id']}")["task_id"] not in ("", old["task_id"])
        run_cycles(agent, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        stale_first_copy.set()
        wait_for_local_tasks(agent)
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
    finally:
        stale_first_copy.set()
        if agent is not None:
            agent.close()
        module.close()
