"""Launcher sessions: creation, heartbeat, race-free job acquisition and the expiry sweep.

Race freedom: on PostgreSQL the candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` so
concurrent acquirers skip each other's rows; on SQLite every write transaction starts with
``BEGIN IMMEDIATE``, so acquisitions are serialized. Either way a job is leased (``session_id``
set) inside the same transaction that selected it with ``session_id IS NULL``.

A lost answer (the connection dropped, a proxy answered 502 after the server committed): the
acquire carries an ``Idempotency-Key``, and the ids it leased are recorded under that key in the
same transaction as the lease (see idempotency.py). A retry with the key gets :func:`reacquire`:
the recorded jobs that are *still leased to this session*. This returns each job to the launcher
exactly once, with no window for a race:

- the record and the lease commit together, so a retry either finds both (replay) or neither (the
  original rolled back, and the retry is a fresh acquire);
- a job in the record was leased by this session and by no other request of it: a launcher sends
  its next acquire only once the pending one is answered (the client's JobLease keeps resending
  the pending key until it is), so the replayed jobs were never handed to the launcher before;
- a job that left the session meanwhile (the session expired and the sweep freed it, or a user
  forced its state, which clears ``session_id``) is not in the replay: the filter
  ``session_id = this session`` runs inside the retry's write transaction, so it cannot both be
  freed (and perhaps leased elsewhere) and replayed here;
- a retry running while the original is still in flight waits for it on the key's unique index
  (PostgreSQL) or on the write lock (SQLite), as every idempotent create does;
- the replay heartbeats the session as every acquire does: the launcher counts its answer as a
  heartbeat sent when it sent the retry (balsam.client.lease), and the session must not expire
  earlier than it reckons while it starts the replayed jobs.

Releasing at once instead (free the lease when the answer is lost) was rejected: the server cannot
know an answer was lost, and a launcher that did get it would then run jobs it no longer holds.

Lock order (PostgreSQL; SQLite runs one write transaction at a time). Every transaction that
locks more than one kind of row takes them in one order, each kind in id order:
BatchJobs, then credentials, then sessions, then jobs, then a job's transfer items (and other
rows of its own):

- the expiry sweep locks the stale sessions (``FOR UPDATE SKIP LOCKED``: one a request holds is
  left to it), then their RUNNING jobs (:func:`release_session_jobs`), then deletes the sessions.
  Its clock restart after a start or an outage skips locked sessions too. So the sweep never waits
  for a session row, and waits for jobs only while holding sessions. A request's own sweep
  (:func:`maybe_sweep`: create, acquire, tick) runs in a transaction of its own, committed before
  the request's write transaction begins, so it holds no row of the request. Inside the request's
  transaction, first, it left the stale sessions it swept (and their jobs) locked while the request
  then locked its own session with the heartbeat: out of id order, and a BatchJob's finish or
  delete (:func:`end_batch_job_sessions`, which locks the BatchJob's sessions in id order and does
  not skip) holding that session and waiting for a swept one was a deadlock (503). Its own
  transaction also keeps its expiries when the request is then refused (a tick of the session it
  expired: 404, which used to roll the sweep back);
- ``DELETE /sessions/{id}`` locks the session (``get_owned_session(lock=True)``) before its jobs,
  and a finished or deleted BatchJob is locked (``FOR NO KEY UPDATE``, which a lease's key-share
  lock on it does not wait for) before its sessions (``end_batch_job_sessions``), which are locked
  before their jobs. Either used to lock the jobs first and delete the session last, while a sweep
  held the session and waited for those jobs: a deadlock;
- an acquire or a tick locks its session with the heartbeat ``UPDATE`` before leasing jobs (the
  candidates are taken ``SKIP LOCKED``: it never waits for a job) or changing its jobs' marks (a
  tick locks the marked jobs in id order, :func:`note_held`; the end of a session too). The session was read just before
  without a lock, so the heartbeat may find it deleted by the sweep it waited for: that is 404
  (:func:`heartbeat`), the answer a launcher replaces its session on (leasing jobs to the deleted
  session was a foreign-key violation, 409);
- a launcher credential's session create reads its credential ``FOR SHARE`` before any session
  (a revoke's UPDATE of it waits, then ends the new session), after its BatchJob's start_time
  ``UPDATE`` (:func:`note_batch_job_start`); its acquire and tick read it without a lock, after
  the heartbeat locked the session (auth.launcher_credential_problem says why). Any Session
  create holds the BatchJob it names ``FOR SHARE`` right after that ``UPDATE``
  (:func:`hold_batch_job`), and checks its site ``FOR KEY SHARE`` after the credential: a delete of
  either committed meanwhile is then a 404 naming it, not a foreign key violation at the INSERT;
- a BatchJob comes before its credentials everywhere: that create; a launcher credential's create
  for a BatchJob (``POST /auth/credentials`` with ``batch_job_id``, routes/auth.py), which reads
  the BatchJob ``FOR SHARE`` before inserting the credential, so that a finish (``FOR NO KEY
  UPDATE``, which waits for it) revokes the new credential too, or the create waits for the finish
  and refuses (409); a BatchJob's finish or delete (locked, then its credentials revoked); a site's
  delete (routes/sites.py), which locks the site's BatchJobs (id order, ``FOR NO KEY UPDATE``,
  which a lease's key-share lock on one does not wait for) before its credentials ``FOR UPDATE``
  (id order), its sessions (id order, ``FOR UPDATE``), apps and jobs, its cascade then deleting
  the rest. It used to lock the credentials first and reach the BatchJobs in its cascade, last:
  with a create holding the BatchJob and waiting for its credential, a deadlock (503); and it
  reached the sessions in its cascade too,
  after locking their jobs: with a release, tick or session delete (the session, then its jobs)
  or the expiry sweep, a deadlock. A request of a session it holds waits, then finds it gone (404);
  the sweep skips those sessions. A revoke
  alone (``balsam server revoke``, ``DELETE /auth/credentials/{id}``) locks no BatchJob, and its
  credentials before the sessions it ends (auth.revoke_credentials); a BatchJob's finish or delete
  now does too (it ended the sessions first and then revoked the credentials: with a concurrent
  revoke, a deadlock);
- job updates lock their jobs (id order) before anything of theirs; a transfer update locks its
  items' jobs before writing the items (a job's delete locks the job, then its cascade the items);
  a job create reads its parents ``FOR SHARE`` (a parent finishing meanwhile waits for the links,
  then releases the child).

Two transactions that still meet in a cycle (jobs locked in an order a workflow makes, such as
parents finishing in one request while their children's parents finish in another) are ended by
PostgreSQL's deadlock check. That is no outage (app.py): the victim's request is answered 503 with
a short ``Retry-After``, nothing of it applied, and the clients retry it with its Idempotency-Key;
the sessions' expiry clocks are left alone (only a real outage restarts them).

Expiry counts only time the server could have heard a heartbeat. While the server process is down
(a restart, a kill -9) or its database is unreachable, live launchers' heartbeats fail through no
fault of theirs; expiring their sessions on recovery would send their RUNNING jobs to RUN_TIMEOUT and
run them a second time elsewhere while the first run goes on. So the first sweep of a server process
(per database) and the first sweep after a database outage (:func:`note_outage`) first restart the
clock of every stale session (heartbeat = now): a launcher that survived has ``expire_sec`` to
heartbeat again; one that died meanwhile expires ``expire_sec`` later than it would have.

A server process that stood still is such an outage too: stopped (SIGSTOP, a frozen container, a
paused VM, a suspended host) or its wall clock stepped forward (an NTP step). The launchers'
heartbeats wait in its socket backlog meanwhile, and its sweeper, which resumes with them, found
every session older than ``expire_sec`` and expired live launchers (reproduced: a server stopped 5 s
with a 2 s expiry sent the RUNNING jobs of a launcher that heartbeat every 0.4 s to RUN_TIMEOUT). So
a thread of the process notes the wall time twice a second (:class:`_ProcessWatch`), and a sweep
that finds a gap between two notes longer than :func:`stall_limit` restarts the clocks first, as
after an outage. A shorter stand-still is not counted against the sessions either, until the
heartbeats queued meanwhile have been served: a sweep's cutoff is moved back by the stand-stills
that ended less than :func:`stand_still_grace` ago (as long as the stand-still, 5 s at least), the
one going on included (:meth:`_ProcessWatch.stand_still_discount`: the gaps over
:data:`STALL_NOTICE_SEC`, their sum at most :func:`stall_limit`). A plain session could afford a
short stand-still (its tick period is well under ``expire_sec``), but one whose launcher announced
its end has a window of seconds ("A launcher's announced end" below): a stand-still of 13 s expired
a live launcher's (reproduced with SIGSTOP, on SQLite and PostgreSQL), its heartbeat queued in the
backlog losing the race with the sweeps that resumed with it (the one scheduled for its moment, the
periodic one, the request's own, which runs before the request's heartbeat). Once the backlog is
served every session is judged as before: a launcher that died meanwhile expires then. For longer
than that the discount would keep sessions announced after the stand-still beyond their moment,
with no sweep scheduled then. A wall clock stepped back only lets sessions live longer.

Clocks: a heartbeat is written by one server process and compared by the sweep of another (a
server's several workers, or hosts behind one PostgreSQL). Each used its own host's clock: a
sweeping host whose clock ran ``expire_sec`` ahead of the one that wrote a live launcher's heartbeat
expired its session (its RUNNING jobs to RUN_TIMEOUT, run again), and a heartbeat written by a host
whose clock ran ahead kept a dead launcher's session that much longer (reproduced with a second
server whose clock ran 120 s ahead: tests/server/test_srvaudit_session_clocks.py). So on PostgreSQL
every time of the expiry clock is the database's: the heartbeat ``UPDATE`` (:func:`heartbeat`) and
a session's ``INSERT`` write ``clock_timestamp()`` in the statement, and a sweep reads it once
(:func:`clock_now`, after its stand-still check as before) for its cutoff and its clock restarts.
One clock whatever the hosts' skew; a step of the database host's clock acts as a step of a server's
did. The stand-still watch (:class:`_ProcessWatch`) still reads its process's clock: it measures gaps in it.
SQLite is one file on one host, served by processes of that host: they share its clock (``utcnow()``).

Clock restarts: at most one per session between two of its heartbeats. "First sweep of a process"
is per process, and a server runs several worker processes, which a process manager may recycle
(``--max-requests``, a crashed worker) while the others serve: each new one restarted every clock,
and workers recycled more often than ``expire_sec`` kept a dead launcher's session (and its jobs)
forever. The database cannot tell a new worker from a server that was down, so a restart marks the
sessions it restarted (``sessions.clock_restarted``, cleared by a heartbeat) and the next restart
skips the sessions still marked: a launcher that died is expired ``expire_sec`` after the first
restart that followed its last heartbeat, whatever the workers do; a live one heartbeats within its
tick period, which clears the mark, and is covered by the next outage again (two outages within one
tick period count the second one's downtime against it).

Jobs a launcher no longer holds: a user may delete a leased job (``DELETE /jobs/{id}``) or move it
(which ends the lease: ``session_id`` is cleared). The launcher would not know and would run it to
its end. So a heartbeat may carry the ids the launcher runs or has prefetched, and is answered with
those this session no longer holds (:func:`gone_jobs`): one read, ``id IN (the ids) AND session_id =
this session``, the difference taken here. It takes no lock: the answer is what the session held at
that read, and a job no longer held then cannot be held again by this session unless it acquires it
anew. A job that finished meanwhile (its RUN_DONE cleared the lease) is in the answer too; the
launcher ignores a job it no longer runs.

Re-queued while running: the answer above is how a launcher learns that its user moved a job it
runs, so its run goes on until that heartbeat is answered (and the end's grace). A user who fails a
RUNNING job and re-queues it (``FAILED``, then ``RESTART_READY``; RUNNING -> RESTART_READY is
refused), or re-queues a job leased ahead, made it leasable at once: another launcher leased it and
ran it in the same workdir beside the old run. So a user's move to RESTART_READY or FAILED that ends
a lease (``update_jobs``: the job's holder is cleared) of a job the holder may be running (leased
RUNNING, or PREPROCESSED or RESTART_READY: leased ahead, perhaps started with its RUNNING not
reported yet) also sets ``jobs.released_from_session_id`` to the holder, in the same transaction,
and acquires (:func:`candidates`) skip a job with that mark. A move of a RUNNING job to RUN_DONE,
RUN_ERROR or RUN_TIMEOUT without a session marks nothing: that is also how a Balsam 0.7 launcher
reports its own run's end (its updates carry no session), and its jobs' re-runs must not wait. The
mark is cleared by:

- a heartbeat of that session whose ``job_ids`` do not list the job, if an earlier heartbeat of it
  has come since the move (``released_tick_seen``, set by the first heartbeat after the move,
  :func:`note_held`). A launcher lists every job it runs, has queued or holds leased and waiting
  (balsam.launcher.gone), until the job's process has exited; a job it was told is gone stays listed
  until its end (SIGTERM, then SIGKILL after the grace) is over. The first heartbeat after the move
  is not enough: its list may have been read before the launcher took in the answer of the acquire
  that leased the job (the acquiring thread hands the jobs to the loop right after); the next one's
  list is read a heartbeat period later, after that heartbeat was answered (an acquire answer that
  was lost is resent under its key and replays only the jobs still held: never this one). A list of
  the largest size may be one window of a longer one (balsam.client.lease): it clears nothing;
- a heartbeat without ``job_ids`` (``{}``: sent by a launcher that holds nothing, and by clients
  that never ask which jobs they lost, such as the site agent's processing module and Balsam 0.7's
  launcher, whose runs waiting longer would not end) counts as an empty list: the mark is cleared
  at the second heartbeat after the move;
- the session's end: its delete, the expiry sweep, its BatchJob finishing
  (:func:`release_session_jobs`; those clear the marks after their ``UPDATE`` of the session's jobs,
  which waited for any request still moving one of them, so the clearing read sees every mark that
  request left).

A job deleted meanwhile takes its mark with it. So a re-queued job waits for the old run's end: one
heartbeat period for the launcher to be told, the end's grace, and the next heartbeat (two periods
in all when the run ends within one). Why this is race-free: the mark is written in the transaction
that clears the holder, on the job rows ``update_jobs`` locked (PostgreSQL) or under the write lock
(SQLite), so no committed row is ever both free of a holder and free of the mark after such a move; an acquire tests the mark in its write transaction as it tests the holder
(the same predicate, that of its partial index, rechecked on a row's latest version under ``FOR
UPDATE`` on PostgreSQL), and ``SKIP LOCKED`` leaves a row being marked or cleared to the next one. A mark is
changed only by the move that sets it (the job is held then, and no other move can find it held
until an acquire leases it again, which the mark forbids) and by its session's heartbeat or end,
which hold that session's row, one at a time; a new mark made while a heartbeat runs is not seen by
it (the first heartbeat of the session after the move is the one that sees it). The launcher side
of the argument: it stops listing a job only once it no longer runs it, or never ran it (dropped
before its start, or its exit reported and refused); a job it holds is in its list from the moment
the loop takes it from the acquire, so at least one heartbeat lists it whenever it was started.

A launcher's announced end. The batch system SIGKILLs every process of an allocation some time after
its SIGTERM (Slurm's ``KillWait``, PBS's ``kill_delay``), and a launcher killed before it reported its
jobs left them RUNNING until its Session expired (``expire_sec``, 5 minutes: the jobs ran again only
then). So a stopping launcher says at once how long it still needs: a heartbeat whose body has
``ending_in_sec`` N (:func:`parse_tick`) is written, in its transaction, N seconds short of a full
expiry (:func:`end_within`: ``heartbeat`` back-dated by ``expire_sec - N``; never lengthened past a
plain heartbeat), and the server process schedules a sweep for that moment (:func:`schedule_end_sweep`:
the periodic sweep may be a minute away). The launcher repeats it every few seconds while it ends its
jobs and reports them (balsam.client.lease, "An announced end"), so a live launcher keeps its Session,
and a killed one's expires N seconds after its last word: its RUNNING jobs RUN_TIMEOUT ("session
expired") and run again. No new column: the expiry clock is the heartbeat, as for every session. Race
freedom is that of the heartbeat and the sweep: the back-dating is an ``UPDATE`` of the session's row
after :func:`heartbeat` locked it (404 if the sweep deleted it first), and the sweep locks the
sessions it expires (``SKIP LOCKED``) before their jobs, which it re-reads locked: a job the launcher
reported meanwhile (RUN_TIMEOUT, RUN_DONE: its patch clears the holder, under the job's lock) is not
RUNNING any more and is left as it is; a report arriving after the sweep is refused, the job no longer
held by the Session (jobs_logic: a patch under a Session applies only while that Session holds the
job). So every job ends once: by the launcher's report or by the sweep. Other requests of the session
(an acquire's or release's heartbeat) write a full heartbeat again: the launcher sends none once it
announced its end, but one already on its way may land after it, and the launcher's next announcement
(seconds later) shortens the expiry again. A clock restart after an outage gives an ending session a
full ``expire_sec`` like every other (it cannot tell an ending one): its jobs then wait as before. A
shorter stand-still of the server process is not counted against it (see "A server process that
stood still" above: its heartbeats queued meanwhile are served after the sweeps that resume with
them), and the scheduled sweep that wakes late, or while a stand-still is not counted yet, is
pushed back, once (:class:`_EndSweeps`).
A launcher that leaves its ending Session to expire so that the site agent replays its spooled
updates first gives it a plain heartbeat, a full expiry again (balsam.client.lease, ``close``): the
replay finds the jobs still held by it.

A BatchJob's start from its launcher's first Session. A launcher opens its Session once its
allocation runs, so the create of a Session with a ``batch_job_id`` is evidence that the
allocation had started by then: :func:`note_batch_job_start` makes the BatchJob's ``start_time``
no later than that (set when NULL, lowered when later, never raised), in one conditional
``UPDATE`` of the create's transaction. The site agent's start_time is the scheduler's own start
where its poll gives one (earlier: it is kept), else its sighting of the job running, a whole
``scheduler.sync_period`` late or more (an agent that was down; Cobalt reports no start), and the
dashboard and ``balsam.analytics.first_runs_query`` count an allocation's runs from at most
``FIRST_RUN_LOOKBACK`` before start_time. The BatchJob's state is left to the agent: a server-side
queued -> running would be undone by a poll that lags the scheduler (read by the agent as a
requeue), and the state is the scheduler's record, start_time a fact the server saw itself.

The agent's PATCH sets start_time only when its fetched copy has none, so a Session created
between its fetch and its PATCH would be overwritten by the later sighting. So a PATCH (single,
bulk; routes/batch_jobs.py) stores the earlier of the stored and the sent start_time, and a sent
null keeps a stored one. Race-free: the PATCH reads the stored value in the write transaction
that writes it, its rows locked ``FOR NO KEY UPDATE`` on PostgreSQL (SQLite runs one write
transaction at a time); this ``UPDATE`` takes the same row lock, and its condition is
re-evaluated on the row's latest version once a concurrent PATCH committed (READ COMMITTED). Either
commits first and the other reads its value, and both keep the minimum, so the result is the
earliest of the two whatever the order. A PATCH never raises or clears a stored start_time, so a
row this ``UPDATE`` finds with an earlier start (it then takes no lock) cannot become later under
it. Lock order: the create takes the BatchJob first (before its credential ``FOR SHARE`` and any
session or job), as a BatchJob update or delete takes it before its credentials and sessions, and
a site's delete takes its BatchJobs before its credentials. Taken after the credential, it and a
PATCH finishing the BatchJob (holding the BatchJob, then revoking the credential) would each wait
for the other: a deadlock, which PostgreSQL ends with a 503.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import threading
import time
from typing import Any, Callable, NamedTuple

import sqlalchemy as sa

from balsam.models import MAX_JOB_IDS_PER_SESSION_TICK, MAX_JOBS_PER_SESSION_ACQUIRE, SessionAcquire
from balsam.states import BatchJobState, JobState

from .db import id_in, ids_in_param, ids_param, write_tx
from .errors import NotFound, ValidationFailed, first_problems
from .http import INT64_MAX, INT64_MIN, MAX_TAG_FILTERS, check_int_fields, is_json_int, wire_datetime
from .jobs_logic import (
    BATCH_JOB_ENDED_MSG, JOB_OUT_COLUMNS, SESSION_EXPIRED_MSG, job_dicts, json_contains, owned_sites_clause, owner_params, set_states, site_owned_by,
    utcnow,
)
from .tables import LEASABLE_PREDICATES, RUNNABLE_ORDERS, batch_jobs, jobs, sessions, sites

logger = logging.getLogger(__name__)
_last_user_sweep: dict[tuple[int, int], float] = {}
#: Databases (by URL) this process has swept since it started or since its last outage.
_swept_since_outage: set[str] = set()
SORT_BY_CHOICES = (None, "long_large_first")


def session_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "site_id": row.site_id, "batch_job_id": row.batch_job_id, "heartbeat": wire_datetime(row.heartbeat)}


#: Built once (see jobs_logic.owned_sites_clause): every session request reads its session.
_OWNED_SESSION = {
    scoped: sa.select(sessions).join(sites, sites.c.id == sessions.c.site_id)
    .where(sessions.c.id == sa.bindparam("b_session"), owned_sites_clause(scoped))
    for scoped in (False, True)
}
#: The same, locked for a change that ends the session (PostgreSQL; see "Lock order" above).
_OWNED_SESSION_LOCKED = {scoped: stmt.with_for_update(of=sessions) for scoped, stmt in _OWNED_SESSION.items()}
#: A session's heartbeat (every acquire and tick), per dialect: on PostgreSQL the database's clock,
#: read in the statement (see "Clocks" above), which returns it; on SQLite the server's.
HEARTBEAT = {
    "postgresql": sa.update(sessions).where(sessions.c.id == sa.bindparam("b_session"))
    .values(heartbeat=sa.func.clock_timestamp(), clock_restarted=False).returning(sessions.c.heartbeat),
    "sqlite": sa.update(sessions).where(sessions.c.id == sa.bindparam("b_session"))
    .values(heartbeat=sa.bindparam("b_now", type_=sessions.c.heartbeat.type), clock_restarted=False),
}


def session_clock(dialect: str, now: dt.datetime) -> Any:
    """The value a session's heartbeat is written with: on PostgreSQL the database's clock at the
    statement (``clock_timestamp()``), else ``now`` (see "Clocks" above)."""
    return sa.func.clock_timestamp() if dialect == "postgresql" else now


def clock_now(conn: sa.Connection) -> dt.datetime:
    """The time a sweep compares heartbeats with: on PostgreSQL the database's clock (one round
    trip), else this host's (see "Clocks" above)."""
    if conn.dialect.name == "postgresql":
        return conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one().astimezone(dt.timezone.utc)
    return utcnow()


