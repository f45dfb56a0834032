"""Follow-ups of the hold of a re-run's stage-in (``awaiting_job``) in the site agent's ``transfers``
module: the real server (SQLite and PostgreSQL), the module run cycle by cycle with the built-in
``local`` backend.

- A journaled task is not re-attached after a hold and a release: the agent died between its
  submission and its PATCH; meanwhile the job was re-run, held, and released. The restarted agent
  used to re-attach the item to that task from its journal and record its copy, made from the
  parent's first output. The server counts the hold (``transfer_info.holds``), the journal line
  keeps the count it read: the item is submitted again. A batch journaled with a submission token
  (its submission unconfirmed) whose token the service answers with the task it started before the
  hold: that task is cancelled and the item goes in a new batch.
- A task whose item was held and released between two cycles is cancelled as one its item left,
  not logged as "its items were deleted".
- A 409 that is not the held item's (no ``refused_ids`` naming it as held: an Idempotency-Key's, a
  job's state change) is a refusal like any other (ERROR), not taken for "held again".
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.client.rest import APIError
from transfer_test_utils import (answer_tokens_with_their_tasks, make_released_dag, rerun_and_release, run_cycles,
                                 transfers_module)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def test_a_journaled_task_is_not_re_attached_after_a_hold_and_a_release(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")

    def killed(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt("agent killed before its PATCH")

    module._send_updates = killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        module.run_cycle()
    assert '"task_id": "local:' in module.journal_path.read_text()
    (item,) = client.get("/transfers/", params={"job_id": child.id})["results"]
    assert (item["state"], item["task_id"]) == ("pending", "")  # the submission was never recorded
    rerun_and_release(client, parent, child, handoff)

    restarted = transfers_module(site, client)
    restarted.backends = module.backends  # the service (its tasks) outlived the agent, as Globus does
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            run_cycles(restarted, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
        assert any("not re-attached to task" in r.getMessage() for r in caplog.records)
    finally:
        restarted.close()


def test_a_task_whose_item_was_held_and_released_between_two_cycles_is_not_said_deleted(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, stale_first_copy: threading.Event) -> None:
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")
    gate = stale_first_copy  # the first task's copy opened the first output; it ends late
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()
            assert client.get("/transfers/", params={"job_id": child.id})["results"][0]["state"] == "active"
            rerun_and_release(client, parent, child, handoff)
            module.run_cycle()
            gate.set()
            run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("transfer task ")]
        assert not [m for m in said if "deleted" in m], said
        assert [m for m in said if m.endswith("its items left the task (held again or restarted); cancelling it")], said
    finally:
        gate.set()
        module.close()


class _RefusingClient:
    """The real client, but the first PATCH /transfers/ is refused with ``refusal`` (as the server
    refuses a replayed Idempotency-Key, or a job state change naming the job in ``refused_ids``)."""

    def __init__(self, client: Any, refusal: Callable[[list], APIError]) -> None:
        self._client = client
        self._refusal = refusal
        self.refused = 0

    def patch(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if path == "/transfers/" and not self.refused:
            self.refused += 1
            raise self._refusal(kwargs.get("json") or [])
        return self._client.patch(path, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.mark.parametrize("kind", ["idempotency", "job_state"])
def test_a_409_that_is_not_a_held_items_is_a_refusal(
        balsam_env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    client, site, _, _, child, _, module = make_released_dag(tmp_path, "f5-journal")
    (item,) = client.get("/transfers/", params={"job_id": child.id})["results"]

    def refusal(updates: list) -> APIError:
        if kind == "idempotency":
            return APIError("PATCH", "/transfers/", 409, "the request with this Idempotency-Key left no answer to "
                            "replay; send a new key for a new request")
        # A job's state change refused: refused_ids names jobs (here one whose id is the item's).
        return APIError("PATCH", "/transfers/", 409, f"Invalid state change, nothing was updated: job {item['id']}: "
                        "job state cannot change from READY to STAGED_IN", frozenset({item["id"]}))

    refusing = _RefusingClient(client, refusal)
    module.client = refusing
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()
        assert refusing.refused == 1
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("balsam.site")]
        assert not [m for _, m in said if "held again" in m], said
        assert [m for level, m in said if level == logging.ERROR and f"update of item {item['id']}" in m], said
    finally:
        module.close()


def test_a_journaled_token_batch_answered_by_a_task_from_before_a_hold_is_cancelled(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backend with submission tokens (as Globus' submission ids): the submission timed out after
    the service started the task, so the batch stays journaled with its token. The job is re-run,
    held and released before it is sent again; the service answers the token with the task it
    started then (a copy of the first output). That task is cancelled and the item submitted again
    in a new batch: the child reads the parent's second output."""
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")
    answer_tokens_with_their_tasks(module)
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()
            assert '"token": "token-0"' in module.journal_path.read_text()
            (item,) = client.get("/transfers/", params={"job_id": child.id})["results"]
            assert (item["state"], item["task_id"]) == ("pending", "")
            rerun_and_release(client, parent, child, handoff)
            run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
        assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"
        assert any("held again since" in r.getMessage() for r in caplog.records)
    finally:
        module.close()
