"""Launcher credentials: what a pilot job inside an allocation authenticates with.

The site agent's scheduler module mints one per BatchJob before submitting it
(``POST /auth/credentials``): good only for this site, living the BatchJob's queue wait plus wall
time (``QUEUE_ALLOWANCE_SEC`` + wall time at first), and renewed by the agent while the BatchJob is
queued or running, so a job that waits in the queue for a week still starts authorized. The server
revokes it when the BatchJob finishes or is deleted (and ``balsam server revoke`` or
``DELETE /auth/credentials/{id}`` revoke it at any time: the launcher then stops cleanly and the
server returns its jobs to the pool).

The credential lives in ``<site>/.credentials/batch-job-<id>.yml`` (a client file, mode 0600 in a
0700 directory); the launcher of that BatchJob (``BALSAM_BATCH_JOB_ID``) uses it instead of the
user's own login, and re-reads it when the server refuses a token (the agent renewed it).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..client.settings import ClientSettings, ClientSettingsError
from ..util import batch_job_id_from_env
from .service_client import list_all

logger = logging.getLogger(__name__)

CREDENTIALS_DIR = ".credentials"
#: How long a launcher credential covers the queue wait at first (the agent renews it after).
QUEUE_ALLOWANCE_SEC = 3 * 24 * 3600
#: Renew once less than the BatchJob's wall time plus this is left.
RENEW_AHEAD_SEC = 24 * 3600
#: A renewal that could not be stored (a full or over-quota disk) is tried again after this long, not
#: at every scheduler cycle (a WARNING and a server call each, 86,400 a day at a 1 s sync_period).
RENEW_STORE_RETRY_SEC = 600.0
#: The server's default cap on one credential's lifetime (BALSAM_AUTH_LAUNCHER_MAX_TTL_SEC).
MAX_TTL_SEC = 30 * 24 * 3600


def credential_path(site_path: Path, batch_job_id: int) -> Path:
    return Path(site_path) / CREDENTIALS_DIR / f"batch-job-{int(batch_job_id)}.yml"


def use_launcher_credential(site_path: Path, env: "dict[str, str]") -> Optional[Path]:
    """Point ``BALSAM_CLIENT_PATH`` (in ``env``) at this BatchJob's credential if the agent wrote
    one; returns its path (None: the launcher uses the user's login, as before)."""
    # One rule with the launcher's own reading (isdecimal() took '\u0663' for 3, and int() raised
    # a traceback on 5,000 digits): a value it ignores selects no credential either.
    batch_job_id = batch_job_id_from_env(env)
    if batch_job_id is None:
        return None
    path = credential_path(site_path, batch_job_id)
    if not path.is_file():
        return None
    env["BALSAM_CLIENT_PATH"] = str(path)
    return path


def _ttl_for(batch_job: dict) -> int:
    wall = int(batch_job.get("wall_time_min") or 0) * 60
    return min(MAX_TTL_SEC, wall + QUEUE_ALLOWANCE_SEC)


class LauncherCredentials:
    """Mints, renews and cleans up the launcher credentials of one site (used by the scheduler module)."""

    def __init__(self, client: Any, site_path: Path, site_id: int) -> None:
        self.client = client
        self.site_path = Path(site_path)
        self.site_id = site_id
        self.directory = self.site_path / CREDENTIALS_DIR
        #: False once the server showed it has no credential routes (an older server): launchers
        #: then use the user's login.
        self.supported = True
        #: BatchJob id -> when (time.monotonic()) a renewal that could not be stored is tried again.
        self._renew_retry: dict[int, float] = {}

    def _write(self, batch_job_id: int, answer: dict) -> Path:
        from ..serialization import parse_datetime

        client = self.client
        settings = ClientSettings(
            api_root=client.api_root,
            token=answer["access_token"],
            token_expiry=parse_datetime(answer["expiration"]),
            username=getattr(client, "username", None),
            credential_id=int(answer["id"]),
            connect_timeout=getattr(client, "connect_timeout", 6.2),
            read_timeout=getattr(client, "read_timeout", 120.0),
            retry_count=10,
            server_certificate=getattr(client, "server_certificate", None),
            allow_insecure_http=bool(getattr(client, "allow_insecure_http", False)),
        )
        path = credential_path(self.site_path, batch_job_id)
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            return settings.save(path)
        except OSError as exc:  # a full or over-quota site directory: say which file (it named none)
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None

    def mint(self, batch_job: dict) -> Optional[Path]:
        """A credential for this BatchJob's launcher (before its submission). API errors propagate:
        the caller submits later rather than start a launcher with no way to report.

        A try that failed before its launcher was queued (the scheduler refused it, the submit
        command timed out) leaves the credential stored: the next try reuses it (renewed, so it
        also covers the new queue wait) rather than mint another. A new one was minted at every
        try and none was revoked: a retried submission left a live credential per cycle (seven in
        a minute). Nothing is revoked here: a timed-out try may have queued a launcher, which reads
        the BatchJob's one credential file when it starts, whichever try wrote it."""
        if not self.supported:
            return None
        reused = self._reuse(batch_job)
        if reused is not None:
            return reused
        try:
            return self._mint_new(batch_job)
        except Exception as exc:
            if getattr(exc, "status_code", None) in (404, 405):
                self.supported = False
                logger.warning("the server has no launcher credentials (%s): launchers use your login", exc)
                return None
            raise

    def _mint_new(self, batch_job: dict) -> Path:
        """Create a new credential for this BatchJob and store it in its file (API and disk errors
        propagate; one that could not be stored is revoked)."""
        body = {"kind": "launcher", "site_id": self.site_id, "batch_job_id": int(batch_job["id"]),
                "ttl_sec": _ttl_for(batch_job), "label": f"launcher of BatchJob {batch_job['id']}"}
        answer = self.client.post("/auth/credentials", json=body)
        try:
            path = self._write(int(batch_job["id"]), answer)
        except OSError:
            # A full or over-quota site directory: the credential just minted is revoked, or every
            # cycle minted another that no file kept (one a second, live for days, in a real run).
            try:
                self.client.delete(f"/auth/credentials/{answer['id']}")
            except Exception as revoke_exc:
                # Not retried: no file names it, and the server revokes the BatchJob's credentials
                # when the BatchJob ends (or it expires).
                logger.warning("BatchJob %s: could not revoke launcher credential %s that could not be stored (it "
                               "is revoked when the BatchJob ends, or expires): %s", batch_job["id"], answer["id"],
                               revoke_exc)
            raise
        logger.info("BatchJob %s: launcher credential %s valid until %s", batch_job["id"], answer["id"], answer["expiration"])
        return path

    def _reuse(self, batch_job: dict) -> Optional[Path]:
        """Renew the BatchJob's stored credential for another try (None: there is none to reuse,
        or the server no longer has it live: revoked, expired, or the file is of another BatchJob
        of the same id after the server's database was reset). API outages propagate."""
        bj_id = int(batch_job["id"])
        stored = self.stored(bj_id)
        if stored is None or stored.credential_id is None:
            return None
        try:
            answer = self.client.post(f"/auth/credentials/{stored.credential_id}/renew",
                                      json={"ttl_sec": _ttl_for(batch_job)})
        except Exception as exc:
            if getattr(exc, "status_code", None) in (404, 409):  # gone, revoked, or not a launcher's
                logger.info("BatchJob %s: its stored launcher credential %s cannot be reused (%s): minting another",
                            bj_id, stored.credential_id, exc)
                return None
            raise
        if answer.get("batch_job_id") not in (None, bj_id) or answer.get("site_id") not in (None, self.site_id):
            logger.info("BatchJob %s: the stored launcher credential %s is another BatchJob's: minting another",
                        bj_id, stored.credential_id)
            return None
        path = self._write(bj_id, answer)
        logger.info("BatchJob %s: launcher credential %s reused for this try, valid until %s", bj_id, answer["id"],
                    answer["expiration"])
        return path

    def stored(self, batch_job_id: int) -> Optional[ClientSettings]:
        try:
            return ClientSettings.load(credential_path(self.site_path, batch_job_id))
        except ClientSettingsError:
            return None

    def renew_due(self, batch_jobs: Iterable[dict], now: Optional[dt.datetime] = None) -> list[int]:
        """Renew the credentials of queued/running BatchJobs that would expire within their wall
        time plus a day (one call per credential, about once a day each); one the server no longer
        has (404) is replaced by a new one. Returns the ids of the BatchJobs renewed or replaced."""
        now = now or dt.datetime.now(dt.timezone.utc)
        renewed = []
        for batch_job in batch_jobs:
            stored = self.stored(int(batch_job["id"]))
            if stored is None or stored.credential_id is None or stored.token_expiry is None:
                continue
            expiry = stored.token_expiry if stored.token_expiry.tzinfo else stored.token_expiry.replace(tzinfo=dt.timezone.utc)
            needed = dt.timedelta(seconds=int(batch_job.get("wall_time_min") or 0) * 60 + RENEW_AHEAD_SEC)
            if expiry - now > needed:
                continue
            bj_id = int(batch_job["id"])
            retry_at = self._renew_retry.get(bj_id)
            if retry_at is not None and time.monotonic() < retry_at:
                continue  # its renewal was not stored a moment ago (full disk): said once, tried later
            try:
                answer = self.client.post(f"/auth/credentials/{stored.credential_id}/renew",
                                          json={"ttl_sec": _ttl_for(batch_job)})
            except Exception as exc:
                if getattr(exc, "status_code", None) == 404:  # gone: replaced (or said why not)
                    if self._replace_gone(batch_job, stored.credential_id, exc):
                        renewed.append(bj_id)
                    continue
                logger.warning("BatchJob %s: could not renew launcher credential %s: %s", batch_job["id"],
                               stored.credential_id, exc)
                continue
            try:
                self._write(bj_id, answer)
            except OSError as exc:
                # Renewed on the server all the same; the other BatchJobs are still renewed. Said
                # once while it lasts, and tried again after RENEW_STORE_RETRY_SEC.
                if bj_id not in self._renew_retry:
                    logger.warning("BatchJob %s: launcher credential %s renewed, not stored: %s (tried again every "
                                   "%.0f s until it is)", bj_id, stored.credential_id, exc.strerror or exc,
                                   RENEW_STORE_RETRY_SEC)
                self._renew_retry[bj_id] = time.monotonic() + RENEW_STORE_RETRY_SEC
                continue
            if self._renew_retry.pop(bj_id, None) is not None:
                logger.info("BatchJob %s: launcher credential %s renewal stored again", bj_id, stored.credential_id)
            renewed.append(int(batch_job["id"]))
            logger.info("BatchJob %s: launcher credential %s renewed until %s", batch_job["id"], stored.credential_id,
                        answer["expiration"])
        return renewed

    def _replace_gone(self, batch_job: dict, credential_id: int, exc: Exception) -> bool:
        """The server no longer has this queued/running BatchJob's credential (404: deleted, e.g.
        by an older server's retention sweep, or the database was restored): mint a new one into
        its file, which its launcher reads when it starts (or, running, after the server refused
        its old token). Renewing the gone one again answered 404 at every cycle for ever, and the
        launcher started with a token the server refused: the allocation was wasted. A revoked
        credential (409) is not replaced: someone revoked it on purpose. True if one was minted."""
        bj_id = int(batch_job["id"])
        try:
            path = self._mint_new(batch_job)
        except Exception as mint_exc:
            logger.warning("BatchJob %s: launcher credential %s no longer exists (%s) and no new one could be "
                           "minted (tried again next cycle): %s", bj_id, credential_id, exc, mint_exc)
            return False
        logger.warning("BatchJob %s: launcher credential %s no longer exists on the server (%s): a new one was "
                       "minted into %s", bj_id, credential_id, exc, path)
        return True

    def revoke_unused(self, batch_job_ids: Iterable[int]) -> list[int]:
        """Revoke the live launcher credentials of BatchJobs whose submission failed for good with
        no launcher that may have been queued (the caller checks), and delete their files: the
        server revokes a BatchJob's credentials when it finishes, not when its submission fails,
        so they lived out their 3 days. The site's live launcher credentials are listed first (one
        request): only those the server ties to these BatchJobs are revoked (a stored file's id
        may name another credential after the server's database was reset), one call each (the
        API revokes one per call; a BatchJob's submission fails once). A failure is logged and the
        credential expires on its own. Returns the ids of the credentials revoked."""
        wanted = {int(i) for i in batch_job_ids}
        if not wanted or not self.supported:
            return []
        try:
            live = list_all(self.client, "/auth/credentials",
                            {"kind": "launcher", "site_id": self.site_id, "active": "true"})
        except Exception as exc:
            logger.warning("cannot list the launcher credentials of BatchJobs %s to revoke them (they expire on their "
                           "own): %s", ", ".join(map(str, sorted(wanted))), exc)
            return []
        revoked = []
        for row in live:
            if row.get("batch_job_id") not in wanted:
                continue
            try:
                self.client.delete(f"/auth/credentials/{row['id']}")
            except Exception as exc:
                if getattr(exc, "status_code", None) != 404:  # 404: gone already
                    logger.warning("BatchJob %s: could not revoke the unused launcher credential %s (it expires on "
                                   "its own): %s", row["batch_job_id"], row["id"], exc)
                    continue
            revoked.append(int(row["id"]))
            logger.info("BatchJob %s: launcher credential %s revoked (its submission failed; no launcher uses it)",
                        row["batch_job_id"], row["id"])
        for bj_id in wanted:
            credential_path(self.site_path, bj_id).unlink(missing_ok=True)
        return revoked

    def remove_stale(self, active_ids: "set[int]", may_be_queued: Optional[Callable[[int], bool]] = None,
                     now: Optional[dt.datetime] = None) -> list[int]:
        """Delete the files of BatchJobs that are no longer active (the server revoked them). The
        file of one that ``may_be_queued`` (a submit command of its ended without an answer, and
        it went submit_failed: a job of that try may still start) is kept until it expires: its
        launcher reads it when it starts."""
        removed = []
        if not self.directory.is_dir():
            return removed
        now = now or dt.datetime.now(dt.timezone.utc)
        for path in self.directory.glob("batch-job-*.yml"):
            raw = path.stem.removeprefix("batch-job-")
            if not raw.isdecimal() or int(raw) in active_ids:
                continue
            if may_be_queued is not None and may_be_queued(int(raw)):
                stored = self.stored(int(raw))
                expiry = stored.token_expiry if stored is not None else None
                if expiry is not None and (expiry if expiry.tzinfo else expiry.replace(tzinfo=dt.timezone.utc)) > now:
                    continue
            path.unlink(missing_ok=True)
            removed.append(int(raw))
        return sorted(removed)
