"""SQLAlchemy Core tables of the Balsam service (SQLite and PostgreSQL).

Ids are never reused (AUTOINCREMENT on SQLite): a stale session or job id must not address a
newer row. Rows belong to a user through their site: ``sites.owner_id``. Jobs carry a denormalized
``site_id`` (copied from their app, which cannot move between sites) so that ownership checks
and session acquisition need a single join. Parent links live in ``job_parents`` (indexed both
ways, portable), while ``jobs.parent_ids`` keeps the list for fast reads.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from balsam.states import PROCESSABLE_STATES, RUNNABLE_STATES

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        value = value.astimezone(dt.timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


#: JSON on SQLite, JSONB (containment operators, GIN indexes) on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

#: Ids that grow with every job or event (jobs, their events, parent links and transfer items, and
#: sessions, which any user may create and delete at will) and the columns that refer to them: 64-bit
#: on PostgreSQL (migration 0017). One user could otherwise use up a 32-bit sequence for everyone (a
#: reservation of job ids takes 500,000 at once; a long-lived server's events pass 2**31 too), after
#: which every insert fails. SQLite's ``INTEGER PRIMARY KEY`` is already a 64-bit rowid (and must be
#: spelled INTEGER to be one, as AUTOINCREMENT requires), so the columns stay INTEGER there.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(256), nullable=False, unique=True),
    sa.Column("hashed_password", sa.String(512), nullable=True),
    sa.Column("date_joined", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)

sites = sa.Table(
    "sites",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("globus_endpoint_id", sa.Text, nullable=True),
    sa.Column("backfill_windows", JSONType, nullable=False),
    sa.Column("queued_jobs", JSONType, nullable=False),
    sa.Column("optional_batch_job_params", JSONType, nullable=False),
    sa.Column("allowed_projects", JSONType, nullable=False),
    sa.Column("allowed_queues", JSONType, nullable=False),
    sa.Column("transfer_locations", JSONType, nullable=False),
    sa.Column("last_refresh", UTCDateTime, nullable=False),
    sa.Column("creation_date", UTCDateTime, nullable=False),
    sa.UniqueConstraint("owner_id", "name", name="uq_sites_owner_id_name"),
    sqlite_autoincrement=True,
)

apps = sa.Table(
    "apps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("serialized_class", sa.Text, nullable=False),
    sa.Column("source_code", sa.Text, nullable=False),
    sa.Column("parameters", JSONType, nullable=False),
    sa.Column("transfers", JSONType, nullable=False),
    sa.UniqueConstraint("site_id", "name", name="uq_apps_site_id_name"),
    sqlite_autoincrement=True,
)

batch_jobs = sa.Table(
    "batch_jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=False, index=True),
    # 64-bit: PBS sequence numbers may be configured past 2**31.
    sa.Column("scheduler_id", sa.BigInteger, nullable=True, index=True),
    sa.Column("project", sa.Text, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("optional_params", JSONType, nullable=False),
    sa.Column("num_nodes", sa.Integer, nullable=False),
    sa.Column("wall_time_min", sa.Integer, nullable=False),
    sa.Column("job_mode", sa.String(16), nullable=False),
    sa.Column("partitions", JSONType, nullable=True),
    sa.Column("filter_tags", JSONType, nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("status_info", JSONType, nullable=False),
    sa.Column("start_time", UTCDateTime, nullable=True),
    sa.Column("end_time", UTCDateTime, nullable=True),
    sqlite_autoincrement=True,
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column(
        "batch_job_id", sa.Integer, sa.ForeignKey("batch_jobs.id", ondelete="SET NULL"), nullable=True, index=True
    ),
    sa.Column("heartbeat", UTCDateTime, nullable=False, index=True),
    # Set when a sweep restarted the expiry clock after a server start or outage, cleared by the
    # next heartbeat: a clock is restarted at most once in between (sessions_logic, "Clock restarts").
    sa.Column("clock_restarted", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sqlite_autoincrement=True,
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    # Copied from the app (no foreign key: jobs already cascade through apps.site_id, and a second
    # per-row FK check costs bulk inserts ~10%).
    sa.Column("site_id", sa.Integer, nullable=False),
    # On PostgreSQL this reference, and those of log_events, job_parents and transfer_items to
    # jobs, are checked and cascaded by statement triggers instead of foreign keys (migration
    # 0007: a row-by-row check was a third of a bulk insert); SQLite keeps the foreign keys.
    sa.Column("app_id", sa.Integer, sa.ForeignKey("apps.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("session_id", BigId, sa.ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True),
    sa.Column("batch_job_id", sa.Integer, sa.ForeignKey("batch_jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("workdir", sa.Text, nullable=False),
    sa.Column("tags", JSONType, nullable=False),
    sa.Column("serialized_parameters", sa.Text, nullable=False),
    # json, not jsonb, on PostgreSQL (migration 0021): jsonb sorts an object's keys, and a job's data
    # comes back as it was sent (as on SQLite and in Balsam 0.7); nothing queries it with jsonb operators.
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("return_code", sa.Integer, nullable=True),
    sa.Column("num_nodes", sa.Integer, nullable=False),
    sa.Column("ranks_per_node", sa.Integer, nullable=False),
    sa.Column("threads_per_rank", sa.Integer, nullable=False),
    sa.Column("threads_per_core", sa.Integer, nullable=False),
    sa.Column("launch_params", JSONType, nullable=False),
    sa.Column("gpus_per_rank", sa.Float, nullable=False),
    sa.Column("node_packing_count", sa.Integer, nullable=False),
    sa.Column("wall_time_min", sa.Integer, nullable=False),
    sa.Column("parent_ids", JSONType, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("pending_file_cleanup", sa.Boolean, nullable=False),
    sa.Column("serialized_return_value", sa.Text, nullable=False),
    sa.Column("serialized_exception", sa.Text, nullable=False),
    sa.Column("last_update", UTCDateTime, nullable=False),
    # Set when a user's move ended a session's lease on the job (a re-queue or a failure of a job the
    # session's launcher may be running): the session that held it. Acquires skip the job until that
    # session's heartbeats show the old run stopped, or the session ends (migration 0018;
    # sessions_logic, "Re-queued while running"). ``released_tick_seen``: a heartbeat of that session
    # has come since the release.
    sa.Column("released_from_session_id", BigId, nullable=True),
    sa.Column("released_tick_seen", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    # Every job query is scoped to the owner's sites, so (site_id, state) serves state filters; with
    # id last, a page of a state (plus any other filter) is read in id order, a few rows per match
    # (migration 0005; SQLite indexes end with the rowid anyway).
    sa.Index("ix_jobs_site_id_state_id", "site_id", "state", "id"),
    # A site's jobs newest first (the dashboard's keyset pages) without reading other sites' jobs.
    sa.Index("ix_jobs_site_id_id", "site_id", "id"),
    # Polls for the jobs changed since a time (``last_update_after``) and listings of the jobs
    # changed last (``-last_update``, ties by id) read only their rows, not every job (0025).
    sa.Index("ix_jobs_last_update_id", "last_update", "id"),
    # Most jobs are in no session and no BatchJob: partial indexes cost their insert nothing and
    # still serve every lookup by a session or BatchJob (migration 0006).
    *[sa.Index(f"ix_jobs_{name}", name, postgresql_where=sa.text(f"{name} IS NOT NULL"),
               sqlite_where=sa.text(f"{name} IS NOT NULL"))
      for name in ("session_id", "batch_job_id", "released_from_session_id")],
    sa.Index("ix_jobs_tags_gin", "tags", postgresql_using="gin", postgresql_ops={"tags": "jsonb_path_ops"}).ddl_if(
        dialect="postgresql"
    ),
    sqlite_autoincrement=True,
)


def _leasable(states: "tuple[str, ...]") -> str:
    # Held by no session, and not taken by its user from a session that may still run it (migration
    # 0018; sessions_logic, "Re-queued while running").
    return "session_id IS NULL AND released_from_session_id IS NULL AND state IN ({})".format(
        ", ".join(f"'{state}'" for state in states))


# What a launcher leases by default and what the site agent's processing module leases, sorted.
_RUNNABLE = tuple(sorted(state.value for state in RUNNABLE_STATES))
_PROCESSABLE = tuple(sorted(state.value for state in PROCESSABLE_STATES))
#: The jobs an acquire of those states may lease, as the predicates of the partial indexes below,
#: which the acquire repeats word for word: SQLite uses a partial index only for a query whose
#: WHERE contains the index's terms exactly (the same literals in the same order; a bound
#: parameter never matches). Keyed by the set of states asked for.
LEASABLE_PREDICATES: dict[frozenset[str], str] = {
    frozenset(_RUNNABLE): _leasable(_RUNNABLE),
    frozenset(_PROCESSABLE): _leasable(_PROCESSABLE),
}
#: The orders of mpi mode's acquire (``max_aggregate_nodes``: jobs packed first-fit in this order),
#: by ``sort_by``: small jobs first (the default), or long and large first.
RUNNABLE_ORDERS: dict[Any, tuple[sa.ColumnElement[Any], ...]] = {
    None: (jobs.c.num_nodes.asc(), jobs.c.node_packing_count.desc(), jobs.c.wall_time_min.desc(), jobs.c.id.asc()),
    "long_large_first": (jobs.c.wall_time_min.desc(), jobs.c.num_nodes.desc(), jobs.c.node_packing_count.desc(),
                         jobs.c.id.asc()),
}
# Migration 0010: the jobs each acquire may lease, in the order it takes them, so that an acquire
# reads the first entries of one index. Without them an acquire either sorted every leasable job
# of the site (mpi mode's packing order: 78 ms at 10^6 jobs on SQLite) or read the table in id
# order past every job that was not leasable (a campaign's new jobs after its finished ones: 283 ms
# for serial mode's acquire and 376 ms for the processing module's at 10^6 jobs on SQLite). Only
# leasable jobs are in them: a job enters when it reaches one of those states (a new job, STAGED_IN,
# enters the processing module's) and leaves when it is leased (or marked as taken from a session
# that may still run it: migration 0018, whose predicates these are); other state changes cost nothing.
_ACQUIRE_INDEXES = (
    ("ix_jobs_runnable_by_id", _RUNNABLE, (jobs.c.id,)),
    ("ix_jobs_runnable_small_first", _RUNNABLE, RUNNABLE_ORDERS[None]),
    ("ix_jobs_runnable_long_large_first", _RUNNABLE, RUNNABLE_ORDERS["long_large_first"]),
    ("ix_jobs_processable_by_id", _PROCESSABLE, (jobs.c.id,)),
)
for _name, _states, _order in _ACQUIRE_INDEXES:
    sa.Index(_name, jobs.c.site_id, *_order, sqlite_where=sa.text(_leasable(_states)),
             postgresql_where=sa.text(_leasable(_states)))
del _name, _states, _order

#: The finished jobs whose files the site agent's file cleaner has yet to delete, as the predicate
#: of ``ix_jobs_cleanup`` (migration 0015), per dialect; the cleaner's listing (``state=JOB_FINISHED
#: & pending_file_cleanup=true``) repeats it word for word (jobs_logic.apply_job_filters). The state
#: is in it because every new job is created with ``pending_file_cleanup`` set. Without it the
#: listing read every finished job of the site (10^6 jobs: 130 ms to count and 199 ms for a page on
#: PostgreSQL, 190 ms on SQLite). SQLite's is written ``+state``: a query must contain the index's
#: terms as they are, and a plain ``state = 'JOB_FINISHED'`` there is also a term of the (site_id,
#: state, id) index, which SQLite's planner, without statistics, prefers (it would read every finished
#: job of the site again); ``+state`` is a term of no index. PostgreSQL has no unary plus for text and
#: needs none: it proves a partial index's predicate from the query's conditions, however written.
CLEANUP_PREDICATES: dict[str, str] = {
    "postgresql": "state = 'JOB_FINISHED' AND pending_file_cleanup",
    "sqlite": "+state = 'JOB_FINISHED' AND pending_file_cleanup",
}
sa.Index("ix_jobs_cleanup", jobs.c.site_id, jobs.c.id, sqlite_where=sa.text(CLEANUP_PREDICATES["sqlite"]),
         postgresql_where=sa.text(CLEANUP_PREDICATES["postgresql"]))

job_parents = sa.Table(
    "job_parents",
    metadata,
    sa.Column("child_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("parent_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Index("ix_job_parents_parent_id", "parent_id"),
)

transfer_items = sa.Table(
    "transfer_items",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("direction", sa.String(8), nullable=False),
    sa.Column("local_path", sa.Text, nullable=False),
    sa.Column("remote_path", sa.Text, nullable=False),
    sa.Column("location_alias", sa.Text, nullable=False),
    sa.Column("recursive", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("task_id", sa.Text, nullable=False),
    sa.Column("transfer_info", JSONType, nullable=False),
    sqlite_autoincrement=True,
)

log_events = sa.Table(
    "log_events",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("job_id", BigId, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("timestamp", UTCDateTime, nullable=False, index=True),
    sa.Column("from_state", sa.String(32), nullable=False),
    sa.Column("to_state", sa.String(32), nullable=False),
    sa.Column("data", JSONType, nullable=False),
    # A state's events in the listings' order (timestamp, then id), newest first: ``balsam analytics``
    # filters by ``to_state`` (migration 0015); without it such a listing read every event (3*10^6
    # events: 140 ms for a page, 101 ms to count).
    sa.Index("ix_log_events_to_state_timestamp", "to_state", "timestamp", "id"),
    sqlite_autoincrement=True,
)

#: Answers to requests that carried an ``Idempotency-Key`` header (creates, updates, deletes; see
#: idempotency.py): a retry of the same request is answered from here instead of being applied
#: again. The row is written in the same transaction as the change, so a crash cannot separate them.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    #: sha256 of method, path, query and body: the same key on a different request is refused.
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    #: what the request made (``jobs``, ``site``, ``app``, ``batch_job``, ``session``, ``acquire``)
    #: and the ids, from which the answer is rebuilt; ``answer`` for an update or delete.
    sa.Column("resource", sa.String(32), nullable=False),
    sa.Column("resource_ids", JSONType, nullable=False),
    sa.Column("created", UTCDateTime, nullable=False),
    sa.Column("expires", UTCDateTime, nullable=False, index=True),
    #: The answer of an update or delete (PUT, PATCH, DELETE), replayed as it was sent: its body
    #: and media type (NULL for a body-less 204, and for creates, whose answer is rebuilt from the ids).
    sa.Column("answer", sa.LargeBinary, nullable=True),
    sa.Column("answer_type", sa.String(128), nullable=True),
    #: The headers of that answer other than its content type and length, as ``[[name, value], ...]``
    #: (a query delete's ``Balsam-Skipped-Running``), replayed with it; NULL when it had none, and
    #: in records written before migration 0022 (replayed without headers, as they were then).
    sa.Column("answer_headers", sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql"),
              nullable=True),
    #: The scope of the credential that made the request (migration 0024): ``all`` (the user's own:
    #: every site of theirs) or ``site:<id>`` (a launcher's); replayed only to a credential whose scope
    #: holds it. NULL in records written before (idempotency.IdempotentRequest._legacy_within_scope).
    sa.Column("scope", sa.String(32), nullable=True),
    # A user's reserved keys not taken yet (``POST /jobs/reservations``, whose budget counts them:
    # idempotency.reserved_budget_use; migration 0017), without reading the user's other keys.
    sa.Index("ix_idempotency_keys_reserved", "user_id", "expires",
             postgresql_where=sa.text("request_hash = ''"), sqlite_where=sa.text("request_hash = ''")),
)

#: Nonces of the dashboard's one-time login links that have been used (dashboard/session.py
#: redeem_ticket): inserting one a second time does nothing, so a link logs in once, whichever
#: server process opens it. A row is needed only while its ticket is unexpired (two minutes): later
#: redemptions delete the expired ones.
dashboard_tickets = sa.Table(
    "dashboard_tickets",
    metadata,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("expires", UTCDateTime, nullable=False, index=True),
)

# Job counts per (app, state), kept by database triggers on ``jobs`` (migration 0003) so that the
# counts by state of a site or of all a user's sites cost a few rows at any number of jobs (the
# dashboard, ``balsam server status``). SQLite: row triggers update ``job_counts`` directly (writers
# are serialized there anyway). PostgreSQL: statement triggers append grouped changes to
# ``job_count_deltas`` (no row is updated by two writers, so no lock waits and no deadlocks between
# concurrent bulk updates), and the server's background sweep folds them into ``job_counts``;
# readers add both. See balsam.server.job_counts.
job_counts = sa.Table(
    "job_counts",
    metadata,
    sa.Column("app_id", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(32), primary_key=True),
    sa.Column("site_id", sa.Integer, nullable=False, index=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)

job_count_deltas = sa.Table(
    "job_count_deltas",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("site_id", sa.Integer, nullable=False),
    sa.Column("app_id", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
)


# Job counts per (app, tag key, tag value, state), kept like job_counts by triggers on ``jobs``
# (migration 0005): the count of a listing filtered by one tag costs a few rows at any number of
# jobs. See balsam.server.job_counts.
job_tag_counts = sa.Table(
    "job_tag_counts",
    metadata,
    sa.Column("app_id", sa.Integer, primary_key=True),
    sa.Column("tag_key", sa.Text, primary_key=True),
    sa.Column("tag_value", sa.Text, primary_key=True),
    sa.Column("state", sa.String(32), primary_key=True),
    sa.Column("site_id", sa.Integer, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Index("ix_job_tag_counts_tag_key", "tag_key", "tag_value"),
)

job_tag_count_deltas = sa.Table(
    "job_tag_count_deltas",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("site_id", sa.Integer, nullable=False),
    sa.Column("app_id", sa.Integer, nullable=False),
    sa.Column("tag_key", sa.Text, nullable=False),
    sa.Column("tag_value", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
)

#: Every token the server hands out belongs to one row here, so that any of them can be revoked.
#: ``kind``: ``login`` (a plain password login: the token itself, 0.7 style), ``refresh`` (a
#: long-lived secret exchanged for short access tokens; its expiry slides at each use),
#: ``launcher`` (minted by the site agent for one BatchJob, good only for its site, renewed while
#: the BatchJob lives) and ``invitation`` (a one-time code that sets a new user's password).
#: ``secret_hash`` is the SHA-256 of the secret part of refresh and invitation codes (never the
#: secret itself). Deleting a site or a BatchJob deletes its credentials.
credentials = sa.Table(
    "credentials",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=True, index=True),
    sa.Column(
        "batch_job_id", sa.Integer, sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), nullable=True, index=True
    ),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=True),
    sa.Column("created", UTCDateTime, nullable=False),
    sa.Column("expires", UTCDateTime, nullable=False),
    sa.Column("last_used", UTCDateTime, nullable=True),
    sa.Column("revoked", UTCDateTime, nullable=True),
    sqlite_autoincrement=True,
)