#: Which of the ids ``b_ids`` the session ``b_session`` holds (:func:`gone_jobs`), per dialect.
_HELD = {
    dialect: sa.select(jobs.c.id).where(ids_in_param(jobs.c.id, dialect), jobs.c.session_id == sa.bindparam("b_session"))
    for dialect in ("postgresql", "sqlite")
}


def _session_not_found(session_id: int) -> NotFound:
    return NotFound(f"Session {session_id} not found (it may have expired: no heartbeat for too long)")


def get_owned_session(conn: sa.Connection, user_id: int, session_id: int, *, lock: bool = False) -> sa.Row:
    """The user's session (404 if there is none). ``lock``: locked ``FOR UPDATE`` on PostgreSQL,
    for a request that ends it (its delete): the session before its jobs (see "Lock order")."""
    scoped, params = owner_params(user_id)
    stmt = (_OWNED_SESSION_LOCKED if lock and conn.dialect.name == "postgresql" else _OWNED_SESSION)[scoped]
    row = conn.execute(stmt, {"b_session": session_id, **params}).first()
    if row is None:
        raise _session_not_found(session_id)
    return row


def heartbeat(conn: sa.Connection, session_id: int, now: dt.datetime) -> dt.datetime:
    """Record a heartbeat; the time written (``now``, or on PostgreSQL the database's clock: see
    "Clocks" above); 404 if the session is gone. The session was read just before, without a
    lock: the expiry sweep may hold its row then (on PostgreSQL this UPDATE waits for it) and delete
    it. The UPDATE then changes no row, and the request must stop here: an acquire went on to lease
    jobs to the deleted session (409, a foreign key violation, where the launcher replaces its
    session only on 404) and a tick answered 200 for a session that no longer existed."""
    if conn.dialect.name == "postgresql":
        written = conn.execute(HEARTBEAT["postgresql"], {"b_session": session_id}).scalar()
        if written is None:
            raise _session_not_found(session_id)
        return written
    if not conn.execute(HEARTBEAT["sqlite"], {"b_session": session_id, "b_now": now}).rowcount:
        raise _session_not_found(session_id)
    return now


