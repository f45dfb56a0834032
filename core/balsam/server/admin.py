"""Administration straight on the database (``balsam server user ...``, ``balsam server revoke``,
``balsam server set-start-time``, the embedded server's local login): whoever can open the
database is the administrator."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator, Optional

import sqlalchemy as sa

from balsam.states import BatchJobState

from .auth import create_token, hash_password, issue_credential, password_problem, revoke_credentials, utcnow
from .db import create_db_engine, read_tx, write_tx
from .limits import INT64_MAX, INT64_MIN
from .tables import batch_jobs, credentials, users

#: States whose BatchJob's start_time may be cleared (set_batch_job_start): its allocation has not
#: run, so its start is recorded later as at first. (pending_deletion may follow a run.)
CLEARABLE_START_STATES = frozenset(s.value for s in (BatchJobState.pending_submission, BatchJobState.queued,
                                                      BatchJobState.submit_failed))
#: The earliest start_time set_batch_job_start accepts. A BatchJob row keeps no creation time, and
#: its status_info's submit_time is client-writable (a wrong one would block the very correction
#: this is for): a fixed date before any Balsam allocation, which refuses a typo's year 1 or 1970.
EARLIEST_START = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


class AdminError(RuntimeError):
    """One line for the administrator."""


def _check_username(username: str) -> None:
    """The rule of ``POST /auth/password/register``: a name it would refuse cannot be added here either."""
    from .routes.auth import USERNAME_RE, USERNAME_RULE  # the routes import the web framework: only when needed

    if not USERNAME_RE.fullmatch(username):
        raise AdminError(f"invalid user name {username!r}: {USERNAME_RULE}")


class Admin:
    def __init__(self, database_url: str) -> None:
        self.engine = create_db_engine(database_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- users -------------------------------------------------------------------------------
    def user_id(self, conn: sa.Connection, username: str) -> Optional[int]:
        return conn.execute(sa.select(users.c.id).where(users.c.username == username)).scalar()

    def ensure_user(self, username: str) -> int:
        """The id of ``username``, created without a password if missing (the embedded server's user)."""
        with write_tx(self.engine) as conn:
            found = self.user_id(conn, username)
            if found is not None:
                return found
            return conn.execute(
                sa.insert(users).values(username=username, hashed_password=None, date_joined=utcnow()).returning(users.c.id)
            ).scalar_one()

    def add_user(self, username: str, password: Optional[str], min_length: int) -> int:
        _check_username(username)
        if password is not None:
            problem = password_problem(password, min_length)
            if problem:
                raise AdminError(f"password {problem}")
        hashed = hash_password(password) if password else None
        with write_tx(self.engine) as conn:
            if self.user_id(conn, username) is not None:
                raise AdminError(f"user {username!r} already exists")
            return conn.execute(
                sa.insert(users).values(username=username, hashed_password=hashed, date_joined=utcnow()).returning(users.c.id)
            ).scalar_one()

    #: What a new password revokes with ``end_sessions``: every credential that a password login
    #: (or a session or refresh built on one) can have produced. ``launcher`` credentials are kept:
    #: revoking them ends the sessions of running BatchJobs (their RUNNING jobs are timed out and
    #: run again); ``balsam server revoke --user NAME --kind launcher`` does that when it is wanted.
    PASSWORD_RESET_REVOKES = ("login", "refresh", "dashboard")

    def set_password(self, username: str, password: str, min_length: int, *,
                     end_sessions: bool = False) -> dict[str, int]:
        """Set the password. The user's dashboard sessions end (a browser logged in with the old
        password, or a stolen cookie, logs in again). With ``end_sessions`` (a password that leaked)
        their ``login`` and ``refresh`` credentials are revoked too: tokens and refresh credentials
        obtained with the old password stop working, the site agents' and the embedded server's
        local login among them (the user logs in again). Not by default: the common use is giving
        the local user of an embedded server a password for ``balsam login`` from elsewhere, and
        ending their logins then would stop their running site agents. Launcher credentials of
        BatchJobs are kept (see :attr:`PASSWORD_RESET_REVOKES`). Returns the number of credentials
        revoked per kind, and ``launcher_kept``: how many live launcher credentials remain."""
        problem = password_problem(password, min_length)
        if problem:
            raise AdminError(f"password {problem}")
        hashed = hash_password(password)
        with write_tx(self.engine) as conn:
            found = self.user_id(conn, username)
            if found is None:
                raise AdminError(f"no user {username!r}")
            conn.execute(sa.update(users).where(users.c.id == found).values(hashed_password=hashed))
            kinds = self.PASSWORD_RESET_REVOKES if end_sessions else ("dashboard",)
            rows = revoke_credentials(conn, sa.and_(credentials.c.user_id == found, credentials.c.kind.in_(kinds)))
            kept = conn.execute(
                sa.select(sa.func.count()).select_from(credentials).where(
                    credentials.c.user_id == found, credentials.c.kind == "launcher",
                    credentials.c.revoked.is_(None), credentials.c.expires > utcnow())
            ).scalar_one()
        summary = {kind: sum(1 for r in rows if r.kind == kind) for kind in self.PASSWORD_RESET_REVOKES}
        summary["launcher_kept"] = int(kept)
        return summary

    def invite(self, username: str, ttl_sec: int) -> tuple[str, dt.datetime]:
        """Create ``username`` (no password yet) and an invitation code to set it with; the
        user's earlier invitations stop working (only the code handed out last is pending)."""
        _check_username(username)
        with write_tx(self.engine) as conn:
            user_id = self.user_id(conn, username)
            if user_id is None:
                user_id = conn.execute(
                    sa.insert(users).values(username=username, hashed_password=None, date_joined=utcnow())
                    .returning(users.c.id)
                ).scalar_one()
            elif conn.execute(sa.select(users.c.hashed_password).where(users.c.id == user_id)).scalar():
                raise AdminError(f"user {username!r} already has a password (use `balsam server set-password`)")
            # A code given out earlier (lost, or sent to the wrong address) must not stay usable.
            revoke_credentials(conn, sa.and_(credentials.c.user_id == user_id, credentials.c.kind == "invitation"))
            _id, expires, code = issue_credential(conn, user_id, "invitation", f"invitation for {username}", ttl_sec,
                                                  with_secret=True)
        assert code is not None
        return code, expires

    def users(self) -> list[sa.Row]:
        with read_tx(self.engine) as conn:
            return list(conn.execute(
                sa.select(users.c.id, users.c.username, users.c.date_joined,
                          users.c.hashed_password.is_not(None).label("has_password")).order_by(users.c.id)
            ))

    # -- credentials -------------------------------------------------------------------------
    def local_login(self, username: str, ttl_sec: int, access_ttl_sec: int, secret_key: str,
                    label: str) -> dict[str, Any]:
        """A refresh credential and a first access token for ``username`` (created if missing)."""
        user_id = self.ensure_user(username)
        with write_tx(self.engine) as conn:
            cred_id, refresh_expires, code = issue_credential(conn, user_id, "refresh", label, ttl_sec, with_secret=True)
        access_expires = min(refresh_expires, utcnow() + dt.timedelta(seconds=access_ttl_sec))
        token, expiration = create_token(user_id, username, secret_key, credential_id=cred_id, expires=access_expires)
        return {"access_token": token, "expiration": expiration, "refresh_token": code,
                "refresh_expiration": refresh_expires, "credential_id": cred_id}

    def credentials(self, username: Optional[str] = None, *, active_only: bool = False) -> Iterator[sa.Row]:
        stmt = sa.select(credentials, users.c.username).join(users, users.c.id == credentials.c.user_id)
        if username is not None:
            stmt = stmt.where(users.c.username == username)
        if active_only:
            stmt = stmt.where(credentials.c.revoked.is_(None), credentials.c.expires > utcnow())
        with read_tx(self.engine) as conn:
            yield from list(conn.execute(stmt.order_by(credentials.c.id)))

    def revoke(self, *, username: Optional[str] = None, ids: "list[int] | None" = None,
               kinds: "list[str] | None" = None) -> list[int]:
        """Revoke credentials by id and/or all of a user's (optionally of some kinds). Launcher
        credentials also end their BatchJob's sessions."""
        clauses = []
        with write_tx(self.engine) as conn:
            if username is not None:
                user_id = self.user_id(conn, username)
                if user_id is None:
                    raise AdminError(f"no user {username!r}")
                clauses.append(credentials.c.user_id == user_id)
            if ids:
                self._check_revoked_ids(conn, ids, username, kinds)
                clauses.append(credentials.c.id.in_(ids))
            if kinds:
                clauses.append(credentials.c.kind.in_(kinds))
            if not clauses:
                raise AdminError("say what to revoke: --user NAME, --id N or both")
            rows = revoke_credentials(conn, sa.and_(*clauses))
        return sorted(r.id for r in rows)

    @staticmethod
    def _check_revoked_ids(conn: sa.Connection, ids: "list[int]", username: Optional[str],
                           kinds: "list[str] | None") -> None:
        """An ``--id`` that names no credential (a typo), or one that ``--user`` or ``--kind``
        excludes (another user's, another kind), is said, not answered "Revoked 0"."""
        # An id out of the 64-bit range names no credential (SQLite cannot even bind it).
        in_range = [i for i in ids if INT64_MIN <= i <= INT64_MAX]
        rows = {row.id: row for row in conn.execute(
            sa.select(credentials.c.id, credentials.c.kind, users.c.username)
            .join(users, users.c.id == credentials.c.user_id).where(credentials.c.id.in_(in_range)))}
        unknown = sorted(set(ids) - set(rows))
        if unknown:
            raise AdminError(f"no credential {', '.join(map(str, unknown))} (see balsam server credentials --all)")
        excluded = []
        for cred_id in sorted(rows):
            row = rows[cred_id]
            if username is not None and row.username != username:
                excluded.append(f"credential {cred_id} is {row.username}'s, not {username}'s")
            elif kinds and row.kind not in kinds:
                excluded.append(f"credential {cred_id} is of kind {row.kind}, not {' or '.join(kinds)}")
        if excluded:
            raise AdminError(f"{'; '.join(excluded)} (see balsam server credentials --all)")

    # -- BatchJobs ---------------------------------------------------------------------------
    def set_batch_job_start(self, batch_job_id: int, start: Optional[dt.datetime]) -> dict[str, Any]:
        """Replace BatchJob ``batch_job_id``'s start_time with ``start`` (a time without a zone is
        UTC), or clear it (None). The API only moves a stored start_time earlier (routes/batch_jobs.py,
        ``_keep_earliest_start``): the site agent's late sighting, PATCHed from a copy read before the
        launcher's Session recorded the start, must not replace it, and the server cannot tell that
        request from a user's (a Balsam 0.7 client sends the same). So a wrong one (a typo's early
        date) is corrected here, by whoever administers the database, as a user's password is.
        Cleared only while the BatchJob has not started (``CLEARABLE_START_STATES``): its start is
        then recorded as at first, by its launcher's first Session or the agent's sighting of its
        move to running. A running or ended one would keep no start at all: the agent sends one only
        on that move, and a launcher opens a new Session only after losing its old one.

        Refused (:class:`AdminError`): a BatchJob that does not exist, a clear of one that may have
        started, a start later than now (the database host's clock on PostgreSQL, this process's on
        SQLite, as the Session's start), later than the BatchJob's end_time, or earlier than
        ``EARLIEST_START`` (a typo's year 1 or 1970). Returns ``{"id", "site_id", "state", "old", "new"}``."""
        if start is not None and start.tzinfo is None:
            start = start.replace(tzinfo=dt.timezone.utc)
        with write_tx(self.engine) as conn:
            stmt = sa.select(batch_jobs.c.id, batch_jobs.c.site_id, batch_jobs.c.state, batch_jobs.c.start_time,
                             batch_jobs.c.end_time, batch_jobs.c.status_info).where(batch_jobs.c.id == batch_job_id)
            if conn.dialect.name == "postgresql":
                # The row lock a BatchJob update takes (NO KEY UPDATE: leases and sessions referring
                # to it go on), so the checks below hold until this commits. One row, no other lock.
                stmt = stmt.with_for_update(key_share=True, of=batch_jobs)
            row = conn.execute(stmt).first()
            if row is None:
                raise AdminError(f"no BatchJob {batch_job_id}")
            if start is None and row.state not in CLEARABLE_START_STATES:
                raise AdminError(f"BatchJob {batch_job_id} is {row.state}: its start_time cannot be cleared (it "
                                 f"would not be recorded again); give the time it started instead")
            if start is None and (row.status_info or {}).get("requeue_count"):
                # Requeued: it ran before (start_time keeps the first start); cleared, the next run's
                # start would be taken for the allocation's first.
                raise AdminError(f"BatchJob {batch_job_id} was requeued (it ran before): its start_time cannot be "
                                 f"cleared; give the time it first started instead")
            if start is not None and start < EARLIEST_START:
                raise AdminError(f"BatchJob {batch_job_id}: start_time {start:%Y-%m-%d %H:%M:%S} UTC is earlier "
                                 f"than {EARLIEST_START:%Y-%m-%d} (a mistyped year?)")
            if start is not None:
                now = (conn.execute(sa.select(sa.func.now())).scalar_one() if conn.dialect.name == "postgresql"
                       else utcnow())
                if start > now:
                    raise AdminError(f"BatchJob {batch_job_id}: start_time {start:%Y-%m-%d %H:%M:%S} UTC is later "
                                     f"than now ({now.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC)")
                if row.end_time is not None and start > row.end_time:
                    raise AdminError(f"BatchJob {batch_job_id}: start_time {start:%Y-%m-%d %H:%M:%S} UTC is later "
                                     f"than its end_time ({row.end_time:%Y-%m-%d %H:%M:%S} UTC)")
            conn.execute(sa.update(batch_jobs).where(batch_jobs.c.id == batch_job_id).values(start_time=start))
        return {"id": row.id, "site_id": row.site_id, "state": row.state, "old": row.start_time, "new": start}
