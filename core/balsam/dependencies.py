"""What a job waiting for its parents (AWAITING_PARENTS) waits for, and what the user can do about it.

One rule, shown the same way by ``balsam job show`` (client) and the dashboard's job page (server):
both import this module, which imports neither side. It follows the server's release check
(Balsam 0.7's): a child goes on once every parent that *still exists* is JOB_FINISHED. A deleted
parent is listed as such but is not waited for (deleting a parent re-checks its children at once);
a FAILED parent keeps its children waiting until it is re-run, or the child is moved on by hand.

Pure: no I/O, no client or server imports. Commands in the advice lines are between backticks
(the CLI prints them as they are, the dashboard renders them as code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from balsam.states import JobState

#: How a parent that does not exist any more is shown in the list of parents and in ``waits_for``.
DELETED = "deleted"


@dataclass(frozen=True)
class ParentWait:
    #: Every parent, by id: ``(id, state)``, the state ``None`` for a deleted parent.
    parents: list[tuple[int, Optional[str]]]
    #: Whether the child is in AWAITING_PARENTS (else ``waits_for`` and ``advice`` are empty).
    waiting: bool
    #: The parents the child waits for: those that still exist and are not JOB_FINISHED, by id.
    waits_for: list[tuple[int, str]]
    #: "25 (FAILED), 26 (RUNNING)", or "none (...)" when nothing is left to wait for.
    waits_for_text: str
    #: What to do about it, one sentence a line (commands between backticks).
    advice: list[str]


def _state_value(state: Any) -> Optional[str]:
    if state is None:
        return None
    return str(getattr(state, "value", state)) or None


def parent_wait(job_id: int, state: Any, parent_ids: Optional[Sequence[int]],
                parent_states: Mapping[int, Any]) -> ParentWait:
    """What job ``job_id`` (in ``state``) waits for, from its ``parent_ids`` and ``parent_states``:
    the state (a :class:`JobState` or its value) of each parent that still exists; a parent id
    missing from it was deleted."""
    ids = sorted(set(parent_ids or ()))
    states = {p: _state_value(parent_states.get(p)) for p in ids}
    parents = [(p, states[p]) for p in ids]
    if _state_value(state) != JobState.awaiting_parents.value:
        return ParentWait(parents, False, [], "", [])
    waits_for = [(p, s) for p, s in parents if s is not None and s != JobState.finished.value]
    deleted = [p for p, s in parents if s is None]
    advice: list[str] = []
    ready = f"`balsam job modify -i {job_id} -s READY`"
    if not waits_for:
        text = "none (every parent that still exists is JOB_FINISHED)"
        advice.append(f"nothing is left to wait for: move it on with {ready}")
    else:
        text = ", ".join(f"{p} ({s})" for p, s in waits_for)
        failed = [p for p, s in waits_for if s == JobState.failed.value]
        if failed:
            rerun = " ".join(f"-i {p}" for p in failed)
            advice.append(
                "a FAILED parent keeps its children waiting (as in Balsam 0.7): re-run it "
                f"(`balsam job modify {rerun} -s RESTART_READY`; this job goes on when every parent that "
                f"still exists is JOB_FINISHED), or move this job on without it ({ready})")
    if deleted:
        gone = ", ".join(str(p) for p in deleted)
        advice.append(f"a deleted parent is not waited for ({gone}): only the parents that still exist must be JOB_FINISHED")
    return ParentWait(parents, True, waits_for, text, advice)
