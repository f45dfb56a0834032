"""Job, BatchJob and TransferItem states, and the job state machine as data.

The server, the agent and the launchers all validate job transitions with
:func:`validate_transition`, so one table decides what may happen to a job.
"""

from __future__ import annotations

import enum
from typing import Iterable


class JobState(str, enum.Enum):
    created = "CREATED"
    awaiting_parents = "AWAITING_PARENTS"
    ready = "READY"
    staged_in = "STAGED_IN"
    preprocessed = "PREPROCESSED"
    running = "RUNNING"
    run_done = "RUN_DONE"
    run_error = "RUN_ERROR"
    run_timeout = "RUN_TIMEOUT"
    restart_ready = "RESTART_READY"
    postprocessed = "POSTPROCESSED"
    staged_out = "STAGED_OUT"
    finished = "JOB_FINISHED"
    # Balsam 0.7's name for JOB_FINISHED. An alias (same value): ``JobState.job_finished is
    # JobState.finished``, and iterating JobState (state lists, the OpenAPI enum, CLI choices)
    # still yields each state once.
    job_finished = "JOB_FINISHED"
    failed = "FAILED"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: "str | JobState") -> "JobState":
        """Accept the wire value (``"RUN_DONE"``); raise ValueError naming the valid ones."""
        if isinstance(value, JobState):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown job state {value!r} (valid: {valid})") from None


class BatchJobState(str, enum.Enum):
    pending_submission = "pending_submission"
    queued = "queued"
    running = "running"
    finished = "finished"
    submit_failed = "submit_failed"
    pending_deletion = "pending_deletion"

    def __str__(self) -> str:
        return self.value


class BatchJobMode(str, enum.Enum):
    serial = "serial"
    mpi = "mpi"

    def __str__(self) -> str:
        return self.value


# Balsam 0.7 exported the mode enum under this name.
JobMode = BatchJobMode


class TransferDirection(str, enum.Enum):
    stage_in = "in"
    stage_out = "out"

    def __str__(self) -> str:
        return self.value


class TransferItemState(str, enum.Enum):
    awaiting_job = "awaiting_job"
    pending = "pending"
    active = "active"
    inactive = "inactive"
    done = "done"
    error = "error"

    def __str__(self) -> str:
        return self.value


S = JobState

RUNNABLE_STATES: frozenset[JobState] = frozenset({S.preprocessed, S.restart_ready})
DONE_STATES: frozenset[JobState] = frozenset({S.finished, S.failed})
#: States in which the processing agent module runs an app hook.
PROCESSABLE_STATES: frozenset[JobState] = frozenset({S.staged_in, S.run_done, S.run_error, S.run_timeout})
#: Never stored: CREATED is only the "from" side of the first event, STAGED_OUT collapses to JOB_FINISHED.
TRANSIENT_STATES: frozenset[JobState] = frozenset({S.created, S.staged_out})

#: The normal life of a job. FAILED is reachable from every state that is not done (hooks and
#: launchers fail jobs whose app cannot load or whose command line cannot be built).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.created: frozenset({S.awaiting_parents, S.ready, S.staged_in}),
    S.awaiting_parents: frozenset({S.ready, S.staged_in}),
    S.ready: frozenset({S.staged_in}),
    # Balsam 0.7 launchers also run jobs straight from STAGED_IN (as its server accepted).
    # POSTPROCESSED: a skipped run, set by a 0.7 "transfer-only" app's preprocess hook; the server
    # then starts the job's stage-out (or finishes it) as after a run. No launcher lease is involved.
    S.staged_in: frozenset({S.preprocessed, S.running, S.postprocessed}),
    S.preprocessed: frozenset({S.running}),
    S.running: frozenset({S.run_done, S.run_error, S.run_timeout}),
    S.run_done: frozenset({S.postprocessed, S.restart_ready}),
    S.run_error: frozenset({S.restart_ready}),
    S.run_timeout: frozenset({S.restart_ready}),
    S.restart_ready: frozenset({S.running}),
    S.postprocessed: frozenset({S.staged_out, S.finished}),
    S.staged_out: frozenset({S.finished}),
    S.finished: frozenset(),
    S.failed: frozenset(),
}
TRANSITIONS = {
    state: targets | ({S.failed} if state not in DONE_STATES else frozenset())
    for state, targets in TRANSITIONS.items()
}

#: Documented moves a user may force from outside the normal flow: re-run a job
#: (RESTART_READY, e.g. ``balsam job modify -s RESTART_READY``) or give up on it (FAILED).
#: Never out of RUNNING: a live launcher owns that job until it reports or its session expires.
USER_FORCEABLE_TARGETS: frozenset[JobState] = frozenset({S.restart_ready, S.failed})