#: States in which a BatchJob's allocation may be running: a Session of an ended one (only a user
#: token opens one then: its launcher credentials were revoked) says nothing of when it started.
_MAY_RUN = sorted(s.value for s in BatchJobState if s not in (BatchJobState.finished, BatchJobState.submit_failed))


def note_batch_job_start(conn: sa.Connection, user_id: int, site_id: int, batch_job_id: int, now: dt.datetime) -> None:
    """Make BatchJob ``batch_job_id``'s start_time no later than now (see "A BatchJob's start from
    its launcher's first Session" above): one conditional UPDATE, which writes (and locks) the row
    only where start_time is NULL or later. The time is the database's on PostgreSQL (``now()``,
    this transaction's start: before the Session's heartbeat is written, after the launcher sent
    its request), else ``now``, as the Session's own clock (:func:`session_clock`). A BatchJob
    not found here (not the user's, not at ``site_id``) is left to the caller's 404."""
    when = sa.func.now() if conn.dialect.name == "postgresql" else now
    conn.execute(
        sa.update(batch_jobs)
        .where(batch_jobs.c.id == batch_job_id, batch_jobs.c.site_id == site_id,
               batch_jobs.c.site_id.in_(sa.select(sites.c.id).where(site_owned_by(user_id))),
               batch_jobs.c.state.in_(_MAY_RUN),
               sa.or_(batch_jobs.c.start_time.is_(None), batch_jobs.c.start_time > when))
        .values(start_time=when)
    )


