"""The transfer contract kit's checks of cancelled tasks catch a backend that gets them wrong.

A task its owner or an administrator cancelled outside balsam must not be retried (``failed`` with
``retryable`` False, or ``done`` with ``file_errors_retryable`` False for the files it did not
deliver); one the agent cancelled itself stays retryable. The kit did not look at
``file_errors_retryable`` at all: a backend that left it True for an owner's cancel passed, and the
agent copied the files again, against the owner's will.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pytest

from balsam.states import TransferDirection
from balsam.testing import TransferContract
from balsam.transfer import TaskState, TaskStatus, TransferBackend, TransferFile, TransferLocation, build_backend


class CancellableBackend(TransferBackend):
    """A task runs when it is polled. A cancelled one delivers its first file only, or none; how
    it is reported is set per test in ``outcome``."""

    #: who cancelled ("agent", "owner") -> (deliver the first file?, ``retryable`` of a failed
    #: task, ``file_errors_retryable`` of a done one).
    outcome: Mapping[str, tuple[bool, bool, bool]] = {}

    def __init__(self, options: Any = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        self.tasks: dict[str, list[TransferFile]] = {}
        self.cancelled: dict[str, str] = {}

    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> str:
        task_id = f"t{len(self.tasks)}"
        self.tasks[task_id] = list(files)
        return task_id

    def cancel_task(self, task_id: str) -> None:
        self.cancelled[task_id] = "agent"

    def cancel_as_owner(self, task_id: str) -> None:
        self.cancelled[task_id] = "owner"

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        out = {}
        for task_id in task_ids:
            files = self.tasks[task_id]
            by = self.cancelled.get(task_id)
            deliver_one, retryable, file_errors_retryable = self.outcome[by] if by else (True, True, True)
            delivered = files if by is None else files[:1] if deliver_one else []
            for f in delivered:
                Path(f.dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f.src, f.dest)
            if by is not None and not delivered:
                out[task_id] = TaskStatus(TaskState.failed, f"cancelled by {by}", retryable=retryable)
                continue
            errors = {f.dest: f"not delivered: cancelled by {by}" for f in files if f not in delivered}
            out[task_id] = TaskStatus(TaskState.done, file_errors=errors, file_errors_retryable=file_errors_retryable)
        return out


class Kit(TransferContract):
    backend_class = CancellableBackend
    backend_name = "cancellable"

    def location_url(self, tmp_path: Path) -> str:
        return "local://"

    def cancel_outside_balsam(self, backend: TransferBackend, task_id: str) -> None:
        backend.cancel_as_owner(task_id)  # type: ignore[attr-defined]


def _run(check: str, tmp_path: Path, outcome: Mapping[str, tuple[bool, bool, bool]]) -> None:
    backend = build_backend(CancellableBackend, "cancellable")
    backend.outcome = outcome  # type: ignore[attr-defined]
    getattr(Kit(), check)(backend, TransferLocation.parse("contract", "local://"), tmp_path)


OWNER = "test_a_task_cancelled_outside_balsam_is_not_retried"
AGENT = "test_a_task_the_agent_cancelled_stays_retryable"


@pytest.mark.parametrize("deliver_one", [True, False])
def test_a_backend_that_reports_an_owners_cancel_right_passes(tmp_path: Path, deliver_one: bool) -> None:
    _run(OWNER, tmp_path, {"owner": (deliver_one, False, False)})
    _run(AGENT, tmp_path / "agent", {"agent": (deliver_one, True, True)})


def test_the_kit_catches_an_owners_cancel_whose_undelivered_files_stay_retryable(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="file_errors_retryable False"):
        _run(OWNER, tmp_path, {"owner": (True, False, True)})


def test_the_kit_catches_an_owners_cancel_reported_failed_and_retryable(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="must not be retryable"):
        _run(OWNER, tmp_path, {"owner": (False, True, True)})


def test_the_kit_catches_the_agents_cancel_whose_files_fail_for_good(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="must stay retryable"):
        _run(AGENT, tmp_path, {"agent": (True, True, False)})
    with pytest.raises(AssertionError, match="must stay retryable"):
        _run(AGENT, tmp_path / "failed", {"agent": (False, False, True)})


def test_without_a_way_to_cancel_outside_balsam_the_check_is_skipped(tmp_path: Path) -> None:
    class Plain(Kit):
        cancel_outside_balsam = TransferContract.cancel_outside_balsam

    backend = build_backend(CancellableBackend, "cancellable")
    with pytest.raises(pytest.skip.Exception):
        Plain().test_a_task_cancelled_outside_balsam_is_not_retried(backend, TransferLocation.parse("c", "local://"), tmp_path)


class FinishesFirst(CancellableBackend):
    """Every task delivers all its files before a cancel reaches it."""

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        self.cancelled.clear()
        return super().poll_tasks(task_ids)


@pytest.mark.parametrize("check", [OWNER, AGENT])
def test_a_task_done_before_the_cancel_is_a_skip_not_a_pass(tmp_path: Path, check: str) -> None:
    backend = build_backend(FinishesFirst, "finishes-first")
    with pytest.raises(pytest.skip.Exception, match="delivered every file before the cancel"):
        getattr(Kit(), check)(backend, TransferLocation.parse("contract", "local://"), tmp_path)
