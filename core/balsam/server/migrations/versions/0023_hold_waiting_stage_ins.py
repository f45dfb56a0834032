"""The stage-in of a job waiting for its parents (AWAITING_PARENTS) is held (``awaiting_job``) until
the job leaves the wait (jobs_logic._start_stage_ins); it was ``pending`` from the job's creation,
so the site agent copied a DAG child's inputs before its parents had made them (the stale file an
earlier run had left at the location, or none: the child failed while it waited).

The jobs waiting when this runs are made to look as if created after the change: their stage-in
items not ``awaiting_job`` become ``awaiting_job``, task id cleared, as the server holds a re-run's
(jobs_logic._hold_stage_ins): ``pending`` ones, ``done`` ones (copied before the parents ran, so
possibly stale: copied again once they finish) and those in flight (``active``, ``inactive``:
their task copies the same stale file; the site agent cancels a task no item is left on). The tries
of the earlier copies and the task's clock are removed from ``transfer_info`` (the keys the server
removes: ``attempts``, ``error``, ``retry_after``, ``reason``, ``dest``, ``submitted``, ``queued``,
``started``, ``task``). Those it finds ``pending``, ``active`` or ``inactive`` (what the site agent
may have submitted without its record: a task id in its journal) get ``transfer_info.holds`` one up,
as the server counts a re-run's hold (jobs_logic._held_transfer_info): an agent restarted after the
upgrade then submits them again rather than re-attach them to a journaled task from before the
hold. One UPDATE.

The downgrade makes every ``awaiting_job`` stage-in item ``pending`` again: the code before this
revision never starts a held stage-in, so a job released with one would stay READY for ever.

Revision ID: 0023_hold_waiting_stage_ins
Revises: 0022_idempotent_answer_headers
Create Date: 2026-12-05
"""

from alembic import op

revision = '0023_hold_waiting_stage_ins'
down_revision = '0022_idempotent_answer_headers'
branch_labels = None
depends_on = None

#: jobs_logic._TRY_INFO_KEYS and _TASK_INFO_KEYS (copied: a migration keeps what it did when written).
_TRY_KEYS = ("attempts", "error", "retry_after", "reason", "dest", "submitted", "queued", "started", "task")


#: jobs_logic._SUBMITTABLE: the states whose hold is counted.
_COUNTED = ("pending", "active", "inactive")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        fresh = "transfer_info - ARRAY[" + ", ".join(f"'{k}'" for k in _TRY_KEYS) + "]"
        counted = f"jsonb_set({fresh}, '{{holds}}', to_jsonb(COALESCE((transfer_info->>'holds')::int, 0) + 1))"
    else:
        fresh = "json_remove(transfer_info, " + ", ".join(f"'$.{k}'" for k in _TRY_KEYS) + ")"
        counted = f"json_set({fresh}, '$.holds', COALESCE(json_extract(transfer_info, '$.holds'), 0) + 1)"
    states = ", ".join(f"'{s}'" for s in _COUNTED)
    op.execute(
        "UPDATE transfer_items SET state = 'awaiting_job', task_id = '', "
        f"transfer_info = CASE WHEN state IN ({states}) THEN {counted} ELSE {fresh} END "
        "WHERE direction = 'in' AND state != 'awaiting_job' "
        "AND job_id IN (SELECT id FROM jobs WHERE state = 'AWAITING_PARENTS')"
    )


def downgrade() -> None:
    op.execute("UPDATE transfer_items SET state = 'pending' WHERE direction = 'in' AND state = 'awaiting_job'")