def hold_batch_job(conn: sa.Connection, batch_job_id: int, *, user_id: int, site_id: int) -> None:
    """A Session create's hold on the BatchJob its new row refers to: ``FOR SHARE`` (PostgreSQL;
    SQLite runs one write transaction at a time), right after :func:`note_batch_job_start` (the
    BatchJob first in the lock order). The create's check that follows then sees a delete of it
    committed meanwhile (404 naming it, as when it was gone before the request), and its site
    is checked ``FOR KEY SHARE`` after the credential (routes/sessions.py), as the site delete takes
    the credentials before the site row.

    Why: the checks read both unlocked, and a site's or BatchJob's delete that committed between a
    check and the INSERT made the INSERT's foreign key refuse it: answered 409 with PostgreSQL's
    text ("insert or update on table "sessions" violates foreign key constraint ..."), where the
    same request a moment later is a 404 the launcher acts on. ``FOR SHARE``, not the foreign
    key's ``KEY SHARE``: a BatchJob's delete or finish (``FOR NO KEY UPDATE`` first,
    routes/batch_jobs.py) then waits for this create to commit, and its later statements end the
    new Session with the BatchJob's others; under a key-share lock only its final DELETE waited,
    and a Session committed after the delete had ended the BatchJob's sessions outlived it (its
    ``batch_job_id`` set NULL by the delete's cascade)."""
    if conn.dialect.name == "postgresql":
        # Only the user's own BatchJob at ``site_id`` (the one the Session may refer to), as
        # note_batch_job_start: the id comes from the request, and locking another user's row
        # made this create wait for that user's writers (telling their activity, a 404 coming
        # late only for ids that exist) and theirs wait for it.
        conn.execute(sa.select(batch_jobs.c.id).where(
            batch_jobs.c.id == batch_job_id, batch_jobs.c.site_id == site_id,
            batch_jobs.c.site_id.in_(sa.select(sites.c.id).where(site_owned_by(user_id))),
        ).with_for_update(read=True, of=batch_jobs)).all()


def note_outage(engine: sa.Engine) -> None:
    """The database was unreachable: the next sweep restarts the stale sessions' clocks first."""
    _swept_since_outage.discard(str(engine.url))


#: How often the process watch notes the wall time (seconds).
WATCH_PERIOD_SEC = 0.5
#: A gap between two notes of the process watch longer than this is a stand-still not counted against
#: the sessions (the watch sleeps :data:`WATCH_PERIOD_SEC` between them). As :func:`stall_limit`'s
#: floor: thread scheduling on a loaded host; a launcher that announced its end heartbeats every 2 s
#: within a 10 s window (balsam.client.lease), so a shorter stand-still cannot expire it.
STALL_NOTICE_SEC = 2.0
#: How many stand-stills the process watch remembers (their sum is bounded anyway: :meth:`_ProcessWatch.stand_still_discount`).
MAX_STAND_STILLS = 1024
#: The shortest time after a stand-still during which it is not counted against the sessions.
STAND_STILL_GRACE_SEC = 5.0


def stand_still_grace(length: float) -> float:
    """How long after its end a stand-still of ``length`` seconds is not counted against the sessions
    (see the module's docstring): until the heartbeats queued meanwhile have been served. They wait
    in the backlog that long at most, as the server serves faster than they come:
    :data:`STAND_STILL_GRACE_SEC` at least (a launcher's stuck heartbeat comes first in the backlog)."""
    return max(length, STAND_STILL_GRACE_SEC)


def stall_limit(expire_sec: float) -> float:
    """The longest stand-still of a server process (or step of its wall clock) that is not taken for
    an outage: a quarter of the expiry (a launcher heartbeats well within the rest), at least 2 s
    (thread scheduling on a loaded host, and the tests' short expiries)."""
    return max(2.0, expire_sec / 4)