class InvalidTransition(ValueError):
    """A job state change that the state machine does not allow."""

    def __init__(self, from_state: JobState, to_state: JobState, reason: str = "") -> None:
        self.from_state = from_state
        self.to_state = to_state
        msg = f"job state cannot change from {from_state.value} to {to_state.value}"
        allowed = sorted(t.value for t in allowed_targets(from_state, forced=True))
        msg += f" ({reason})" if reason else f" (allowed: {', '.join(allowed) or 'none'})"
        super().__init__(msg)


def allowed_targets(from_state: JobState, *, forced: bool = True) -> frozenset[JobState]:
    """Every state a job in ``from_state`` may move to; ``forced`` adds the user-forceable moves."""
    targets = TRANSITIONS[from_state]
    if forced and from_state != S.running:
        targets = targets | USER_FORCEABLE_TARGETS
    return targets - {from_state}


def is_valid_transition(from_state: "JobState | str", to_state: "JobState | str", *, forced: bool = True) -> bool:
    from_state, to_state = JobState.parse(from_state), JobState.parse(to_state)
    return from_state == to_state or to_state in allowed_targets(from_state, forced=forced)


#: :func:`validate_transition` as data, built once from the rules above: for ``forced`` False and
#: True, every accepted ``(from, to)`` pair of states with the state to store. The server validates
#: every step of a bulk update (thousands per request); deriving the answer from the sets each
#: time (two parses, set unions) was several times the cost of this lookup.
_STORED_STATE: dict[bool, dict[tuple[JobState, JobState], JobState]] = {
    forced: {
        (from_state, to_state): S.finished if to_state == S.staged_out else to_state
        for from_state in JobState for to_state in JobState
        if to_state != S.created and is_valid_transition(from_state, to_state, forced=forced)
    }
    for forced in (False, True)
}


def validate_transition(from_state: "JobState | str", to_state: "JobState | str", *, forced: bool = True) -> JobState:
    """Return the state to store for a requested change, or raise :class:`InvalidTransition`.

    A change to the same state is a no-op and always valid. STAGED_OUT is stored as JOB_FINISHED.
    ``forced=True`` (the API default) also accepts the user-forceable moves; the agent and the
    launchers pass ``forced=False`` to check their own moves strictly.
    """
    accepted = _STORED_STATE[True if forced else False]
    try:
        # States given as JobState members (the server's own): found as they are. Wire values
        # ("RUN_DONE", which hash apart from the members) and anything else are parsed below.
        stored = accepted.get((from_state, to_state))  # type: ignore[arg-type]
    except TypeError:  # unhashable: JobState.parse names it
        stored = None
    if stored is not None:
        return stored
    from_state, to_state = JobState.parse(from_state), JobState.parse(to_state)
    stored = accepted.get((from_state, to_state))
    if stored is not None:
        return stored
    if to_state == S.created:
        raise InvalidTransition(from_state, to_state, "CREATED is only the state before creation")
    raise InvalidTransition(from_state, to_state)


def states_from(values: Iterable["str | JobState"]) -> set[JobState]:
    return {JobState.parse(v) for v in values}


#: BatchJob lifecycle (the scheduler agent module drives it; the server refuses anything but
#: ``finished`` once a BatchJob is ``pending_deletion``).
BATCH_JOB_TRANSITIONS: dict[BatchJobState, frozenset[BatchJobState]] = {
    BatchJobState.pending_submission: frozenset(
        {BatchJobState.queued, BatchJobState.submit_failed, BatchJobState.pending_deletion, BatchJobState.running, BatchJobState.finished}
    ),
    BatchJobState.queued: frozenset({BatchJobState.running, BatchJobState.finished, BatchJobState.pending_deletion, BatchJobState.submit_failed}),
    # running -> queued: the scheduler requeued the job (Slurm's ``scontrol requeue``, a node
    # failure, a preemption with requeue; PBS's ``qrerun``): it waits in the queue again and runs
    # anew. The agent records each requeue in status_info (``requeue_count``, ``requeue_time``).
    BatchJobState.running: frozenset({BatchJobState.queued, BatchJobState.finished, BatchJobState.pending_deletion}),
    BatchJobState.pending_deletion: frozenset({BatchJobState.finished}),
    BatchJobState.finished: frozenset(),
    BatchJobState.submit_failed: frozenset(),
}
ACTIVE_BATCH_JOB_STATES: frozenset[BatchJobState] = frozenset(
    {BatchJobState.pending_submission, BatchJobState.queued, BatchJobState.running, BatchJobState.pending_deletion}
)
