"""Every transition of the job state machine, allowed and refused (written out, not derived)."""

from __future__ import annotations

import itertools

import pytest

from balsam.states import (
    BATCH_JOB_TRANSITIONS,
    BatchJobState,
    InvalidTransition,
    JobState,
    allowed_targets,
    is_valid_transition,
    validate_transition,
)

S = JobState

# The normal life of a job (inventory §3), FAILED reachable from every state that is not done.
STRICT = {
    S.created: {S.awaiting_parents, S.ready, S.staged_in, S.failed},
    S.awaiting_parents: {S.ready, S.staged_in, S.failed},
    S.ready: {S.staged_in, S.failed},
    # RUNNING: Balsam 0.7 launchers do it; POSTPROCESSED: a preprocess hook skipping the run (0.7's
    # "transfer-only" apps), then stage-out as after a run.
    S.staged_in: {S.preprocessed, S.running, S.postprocessed, S.failed},
    S.preprocessed: {S.running, S.failed},
    S.running: {S.run_done, S.run_error, S.run_timeout, S.failed},
    S.run_done: {S.postprocessed, S.restart_ready, S.failed},
    S.run_error: {S.restart_ready, S.failed},
    S.run_timeout: {S.restart_ready, S.failed},
    S.restart_ready: {S.running, S.failed},
    S.postprocessed: {S.staged_out, S.finished, S.failed},
    S.staged_out: {S.finished, S.failed},
    S.finished: set(),
    S.failed: set(),
}
# A user may force RESTART_READY or FAILED from anywhere except RUNNING.
FORCED = {state: (targets | ({S.restart_ready, S.failed} if state != S.running else set())) - {state}
          for state, targets in STRICT.items()}

ALL_PAIRS = list(itertools.product(JobState, JobState))


def test_the_table_covers_every_state():
    assert set(STRICT) == set(JobState)


@pytest.mark.parametrize("src, dst", ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
def test_strict_transition(src, dst):
    expected = dst == src or dst in STRICT[src]
    assert is_valid_transition(src, dst, forced=False) is expected
    if dst == S.created:  # never stored, even as a no-op
        with pytest.raises(InvalidTransition, match="CREATED is only the state before creation"):
            validate_transition(src, dst, forced=False)
    elif expected:
        stored = validate_transition(src, dst, forced=False)
        assert stored == (S.finished if dst == S.staged_out else dst)
    else:
        with pytest.raises(InvalidTransition) as info:
            validate_transition(src, dst, forced=False)
        message = str(info.value)
        assert message.startswith(f"job state cannot change from {src.value} to {dst.value}")
        assert info.value.from_state == src and info.value.to_state == dst


@pytest.mark.parametrize("src, dst", ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
def test_forced_transition(src, dst):
    allowed = dst == src or dst in FORCED[src]
    assert is_valid_transition(src, dst, forced=True) is allowed
    if dst == S.created:
        with pytest.raises(InvalidTransition):
            validate_transition(src, dst)
    elif allowed:
        validate_transition(src, dst)
    else:
        with pytest.raises(InvalidTransition, match="allowed: "):
            validate_transition(src, dst)


def test_allowed_targets_match_the_tables():
    for state in JobState:
        assert allowed_targets(state, forced=False) == frozenset(STRICT[state] - {state})
        assert allowed_targets(state, forced=True) == frozenset(FORCED[state])


def test_refusal_lists_the_allowed_targets():
    with pytest.raises(InvalidTransition) as info:
        validate_transition("RUNNING", "READY")
    assert str(info.value) == (
        "job state cannot change from RUNNING to READY (allowed: FAILED, RUN_DONE, RUN_ERROR, RUN_TIMEOUT)"
    )


def test_a_preprocess_may_skip_the_run_to_postprocessed_as_in_07():
    # Strict: the processing module sends it under its lease; stored as is (the server then
    # starts the job's stage-out, or finishes it).
    assert validate_transition("STAGED_IN", "POSTPROCESSED", forced=False) == S.postprocessed
    from balsam.site.hooks_runner import check_hook_state

    assert check_hook_state(S.staged_in, "POSTPROCESSED") is None
    # The refusal message still names what a preprocess normally sets.
    assert check_hook_state(S.staged_in, "RUN_DONE") == "preprocess set RUN_DONE: it must set PREPROCESSED or FAILED"


def test_job_finished_alias_is_the_same_state():
    assert S.job_finished is S.finished
    assert validate_transition("POSTPROCESSED", S.job_finished, forced=False) is S.finished
    assert list(JobState).count(S.finished) == 1 and len(list(JobState)) == 14


def test_wire_values_parse_and_unknown_states_are_named():
    assert validate_transition("RUN_DONE", "POSTPROCESSED", forced=False) == S.postprocessed
    with pytest.raises(ValueError, match="unknown job state 'DONE' \\(valid: CREATED, "):
        validate_transition("RUN_DONE", "DONE")


def test_batch_job_lifecycle():
    B = BatchJobState
    assert BATCH_JOB_TRANSITIONS[B.finished] == frozenset()
    assert BATCH_JOB_TRANSITIONS[B.submit_failed] == frozenset()
    assert BATCH_JOB_TRANSITIONS[B.pending_deletion] == frozenset({B.finished})
    # queued again: the scheduler requeued it (scontrol requeue, a node failure, preemption).
    assert BATCH_JOB_TRANSITIONS[B.running] == frozenset({B.finished, B.pending_deletion, B.queued})
    assert B.queued in BATCH_JOB_TRANSITIONS[B.pending_submission]
    assert B.submit_failed in BATCH_JOB_TRANSITIONS[B.pending_submission]
    assert set(BATCH_JOB_TRANSITIONS) == set(BatchJobState)