class _ProcessWatch:
    """Whether this process stood still or its wall clock jumped forward (see the module's docstring):
    a daemon thread notes ``time.time()`` every :data:`WATCH_PERIOD_SEC`; a longer gap between two
    notes is time in which the process could not hear heartbeats. Started by the process's first
    sweep (a forked process starts its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: "int | None" = None
        self._last = 0.0  # the latest note
        self._gap = 0.0  # the longest gap between notes since :meth:`take_gap`
        self._stalls = 0  # stand-stills taken for an outage (see :meth:`mark_swept`)
        #: (when it ended on ``time.monotonic()``, how long) of each gap over STALL_NOTICE_SEC (:meth:`_in_force`).
        self._stood: "collections.deque[tuple[float, float]]" = collections.deque(maxlen=MAX_STAND_STILLS)
        # A child forked while another thread held the lock would never get it.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._stood = collections.deque(maxlen=MAX_STAND_STILLS)  # the parent's, not this process's

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_PERIOD_SEC)
            now = time.time()
            with self._lock:
                gap = now - self._last
                self._gap = max(self._gap, gap)
                self._last = now
                if gap > STALL_NOTICE_SEC:
                    self._stood.append((time.monotonic(), gap - WATCH_PERIOD_SEC))

    def _in_force(self, now: float, going_on: float, limit: float) -> "list[tuple[float, float]]":
        """(until when, how long) of the stand-stills whose heartbeats may still wait in the backlog:
        each for :func:`stand_still_grace` after its end; the one ``going_on`` (a sweep or the end
        sweeps' thread may resume before the watch's thread notes it) until that long from now. Those
        over ``limit`` are left out (:meth:`take_gap` restarted the clocks for them). Under the lock."""
        stood = [(ended + stand_still_grace(length), length) for ended, length in self._stood if length <= limit]
        if STALL_NOTICE_SEC < going_on <= limit:
            stood.append((now + stand_still_grace(going_on - WATCH_PERIOD_SEC), going_on - WATCH_PERIOD_SEC))
        return [(until, length) for until, length in stood if until > now]

    def stand_still_discount(self, limit: float) -> float:
        """The seconds a sweep now does not count against the sessions (see the module's docstring):
        the stand-stills still in force (:meth:`_in_force`), their sum at most ``limit``; 0 before
        the watch runs in this process."""
        with self._lock:
            if self._pid != os.getpid():
                return 0.0
            now = time.monotonic()
            return min(sum(length for _until, length in self._in_force(now, time.time() - self._last, limit)), limit)

    def protected_for(self, limit: float) -> float:
        """How much longer a stand-still is in force (0: none is): a sweep scheduled for a moment
        that fell in it comes after that (:class:`_EndSweeps`)."""
        with self._lock:
            if self._pid != os.getpid():
                return 0.0
            now = time.monotonic()
            return max((until - now for until, _length in self._in_force(now, time.time() - self._last, limit)), default=0.0)

    def take_gap(self, limit: float) -> "tuple[float, int]":
        """The longest gap since the previous call, the time since the latest note included (the
        sweep may run before the thread, both resuming from a stop), 0 at the first call; and the
        stand-stills counted so far (for :meth:`mark_swept`). A gap longer than ``limit`` is an
        outage of every database this process serves, and they are counted unswept here, under the
        lock: once the gap is taken, a concurrent sweep finds no gap; had it found the databases
        still swept, it skipped the clock restart and expired every session with the cutoff of
        after the stand-still, live launchers' too."""
        with self._lock:
            now = time.time()
            if self._pid != os.getpid():
                self._pid, self._last, self._gap = os.getpid(), now, 0.0
                threading.Thread(target=self._run, name="balsam-session-watch", daemon=True).start()
                return 0.0, self._stalls
            gap = max(self._gap, now - self._last)
            self._gap = 0.0
            if gap > limit:
                _swept_since_outage.clear()
                self._stalls += 1
            return gap, self._stalls

    def mark_swept(self, database: str, stalls: int) -> None:
        """The clock restart of a sweep that took its gap when ``stalls`` stand-stills were counted
        has committed. Not done if the process stood still since: the restart may have written the
        time of before it (the sweep stopped between its take_gap and its commit)."""
        with self._lock:
            if self._stalls == stalls:
                _swept_since_outage.add(database)


_process_watch = _ProcessWatch()


def sweep_expired(conn: sa.Connection, expire_sec: int, user_id: "int | None" = None) -> int:
    """Delete sessions with a stale heartbeat or a finished BatchJob; RUNNING jobs -> RUN_TIMEOUT."""
    database = str(conn.engine.url)
    limit = stall_limit(expire_sec)
    stood_still, stalls = _process_watch.take_gap(limit)
    # Read after take_gap: a stop between the two would have restarted the clocks at the time of
    # before it. The database's clock on PostgreSQL, which wrote the heartbeats ("Clocks" above).
    now = clock_now(conn)
    # Shorter stand-stills do not count against the sessions (the module's docstring). Read after
    # ``now``: a stop between the two is counted (a session lives longer), never missed.
    cutoff = now - dt.timedelta(seconds=expire_sec + _process_watch.stand_still_discount(limit))
    if stood_still > limit:
        # Heartbeats could not be heard meanwhile (see the module's docstring): take_gap counted it
        # an outage of every database this process serves. Logged only now: the write may block.
        logger.warning("This server process stood still (or its clock jumped) for %.0f s: restarting the "
                       "sessions' expiry clocks", stood_still)
    if database not in _swept_since_outage:
        # The server could not hear heartbeats until now (see the module's docstring): all sessions,
        # but each at most once until it heartbeats again (see "Clock restarts" there).
        stale = sa.select(sessions.c.id).where(sessions.c.heartbeat < now, sessions.c.clock_restarted.is_(False))
        if conn.dialect.name == "postgresql":
            # Never wait for a session's row (see "Lock order"): a locked one is being changed by a
            # request that heartbeats it or ends it, or swept by another worker. The rows stay
            # locked until the commit: no heartbeat comes between this read and the update.
            stale = stale.with_for_update(skip_locked=True, of=sessions)
        ids = list(conn.execute(stale).scalars())
        restarted = conn.execute(sa.update(sessions).where(id_in(sessions.c.id, ids, conn.dialect.name))
                                 .values(heartbeat=now, clock_restarted=True)).rowcount if ids else 0
        # Done once it has committed: a sweep's transaction may be rolled back (it used to be a
        # request's own, which a 404, 401 or 409 rolls back; a deadlock or an outage still can).
        # Counted done at once, the restart rolled back was never done again, and the next sweep
        # expired every session the downtime had made stale, live launchers' too.
        # (A later transaction of the same connection, after a rollback, does not count.)
        # SQLAlchemy fires "commit" just before it sends the COMMIT: a COMMIT that then fails is a
        # database outage, whose note_outage undoes the mark.
        rolled_back: list[bool] = []
        sa.event.listen(conn, "rollback", lambda _conn: rolled_back.append(True), once=True)
        sa.event.listen(conn, "commit", lambda _conn: rolled_back or _process_watch.mark_swept(database, stalls), once=True)
        if restarted:
            logger.info("Restarted the expiry clock of %d session(s) after a server start or outage", restarted)
    ended = sa.func.coalesce(batch_jobs.c.state == BatchJobState.finished.value, False)
    stmt = (
        sa.select(sessions.c.id, ended)
        .select_from(sessions.outerjoin(batch_jobs, batch_jobs.c.id == sessions.c.batch_job_id))
        .where(sa.or_(sessions.c.heartbeat < cutoff, batch_jobs.c.state == BatchJobState.finished.value))
    )
    if user_id is not None:
        stmt = stmt.where(sessions.c.site_id.in_(sa.select(sites.c.id).where(site_owned_by(user_id))))
    if conn.dialect.name == "postgresql":
        # Concurrent sweeps (several workers) must not time out the same jobs twice.
        stmt = stmt.with_for_update(skip_locked=True, of=sessions)
    rows = conn.execute(stmt).all()
    if not rows:
        return 0
    expired = [sid for sid, _ in rows]
    # Said as it is: a session whose BatchJob ended did not expire, its launcher is gone.
    for ended_with_batch_job, message in ((True, BATCH_JOB_ENDED_MSG), (False, SESSION_EXPIRED_MSG)):
        group = [sid for sid, by_end in rows if bool(by_end) is ended_with_batch_job]
        if group:
            release_session_jobs(conn, group, now, message)
    conn.execute(sa.delete(sessions).where(sessions.c.id.in_(expired)))
    logger.info("Swept %d expired session(s): %s", len(expired), expired)
    return len(expired)


def maybe_sweep(engine: sa.Engine, settings: Any, user_id: int) -> int:
    """Sweep the user's stale sessions, at most once per sweep period per process (the
    background task sweeps everyone on the same period); how many expired. In a write transaction
    of its own, committed before the request's (see "Lock order"): run inside the request's, it
    held the stale sessions it swept while the request then locked its own session. Call it
    outside any write transaction (on SQLite a second one would wait for the first)."""
    period = min(settings.session_sweep_sec, settings.session_expire_sec / 2)
    key = (id(settings), user_id)
    now = time.monotonic()
    if now - _last_user_sweep.get(key, 0.0) < period:
        return 0
    with write_tx(engine) as conn:
        expired = sweep_expired(conn, settings.session_expire_sec, user_id)
    _last_user_sweep[key] = now  # once committed: a sweep that failed is tried again by the next request
    return expired


def release_session_jobs(conn: sa.Connection, session_ids: list[int], now: dt.datetime,
                         message: str = SESSION_EXPIRED_MSG) -> None:
    """End the leases of ``session_ids``: their RUNNING jobs become RUN_TIMEOUT (run again) with
    ``message`` in the event, the others leasable again."""
    stmt = sa.select(jobs.c.id).where(jobs.c.session_id.in_(session_ids), jobs.c.state == JobState.running.value)
    if conn.dialect.name == "postgresql":
        # A launcher reporting RUN_DONE at this very moment wins: the locked re-check drops that job.
        stmt = stmt.order_by(jobs.c.id).with_for_update(of=jobs)
    running = conn.execute(stmt).scalars().all()
    if running:
        set_states(
            conn, {jid: (JobState.running.value, JobState.run_timeout) for jid in running}, now,
            {"message": message},
        )
    conn.execute(sa.update(jobs).where(jobs.c.session_id.in_(session_ids)).values(session_id=None))
    # The jobs users took from these sessions may be leased again: the sessions' runs are over or
    # no longer theirs (see "Re-queued while running"). After the UPDATE above, which waited for
    # any request that was moving one of their jobs, so this read sees that move's mark.
    _clear_marks(conn, jobs.c.released_from_session_id.in_(session_ids))


def _clear_marks(conn: sa.Connection, where: sa.ColumnElement[bool]) -> int:
    """Clear the marks of the jobs ``where`` selects among the marked ones (locked in id order on
    PostgreSQL first, as every job update locks its jobs); how many were cleared."""
    dialect = conn.dialect.name
    stmt = sa.select(jobs.c.id).where(where)
    if dialect == "postgresql":
        stmt = stmt.order_by(jobs.c.id).with_for_update(of=jobs)
    ids = list(conn.execute(stmt).scalars())
    if ids:
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, ids, dialect))
                     .values(released_from_session_id=None, released_tick_seen=False))
    return len(ids)


#: The jobs users took from session ``b_session`` (the heartbeat's look at them), per dialect.
_MARKS = {
    "postgresql": sa.select(jobs.c.id, jobs.c.released_tick_seen)
    .where(jobs.c.released_from_session_id == sa.bindparam("b_session")).order_by(jobs.c.id).with_for_update(of=jobs),
    "sqlite": sa.select(jobs.c.id, jobs.c.released_tick_seen).where(jobs.c.released_from_session_id == sa.bindparam("b_session")),
}


def note_held(conn: sa.Connection, session_id: int, job_ids: "list[int] | None") -> int:
    """A heartbeat of ``session_id`` said it holds ``job_ids`` (None: it sent no list): the jobs
    its user took from it and that a heartbeat since has seen, not listed now, are leasable again;
    the others are seen by this one. How many became leasable (see "Re-queued while running").

    One read through the marks' index (nothing when the session has none, the usual case) and at
    most two bulk updates. Called after :func:`heartbeat`, which locked the session."""
    dialect = conn.dialect.name
    marks = conn.execute(_MARKS[dialect], {"b_session": session_id}).all()
    if not marks:
        return 0
    # A full list may be one window of more held ids (balsam.client.lease): a job not in it may
    # still run, so it clears nothing (the session's end does).
    complete = job_ids is None or len(job_ids) < MAX_JOB_IDS_PER_SESSION_TICK
    listed = set(job_ids or ())
    done = [row.id for row in marks if row.released_tick_seen and complete and row.id not in listed]
    seen = [row.id for row in marks if not row.released_tick_seen]
    if done:
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, done, dialect))
                     .values(released_from_session_id=None, released_tick_seen=False))
    if seen:
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, seen, dialect)).values(released_tick_seen=True))
    return len(done)


def parse_tick(payload: Any) -> "list[int] | None":
    """The ``job_ids`` of a heartbeat body (None when it has none: ``{}`` from Balsam 0.7 and from
    clients that do not ask). Other keys are ignored, as the whole body was before."""
    if not isinstance(payload, dict):
        raise ValidationFailed.field(["body"], "expected a JSON object (optionally with job_ids)")
    ids = payload.get("job_ids")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise ValidationFailed.field(["body", "job_ids"], f"expected a list of job ids, got {type(ids).__name__}")
    if len(ids) > MAX_JOB_IDS_PER_SESSION_TICK:
        raise ValidationFailed.field(["body", "job_ids"], f"at most {MAX_JOB_IDS_PER_SESSION_TICK} job ids per "
                                     f"heartbeat, got {len(ids)} (send the others with the next heartbeats)")
    errors = first_problems(((["body", "job_ids", i], f"expected a 64-bit integer job id, got {value!r}"[:200])
                             for i, value in enumerate(ids) if not (is_json_int(value) and INT64_MIN <= value <= INT64_MAX)),
                            ids, ["body", "job_ids"])
    if errors:
        raise ValidationFailed(errors)  # the first listed (the walk stops after them)
    return [int(value) for value in ids]


def gone_jobs(conn: sa.Connection, session_id: int, job_ids: list[int]) -> list[int]:
    """Those of ``job_ids`` that session ``session_id`` does not hold (deleted, moved by their user,
    finished, or never its own), sorted: one query."""
    if not job_ids:
        return []
    dialect = conn.dialect.name
    held = set(conn.execute(_HELD[dialect], {"b_ids": ids_param(sorted(set(job_ids)), dialect),
                                             "b_session": session_id}).scalars())
    return sorted(set(job_ids) - held)


#: The longest ``ending_in_sec`` taken as given (a day); a longer one is refused as a mistake.
MAX_ENDING_IN_SEC = 86400.0


def parse_ending(payload: Any) -> "float | None":
    """The ``ending_in_sec`` of a heartbeat body (None when it has none): a JSON number of seconds,
    0 to :data:`MAX_ENDING_IN_SEC` (see "A launcher's announced end" above). Called after
    :func:`parse_tick`, which checked that the body is an object."""
    if not isinstance(payload, dict) or payload.get("ending_in_sec") is None:
        return None
    value = payload["ending_in_sec"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_ENDING_IN_SEC:
        raise ValidationFailed.field(["body", "ending_in_sec"], f"expected a number of seconds from 0 to "
                                     f"{MAX_ENDING_IN_SEC:g}, got {value!r}"[:200])
    return float(value)


def end_within(conn: sa.Connection, session_id: int, written: dt.datetime, within_sec: float,
               expire_sec: float) -> dt.datetime:
    """Session ``session_id``'s launcher ends within ``within_sec``: its heartbeat, just ``written``
    (:func:`heartbeat`, which locked the row), is back-dated so that the sweep expires it
    ``within_sec`` after ``written``; the heartbeat stored. One ``UPDATE`` (none when ``within_sec``
    is a full expiry or more: never longer than a plain heartbeat)."""
    shift = expire_sec - min(within_sec, expire_sec)
    if shift <= 0:
        return written
    stored = written - dt.timedelta(seconds=shift)
    conn.execute(sa.update(sessions).where(sessions.c.id == session_id).values(heartbeat=stored))
    return stored


class _EndSweeps:
    """Sweeps at the moments announced ends fall due (see "A launcher's announced end" above): one
    daemon thread per server process, started by the first announcement (a forked process starts
    its own). The due times are rounded up to :data:`END_SWEEP_STEP_SEC`, so the heartbeats of many
    launchers ending together (an allocation of many partitions, a whole reservation's end) make at
    most one sweep per step per database, however many sessions fall due in it; a sweep that finds
    nothing due (the launcher announced again, or reported and deleted its Session) costs one read.

    A wake-up later than :data:`END_SWEEP_LATE_SEC` after its moment (the process stood still or was
    starved: the launcher's heartbeats of meanwhile may still wait in the backlog), or one while a
    stand-still is in force (the sweeps do not count it against the sessions until the backlog is
    served: ``_ProcessWatch.stand_still_discount``), does not sweep: the sweep is pushed back, once,
    by the announced window (when late) or until the stand-still is no longer in force, whichever is
    later; a launcher killed meanwhile has its Session expired then. ``clock``, ``protected_for``
    (:meth:`_ProcessWatch.protected_for`) and ``start_thread`` are for the tests, which drive
    :meth:`take_ready` themselves."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, start_thread: bool = True,
                 protected_for: "Callable[[], float] | None" = None) -> None:
        self._clock = clock
        self._start_thread = start_thread
        # No limit: a longer stand-still restarted every clock (a full expiry): a later sweep is as good.
        #: The longest stand-still still discounted (:func:`stall_limit` of the expiry, set by
        #: :func:`schedule_end_sweep`): a longer one is an outage, every clock restarted for it, and
        #: holding the end sweeps back for all of it (a VM paused overnight, a wall-clock step of a
        #: day) left killed launchers' jobs to the periodic sweep for that long.
        self.stall_limit = float("inf")
        self._protected_for = protected_for or (lambda: _process_watch.protected_for(self.stall_limit))
        self._cond = threading.Condition()
        self._pid: "int | None" = None
        #: database URL -> ({due time on ``clock``: (the announced window, pushed back already)}, the sweep).
        self._due: dict[str, tuple[dict[float, tuple[float, bool]], Callable[[], None]]] = {}
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._cond = threading.Condition()
        self._due = {}

    @staticmethod
    def _step(moment: float) -> float:
        step = END_SWEEP_STEP_SEC
        return (int(moment / step) + 1) * step  # rounded up: a sweep never comes before the moment

    def schedule(self, database: str, within_sec: float, sweep: Callable[[], None]) -> None:
        """Sweep ``database`` (``sweep``) ``within_sec`` from now, plus :data:`END_SWEEP_AFTER_SEC`."""
        due = self._step(self._clock() + within_sec + END_SWEEP_AFTER_SEC)
        with self._cond:
            if self._start_thread and self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="balsam-end-sweeps", daemon=True).start()
            times, _ = self._due.get(database, ({}, sweep))
            window, _pushed = times.get(due, (0.0, False))
            times[due] = (max(window, within_sec), False)
            self._due[database] = (times, sweep)
            self._cond.notify()

    def take_ready(self) -> "tuple[list[Callable[[], None]], float | None]":
        """The sweeps due now, late ones pushed back instead (see above); and when the next is due
        (None: none is). Called under no lock; takes the condition's."""
        protected = self._protected_for()  # outside the condition: it takes the watch's lock
        with self._cond:
            now = self._clock()
            ready = []
            for database, (times, sweep) in list(self._due.items()):
                run = False
                for due in sorted(t for t in times if t <= now):
                    window, pushed = times.pop(due)
                    late = now - due > END_SWEEP_LATE_SEC
                    if (late or protected > 0) and not pushed:
                        wait = max(window if late else 0.0, protected)
                        later = self._step(now + wait + END_SWEEP_AFTER_SEC)
                        times[later] = (max(window, times.get(later, (0.0, False))[0]), True)
                        logger.info("The sweep for an announced session end woke %.1f s after its moment (this server "
                                    "process stood still or was starved): pushed back %.1f s", now - due, wait)
                    else:
                        run = True
                if run:
                    ready.append(sweep)
                if not times:
                    del self._due[database]
            nearest = min((min(times) for times, _ in self._due.values()), default=None)
            return ready, nearest

    def _run(self) -> None:
        while True:
            ready, nearest = self.take_ready()
            if not ready:
                with self._cond:
                    # Re-read under the lock: a schedule() between take_ready and here notified no one.
                    nearest = min((min(times) for times, _ in self._due.values()), default=None)
                    self._cond.wait(None if nearest is None else max(0.0, nearest - self._clock()))
                continue
            for sweep in ready:
                try:
                    sweep()
                except Exception as exc:  # the periodic sweep still comes; one line, not a traceback
                    logger.warning("The sweep for an announced session end failed (%s); the periodic sweep "
                                   "expires it", (str(getattr(exc, "orig", exc)).strip().splitlines() or [type(exc).__name__])[0])


#: See :class:`_EndSweeps`.
END_SWEEP_STEP_SEC = 0.5
#: A wake-up of the end sweeps this late after its moment is taken for a stand-still (:class:`_EndSweeps`).
END_SWEEP_LATE_SEC = 1.5
#: How long after its announced moment a session is swept (the database's clock, which wrote the
#: heartbeat, and this process's monotonic clock tick apart: a sweep a hair early finds nothing).
END_SWEEP_AFTER_SEC = 0.25
_end_sweeps = _EndSweeps()


def schedule_end_sweep(engine: sa.Engine, expire_sec: float, within_sec: float,
                       wake: "Callable[[], None] | None" = None) -> None:
    """Sweep the sessions of ``engine``'s database ``within_sec`` from now (plus
    :data:`END_SWEEP_AFTER_SEC`), in a write transaction of its own; ``wake`` (the server's
    acquires that wait) when it expired some. Nothing when ``within_sec`` is a full expiry or more:
    the periodic sweep is then as early."""
    if within_sec >= expire_sec:
        return

    def sweep() -> None:
        with write_tx(engine) as conn:
            expired = sweep_expired(conn, expire_sec)
        if expired and wake is not None:
            wake()

    _end_sweeps.stall_limit = stall_limit(expire_sec)
    _end_sweeps.schedule(str(engine.url), within_sec, sweep)


def parse_acquire(payload: Any) -> SessionAcquire:
    from balsam.serialization import PayloadError, from_dict

    try:
        spec = from_dict(SessionAcquire, payload)
    except PayloadError as exc:
        raise ValidationFailed.from_payload(exc) from None
    check_int_fields({"max_wall_time_min": spec.max_wall_time_min, "max_nodes_per_job": spec.max_nodes_per_job,
                      "app_ids": spec.app_ids}, ["max_wall_time_min", "max_nodes_per_job", "app_ids"], ["body"])
    if not 1 <= spec.max_num_jobs <= MAX_JOBS_PER_SESSION_ACQUIRE:
        raise ValidationFailed.field(["body", "max_num_jobs"], f"must be between 1 and {MAX_JOBS_PER_SESSION_ACQUIRE}, got {spec.max_num_jobs}")
    if len(spec.filter_tags) > MAX_TAG_FILTERS:
        # One clause each, as the listings' tags= (http.MAX_TAG_FILTERS): some 500 were a 503 on SQLite.
        raise ValidationFailed.field(["body", "filter_tags"], f"at most {MAX_TAG_FILTERS} tags, got {len(spec.filter_tags)}")
    if spec.sort_by not in SORT_BY_CHOICES:
        raise ValidationFailed.field(["body", "sort_by"], f"expected null or 'long_large_first', got {spec.sort_by!r}")
    if spec.max_aggregate_nodes is not None and spec.max_aggregate_nodes < 0:
        raise ValidationFailed.field(["body", "max_aggregate_nodes"], "must be >= 0")
    if spec.max_gpus_per_node is not None and not 0 <= spec.max_gpus_per_node <= 1e9:
        raise ValidationFailed.field(["body", "max_gpus_per_node"], f"must be between 0 and 1e9, got {spec.max_gpus_per_node!r}")
    return spec


def any_candidates(conn: sa.Connection, site_id: int, spec: SessionAcquire) -> bool:
    """Whether an acquire would find a job to lease now (the same filters, read without locks)."""
    plan = _acquire_plan(spec, conn.dialect.name, lock=False, batch_job=False)
    return bool(conn.execute(plan.exists, _candidate_params(site_id, spec)).scalar())


def candidates(site_id: int, spec: SessionAcquire, dialect: str, *, lock: bool = True) -> sa.Select:
    """The jobs an acquire may lease, in the order it takes them (at most ``max_num_jobs``);
    ``lock``: on PostgreSQL, locked with ``FOR UPDATE SKIP LOCKED`` (for the lease). The statement
    an acquire runs (:func:`_acquire_plan`) with this request's values bound."""
    plan = _acquire_plan(spec, dialect, lock=lock, batch_job=False)
    return plan.candidates.params(_candidate_params(site_id, spec))


class _AcquirePlan(NamedTuple):
    """The statements of one shape of acquire, built once, its values as parameters
    (:func:`_candidate_params`, and ``b_lease_session``, ``b_lease_batch_job`` for the leases)."""

    candidates: sa.Select
    #: Whether any candidate exists (the waiting acquire's look, :func:`any_candidates`).
    exists: sa.Select
    #: The lease of the candidates in one statement (``max_aggregate_nodes`` unset).
    lease: sa.Update
    #: The lease of the jobs ``b_ids`` a first fit chose (``max_aggregate_nodes`` set).
    lease_chosen: sa.Update


#: The acquires' statements by shape (:func:`_acquire_shape`). Building them and their SQLAlchemy
#: cache keys anew took about a third of an acquire's CPU (0.6 of 1.9 ms under cProfile, 300 empty
#: acquires on SQLite; docs/performance.md, 7 December); a launcher sends one shape again and again,
#: only its numbers change (the wall time left, how many jobs). Bounded: the tags come from users.
#: Least recently used first: a hit moves its plan to the end, the first is evicted.
_ACQUIRE_PLANS: "collections.OrderedDict[tuple[Any, ...], _AcquirePlan]" = collections.OrderedDict()
_ACQUIRE_PLANS_LOCK = threading.Lock()
MAX_ACQUIRE_PLANS = 256


def _acquire_shape(spec: SessionAcquire, dialect: str, lock: bool, batch_job: bool) -> "tuple[Any, ...]":
    """What the statements of :func:`_build_acquire_plan` depend on besides their parameters."""
    return (dialect, lock, batch_job, frozenset(s.value for s in spec.states),
            tuple(sorted((str(k), str(v)) for k, v in spec.filter_tags.items())), bool(spec.app_ids),
            spec.max_wall_time_min is None, spec.max_nodes_per_job is None, bool(spec.serial_only),
            spec.max_gpus_per_node is None, spec.max_aggregate_nodes is None, spec.sort_by)


def _candidate_params(site_id: int, spec: SessionAcquire) -> dict[str, Any]:
    """The values of a plan's candidates (those its shape has)."""
    params: dict[str, Any] = {"b_site": site_id, "b_limit": spec.max_num_jobs}
    if spec.app_ids:
        params["b_apps"] = sorted(spec.app_ids)
    if spec.max_wall_time_min is not None:
        params["b_wall"] = spec.max_wall_time_min
    if spec.max_nodes_per_job is not None:
        params["b_nodes"] = spec.max_nodes_per_job
    if spec.max_gpus_per_node is not None:
        params["b_gpus"] = spec.max_gpus_per_node + 1e-9
    return params


def _acquire_plan(spec: SessionAcquire, dialect: str, *, lock: bool, batch_job: bool) -> _AcquirePlan:
    shape = _acquire_shape(spec, dialect, lock, batch_job)
    with _ACQUIRE_PLANS_LOCK:  # an OrderedDict's reordering is not safe beside other threads' writes
        plan = _ACQUIRE_PLANS.get(shape)
        if plan is not None:
            _ACQUIRE_PLANS.move_to_end(shape)  # the least recently used goes first
            return plan
    plan = _build_acquire_plan(spec, dialect, lock, batch_job)  # outside the lock: the slow part
    with _ACQUIRE_PLANS_LOCK:
        _ACQUIRE_PLANS[shape] = plan
        if len(_ACQUIRE_PLANS) > MAX_ACQUIRE_PLANS:
            _ACQUIRE_PLANS.popitem(last=False)  # the least recently used
    return plan


def _build_acquire_plan(spec: SessionAcquire, dialect: str, lock: bool, batch_job: bool) -> _AcquirePlan:
    states = frozenset(s.value for s in spec.states)
    predicate = LEASABLE_PREDICATES.get(states)
    if predicate is not None:
        # A launcher's or the processing module's request: the leasable jobs, in the order taken,
        # come from a partial index (migration 0010), which SQLite uses only if this filter is the
        # index's predicate word for word. Leasable: held by no session, and not marked as taken by
        # its user from a session that may still run it ("Re-queued while running"): a marked job
        # leaves these indexes as a leased one does (migration 0018), so no acquire reads it.
        leasable: list[Any] = [sa.text(predicate)]
    else:
        leasable = [jobs.c.session_id.is_(None), jobs.c.released_from_session_id.is_(None),
                    jobs.c.state.in_(sorted(states))]
    stmt = sa.select(jobs.c.id, jobs.c.num_nodes, jobs.c.node_packing_count).where(
        jobs.c.site_id == sa.bindparam("b_site", type_=jobs.c.site_id.type), *leasable)
    if spec.filter_tags:
        # With a partial index, the tags are tested on its few rows: not with the GIN index (on
        # PostgreSQL), whose bitmap holds every job of the tag, finished ones included.
        stmt = stmt.where(json_contains(jobs.c.tags, spec.filter_tags, dialect, indexable=predicate is None))
    app_id, wall_time_min, num_nodes = jobs.c.app_id, jobs.c.wall_time_min, jobs.c.num_nodes
    if predicate is not None:
        # Read in order from the leasable jobs' index: the other filters are written ``+column``
        # (SQLite's way to keep a term off every index), all but the range on the column that
        # leads the packing order, else SQLite's planner, which has no statistics, may read the
        # app's index (every job of the app, finished ones included) or another order's index
        # for a range, and sort.
        order = "id" if spec.max_aggregate_nodes is None else spec.sort_by
        app_id = sa.literal_column("+jobs.app_id", sa.Integer)
        if order != "long_large_first":
            wall_time_min = sa.literal_column("+jobs.wall_time_min", sa.Integer)
        if order is not None:
            num_nodes = sa.literal_column("+jobs.num_nodes", sa.Integer)
    if spec.app_ids:
        stmt = stmt.where(app_id.in_(sa.bindparam("b_apps", expanding=True, type_=sa.Integer)))
    if spec.max_wall_time_min is not None:
        stmt = stmt.where(wall_time_min <= sa.bindparam("b_wall", type_=sa.Integer))
    if spec.max_nodes_per_job is not None:
        stmt = stmt.where(num_nodes <= sa.bindparam("b_nodes", type_=sa.Integer))
    if spec.serial_only:
        stmt = stmt.where(num_nodes == 1, jobs.c.ranks_per_node == 1)
    if spec.max_gpus_per_node is not None:
        # A launcher whose nodes have no GPU (0): jobs needing one are not leased to it, to be failed
        # there as impossible, but stay for a launcher with GPUs. Tested on the rows read (no index).
        stmt = stmt.where(jobs.c.ranks_per_node * jobs.c.gpus_per_rank <= sa.bindparam("b_gpus", type_=sa.Float))
    if spec.max_aggregate_nodes is not None:
        stmt = stmt.order_by(*RUNNABLE_ORDERS[spec.sort_by])
    else:
        stmt = stmt.order_by(jobs.c.id)
    stmt = stmt.limit(sa.bindparam("b_limit", type_=sa.Integer))
    if dialect == "postgresql" and lock:
        stmt = stmt.with_for_update(skip_locked=True, of=jobs)
    values: dict[str, Any] = {"session_id": sa.bindparam("b_lease_session", type_=jobs.c.session_id.type)}
    if batch_job:
        values["batch_job_id"] = sa.bindparam("b_lease_batch_job", type_=jobs.c.batch_job_id.type)
    # One statement: lease whatever the (locked, skip-locked) subquery picked.
    lease = (sa.update(jobs).where(jobs.c.id.in_(sa.select(stmt.subquery().c.id)))
             .values(**values).returning(*JOB_OUT_COLUMNS))
    lease_chosen = sa.update(jobs).where(ids_in_param(jobs.c.id, dialect)).values(**values).returning(*JOB_OUT_COLUMNS)
    return _AcquirePlan(stmt, sa.select(stmt.exists()), lease, lease_chosen)


def acquire(conn: sa.Connection, session: sa.Row, spec: SessionAcquire,
            check: "Callable[[], None] | None" = None) -> list[dict[str, Any]]:
    """Lease jobs to ``session``. ``check`` (raises to refuse) runs once the session is locked,
    before the lease: the route's launcher-credential check, which relies on that lock against a
    concurrent revoke (auth.launcher_credential_problem)."""
    dialect = conn.dialect.name
    plan = _acquire_plan(spec, dialect, lock=True, batch_job=session.batch_job_id is not None)
    params = _candidate_params(session.site_id, spec)
    now = utcnow()
    # First: it locks the session's row (before its jobs, see "Lock order"), and a session the
    # sweep deleted meanwhile is 404 here, not a lease to a session that no longer exists.
    heartbeat(conn, session.id, now)
    if check is not None:
        check()
    lease_values: dict[str, Any] = {"b_lease_session": session.id}
    if session.batch_job_id is not None:
        lease_values["b_lease_batch_job"] = session.batch_job_id

    if spec.max_aggregate_nodes is None:
        # One statement: lease whatever the (locked, skip-locked) subquery picked.
        leased = conn.execute(plan.lease, {**params, **lease_values})
        return sorted(job_dicts(leased), key=lambda job: job["id"])

    chosen: list[int] = []
    footprint = 0.0
    # First fit in the requested order: a job that does not fit is skipped, so smaller jobs later
    # in the order can still fill the remaining nodes.
    for row in conn.execute(plan.candidates, params):
        size = row.num_nodes / row.node_packing_count
        if footprint + size > spec.max_aggregate_nodes + 1e-9:
            continue
        footprint += size
        chosen.append(row.id)
    if not chosen:
        return []
    # RETURNING gives the rows in no promised order: the answer keeps the packing order.
    leased = conn.execute(plan.lease_chosen, {"b_ids": ids_param(chosen, dialect), **lease_values})
    by_id = {d["id"]: d for d in job_dicts(leased)}
    return [by_id[jid] for jid in chosen]


def reacquire(conn: sa.Connection, session: sa.Row, job_ids: list[int]) -> list[dict[str, Any]]:
    """The answer to a retried acquire: the jobs it leased that this session still holds (in the
    order the original answer had)."""
    if not job_ids:
        return []
    rows = conn.execute(sa.select(*JOB_OUT_COLUMNS).where(jobs.c.id.in_(job_ids), jobs.c.session_id == session.id))
    by_id = {job["id"]: job for job in job_dicts(rows)}
    return [by_id[jid] for jid in job_ids if jid in by_id]


# -- giving back jobs a launcher leased and has not started ------------------------------------
#
# A launcher leases a few jobs ahead of its free slots (the serial mode's prefetch). With long jobs
# its slots may stay busy for hours while those jobs wait leased: invisible to the elastic queue
# (it counts only jobs no launcher holds) and to other BatchJobs' launchers. So a launcher may give
# such jobs back (``POST /sessions/{id}/release``, the ids in one request, balsam.launcher.prefetch)
# without ending its session. Why this is exactly-once (a job given back is never run twice):
#
# - the launcher gives back only jobs it never started and never will: its loop thread, the only
#   one that starts jobs, takes them out of its start queue before the request is sent (they are in
#   no hand-over queue, and its heartbeats no longer list them), or holds them back before they
#   reach that queue (too long for the time left; its acquires, bounded by that time, never lease
#   them to it again);
# - the server clears the holder only where it is still this session and the job still runnable
#   (PREPROCESSED, RESTART_READY): read with the rows locked in id order after the session's
#   heartbeat locked the session (the lock order above), on PostgreSQL ``FOR UPDATE``, which re-reads
#   a row's latest version: a job a user moved or deleted meanwhile, or that a sweep freed, is left
#   as it is. No mark (``released_from_session_id``): no run of it exists, so it is leasable at once;
#   another launcher's acquire then leases it in its own transaction (``session_id IS NULL``);
# - a release whose answer was lost is resent with its Idempotency-Key and replayed (the ids it
#   released; the replay heartbeats the session, as a replayed acquire does), never applied again;
#   and the launcher sends no acquire while a release of it is unanswered, up to a bound
#   (balsam.launcher.prefetch: 5 tries or 60 s), so a job it gives back cannot be leased to it
#   again before the release is done. Past that bound the release is unsettled: acquires go on, the
#   launcher resends it (same key and ids) in the background until answered, and does not start its
#   jobs meanwhile, even if an acquire leases one again (parked), so a try applied late frees only
#   jobs it never runs. Once answered (or its session gone) they are no longer the launcher's: one
#   a later acquire leases is started as usual, and the parked ones go back in a new release (new
#   key) sent at once, before any acquire. A resend past the key's lifetime
#   (BALSAM_IDEMPOTENCY_TTL_SEC, 24 h by default) is applied anew, not replayed: still exactly-once,
#   since of its ids the session holds only jobs the launcher never starts (its own, and the parked
#   ones, which it frees); the new release then finds the parked ones free or frees them, and no
#   acquire comes between to lease them again under a release still unsettled. If the server
#   refuses such a request (a 4xx: nothing of that answer applied, but an earlier try may have
#   been), the launcher does not start its jobs: 408, 409, 425 (a later answer may differ; 429
#   counts as no answer) leave it unsettled, resent as above; any other status below 500 but a 404
#   naming the session (gone: its jobs were freed with it) stops the resends, and the jobs stay
#   leased, never started, until the session's deletion. It starts them again only where no try can
#   have been applied (refused at its first try, or by a server without the route);
# - a release names only jobs the launcher's current session leased: jobs of a session it lost
#   (expired; the server freed them with it) are not sent, and a new session gets a new key, so a
#   release never frees a copy another session, or a later lease of this launcher, holds.


def parse_release(payload: Any) -> list[int]:
    """The ``job_ids`` of a release body (at most MAX_JOBS_PER_SESSION_ACQUIRE, 64-bit ids)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("job_ids"), list):
        raise ValidationFailed.field(["body", "job_ids"], "expected a JSON object with job_ids, a list of job ids")
    unknown = sorted(set(payload) - {"job_ids"})
    if unknown:
        raise ValidationFailed([(["body", k], "unknown field") for k in unknown])
    ids = payload["job_ids"]
    if len(ids) > MAX_JOBS_PER_SESSION_ACQUIRE:
        raise ValidationFailed.field(["body", "job_ids"], f"at most {MAX_JOBS_PER_SESSION_ACQUIRE} job ids per "
                                     f"release, got {len(ids)}")
    errors = first_problems(((["body", "job_ids", i], f"expected a 64-bit integer job id, got {value!r}"[:200])
                             for i, value in enumerate(ids) if not (is_json_int(value) and INT64_MIN <= value <= INT64_MAX)),
                            ids, ["body", "job_ids"])
    if errors:
        raise ValidationFailed(errors)  # the first listed (the walk stops after them)
    return sorted({int(value) for value in ids})


_RUNNABLE = sorted(s.value for s in (JobState.preprocessed, JobState.restart_ready))


def release_jobs(conn: sa.Connection, session_id: int, job_ids: list[int]) -> list[int]:
    """Give back those of ``job_ids`` that ``session_id`` holds in a runnable state (leasable again
    at once); the ids given back, sorted. One locked read and one bulk update; called after
    :func:`heartbeat`, which locked the session (see the race-freedom argument above)."""
    if not job_ids:
        return []
    dialect = conn.dialect.name
    stmt = sa.select(jobs.c.id).where(id_in(jobs.c.id, job_ids, dialect), jobs.c.session_id == session_id,
                                      jobs.c.state.in_(_RUNNABLE))
    if dialect == "postgresql":
        stmt = stmt.order_by(jobs.c.id).with_for_update(of=jobs)
    ids = sorted(conn.execute(stmt).scalars())
    if ids:
        conn.execute(sa.update(jobs).where(id_in(jobs.c.id, ids, dialect)).values(session_id=None))
    return ids
