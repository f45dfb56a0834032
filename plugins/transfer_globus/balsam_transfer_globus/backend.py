"""The ``globus`` transfer backend: a batch of files is one Globus Transfer task.

- ``submit``: one ``TransferData`` (``sync_level``, ``verify_checksum``, ``encrypt_data``,
  ``skip_source_errors`` so one missing file does not sink its batch) between the location's
  collection (``globus://<collection-id>``) and this site's (``endpoint_id``, set by
  ``transfers.globus_endpoint_id``). Site-side paths are rewritten from the site directory to
  ``endpoint_site_path`` when the endpoint sees the site under another prefix; every file is always
  added (Balsam 0.7 submitted an empty batch when that setting was unset). The task gets a
  ``deadline`` of submission time + ``task_timeout_sec`` (``transfers.task_timeout_sec``, through
  ``section_keys``): Globus itself stops a task the agent gives up on, even when the agent cannot
  reach Globus to cancel it.
- ``poll``: one ``task_list`` call filtered on all in-flight task ids; a succeeded task with skipped
  files costs ``task_skipped_errors`` calls (one per page of errors), which name the failed files
  (a file inside a directory item is named by its own path; the agent files it under that item).
- ``cancel``: the agent cancels a task none of whose items is left (their jobs were deleted); a
  task that had already finished (``TaskComplete``) is reported as such, not as cancelled.
- Locations: ``globus://<collection-uuid>`` only; a path after it is refused when settings.yml is
  read (a skipped file's error names its full path, which could then not be matched to the job's).
  The agent hands the backend its ``globus://`` locations when it builds it (``use_locations``),
  so the login command of the very first "not logged in" names every collection.
- Errors: consent required, a session requirement (a collection's high-assurance policy: a login
  with a given identity, recent enough), missing or expired/revoked credentials become one line
  naming the exact ``balsam site globus-login -e ...`` command (with ``--tokens-file PATH`` when
  ``tokens_file`` is not the default, ``--session-domain`` when a domain is required), retryable
  (the items wait, their jobs do not fail); 5xx, 429 (Globus Transfer's or Globus Auth's, refreshing
  the access token) and network errors are retryable; so is a 404 for this site's own collection
  (``transfers.globus_endpoint_id`` is wrong: a settings error, the items wait for it to be fixed);
  other 4xx are not.
- Logging in again while the agent runs: after a credentials or consent error the client is dropped,
  and the next call builds one from the tokens file; a tokens file whose refresh token changed (a
  new ``globus-login``) replaces the client at the next call too. Refreshed access tokens are written
  back (0600, one rename) only while the file still holds the refresh token the agent uses: a newer
  login in the file is never overwritten.
- Task status: an ``ACTIVE`` task that Globus reports as not progressing (a fault it keeps retrying,
  e.g. ``PERMISSION_DENIED``) or paused (``is_paused``, e.g. by an administrator) carries that as its
  ``reason`` (shown on its items, logged once by the agent).

Task ids are Globus's own, so an agent restarted after a crash resumes polling them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
import globus_sdk
from globus_sdk import gare as globus_gare
from globus_sdk.transport import RetryConfig

from balsam.options import option
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

from .auth import TRANSFER_RESOURCE_SERVER, load_tokens, login_command, save_tokens, tokens_path

__all__ = ["GlobusOptions", "GlobusTransfer", "globus_error"]

logger = logging.getLogger(__name__)

SYNC_LEVELS = ("exists", "size", "mtime", "checksum")
#: The direction in the labels submit_batch gives its tasks ("<label> stage-in (3 files)").
LABEL_DIRECTION = re.compile(r"\bstage-(in|out) \(\d+ files\)$")
#: nice_status values of an ACTIVE task that is progressing.
NICE_OK = ("Queued", "OK")
#: Globus task_list answers at most this many tasks per call.
TASK_LIST_LIMIT = 1000


def _sync_level(instance: Any, attribute: Any, value: str) -> None:
    if value not in SYNC_LEVELS:
        raise ValueError(f"expected one of {', '.join(SYNC_LEVELS)}, got {value!r}")


def _positive_or_none(instance: Any, attribute: Any, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be more than 0, got {value!r}")


@attrs.frozen
class GlobusOptions:
    endpoint_id: Optional[str] = option(
        None, "Globus collection id of this site's file system (transfers.globus_endpoint_id sets it too)."
    )
    endpoint_site_path: Optional[str] = option(
        None, "The site directory as that collection sees it, when it differs from the local path "
        "(transfers.globus_endpoint_site_path sets it too).",
    )
    client_id: Optional[str] = option(
        None, "Native-app client id `balsam site globus-login` uses (the agent uses the one saved with the tokens)."
    )
    tokens_file: Optional[str] = option(None, "Tokens written by `balsam site globus-login` (default $BALSAM_HOME/globus-tokens.json; "
                                        "a relative path is relative to the site directory).")
    sync_level: str = option("size", "Skip files already at the destination with the same: exists, size, mtime or checksum.",
                             validator=_sync_level)
    verify_checksum: bool = option(True, "Globus verifies each file's checksum after transfer.")
    encrypt_data: bool = option(True, "Encrypt data on the wire.")
    preserve_timestamp: bool = option(False, "Keep source modification times.")
    label: str = option("balsam", "Prefix of the task labels shown in the Globus web app.")
    task_timeout_sec: Optional[float] = option(
        None, "Seconds after submission at which Globus stops a task (its deadline); transfers.task_timeout_sec "
        "sets it. null: no deadline.", validator=_positive_or_none)
    http_retries: int = option(3, "Retries of a Globus request that failed with 5xx/429 or a network error, "
                               "within one cycle (then the next cycle tries again).")


def globus_error(exc: BaseException, collections: Sequence[str], tokens_file: Optional[Path] = None,
                 site_endpoint: Optional[str] = None) -> TransferError:
    """One TransferError for anything globus-sdk raises (``tokens_file``: the file the agent reads;
    ``site_endpoint``: this site's collection, named by a settings error when Globus does not know it)."""
    return _classify(exc, collections, tokens_file, site_endpoint)[0]


def _authorization_parameters(exc: BaseException) -> Optional[Any]:
    """The authorization parameters of a Globus Auth requirement error (GARE: what a new login
    must grant, e.g. a consent or a session with an identity of some domain), else None."""
    try:
        gare = globus_gare.to_gare(exc)
    except Exception:  # noqa: BLE001 - an error body globus-sdk cannot read is not a GARE
        return None
    return getattr(gare, "authorization_parameters", None)


def _wants_session(params: Any) -> bool:
    """Whether a GARE asks for a new login session (an identity of a domain, a recent or MFA
    authentication, a policy), not only a consent."""
    return any((params.session_required_single_domain, params.session_required_identities,
                params.session_required_policies, params.session_required_mfa))


def _session_words(params: Any) -> str:
    """What a session requirement asks, in a few words (no identifiers the user cannot act on)."""
    words = []
    message = one_line(params.session_message or "")
    if message:
        words.append(message)
    domains = list(params.session_required_single_domain or ())
    if domains and not all(d in message for d in domains):
        words.append(f"log in with an identity from {' or '.join(domains)}")
    if params.session_required_mfa:
        words.append("with multi-factor authentication")
    if params.session_required_identities and not params.session_required_single_domain:
        words.append("log in with the identity the collection requires")
    return "; ".join(words)


def _classify(exc: BaseException, collections: Sequence[str], tokens_file: Optional[Path] = None,
              site_endpoint: Optional[str] = None) -> tuple[TransferError, bool]:
    """(the TransferError, whether only a new login can fix it: the cached client is then dropped)."""
    if isinstance(exc, globus_sdk.GlobusAPIError):
        code = str(exc.code or "")
        status = exc.http_status
        message = one_line(getattr(exc, "message", "") or exc.text or exc.http_reason or "")
        if status >= 500 or status == 429:
            # Before the credential checks: Globus Auth down while the access token is refreshed
            # says nothing about the login (it is an AuthAPIError too).
            service = "Globus Auth" if isinstance(exc, globus_sdk.AuthAPIError) else "Globus Transfer"
            return TransferError(f"{service} unavailable (HTTP {' '.join(map(str, filter(None, (status, code))))}): "
                                 f"{message}", retryable=True), False
        command = login_command(collections, tokens_file)
        params = _authorization_parameters(exc)
        session = params if params is not None and _wants_session(params) else None
        if session is None and (code == "ConsentRequired" or getattr(getattr(exc, "info", None), "consent_required", None)
                                or (params is not None and params.required_scopes)):
            return TransferError(f"Globus needs your consent to reach these collections: run `{command}`",
                                 retryable=True), True
        if session is not None:
            # A collection's authentication policy (high assurance, a domain's identity, a recent
            # login): the user can satisfy it, the jobs must not fail for it.
            domains = list(session.session_required_single_domain or ())
            command = login_command(collections, tokens_file, session_domains=domains)
            words = _session_words(session)
            return TransferError(f"Globus needs a new login session{f' ({words})' if words else ''}: run `{command}`",
                                 retryable=True), True
        if isinstance(exc, globus_sdk.AuthAPIError) or status == 401 or code in ("AuthenticationFailed", "invalid_grant"):
            return TransferError(f"Globus credentials expired or were revoked: run `{command}`", retryable=True), True
        if site_endpoint and status == 404 and site_endpoint in message:
            return _site_collection_unknown(site_endpoint, code), False
        return TransferError(f"Globus refused the request (HTTP {status} {code}): {message}", retryable=False), False
    if isinstance(exc, (globus_sdk.NetworkError, globus_sdk.GlobusConnectionError)):
        return TransferError(f"cannot reach Globus: {type(exc).__name__}", retryable=True), False
    return TransferError(f"globus: {type(exc).__name__}: {one_line(exc)}", retryable=True), False


def _site_collection_unknown(site_endpoint: str, code: str) -> TransferError:
    # A typo in settings.yml, not the jobs' fault: they wait (as for bad backend options) instead
    # of max_concurrent_transfers x transfer_batch_size jobs failing per cycle.
    return TransferError(f"Globus does not know this site's collection {site_endpoint} (HTTP 404 {code}): "
                         "check transfers.globus_endpoint_id in settings.yml, then restart the agent", retryable=True)


def _stamp(path: Path) -> Optional[tuple[int, int, int]]:
    """What changes when the file is replaced (None: no file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@attrs.define
class _Login:
    """The login a client built from the tokens file uses."""

    path: Path
    #: The refresh token the client's authorizer holds (updated when Globus rotates it).
    refresh_token: str
    #: The file as it was when last read or written by this backend.
    stamp: Optional[tuple[int, int, int]]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class GlobusTransfer(TransferBackend):
    """Globus Transfer (``globus://<collection-id>``)."""

    options_schema = GlobusOptions
    section_keys = {"globus_endpoint_id": "endpoint_id", "globus_endpoint_site_path": "endpoint_site_path",
                    "task_timeout_sec": "task_timeout_sec"}
    description = "Globus Transfer tasks between this site's collection and globus://<collection-id> locations"

    def __init__(self, options: object = None, *, site_path: Optional[str] = None,
                 transfer_client: Optional[globus_sdk.TransferClient] = None) -> None:
        super().__init__(options, site_path=site_path)
        self._client = transfer_client
        #: The login of a client built from the tokens file (None: none built, or one handed in).
        self._login: Optional[_Login] = None
        self._lock = threading.Lock()
        #: Serializes writes of refreshed tokens (a refresh may run in any thread using the client).
        self._save_lock = threading.Lock()
        #: Collections of this site and its locations: the login command names them all (the agent
        #: adds those of transfer_locations through use_locations, before any submission).
        self._collections: list[str] = [self.options.endpoint_id] if self.options.endpoint_id else []
        #: The clock of submissions' deadlines (tests set their own).
        self.now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)

    def use_locations(self, locations: Sequence[TransferLocation]) -> None:
        # Known before the first submission, whose "not logged in" error must name them all: a
        # login consenting to the site's collection only would fail again on the remote one.
        for location in locations:
            if location.netloc and location.netloc not in self._collections:
                self._collections.append(location.netloc)

    # -- credentials -------------------------------------------------------------------------------

    def tokens_path(self) -> Path:
        """The tokens file this backend reads: ``tokens_file`` (relative: to the site directory), else
        the default. ``balsam site globus-login`` run in the site writes the same file."""
        return tokens_path(self.options.tokens_file, base=self.site_path)

    def _command(self) -> str:
        return login_command(self._collections, self.tokens_path())

    def _error(self, exc: BaseException) -> TransferError:
        error, relogin = _classify(exc, self._collections, self.tokens_path(), self.options.endpoint_id)
        if relogin:
            # The user is told to log in again: the next call must use what that login writes, not
            # this client's tokens (it would fail the same way until the agent restarts).
            with self._lock:
                if self._login is not None:
                    self._client, self._login = None, None
        return error

    def client(self) -> globus_sdk.TransferClient:
        with self._lock:
            if self._client is not None and self._login is not None and self._relogged_in(self._login):
                self._client, self._login = None, None
            if self._client is None:
                self._client, self._login = self._build_client()
            return self._client

    def _relogged_in(self, login: _Login) -> bool:
        """Whether the tokens file now holds another login than the client's (`globus-login` ran)."""
        stamp = _stamp(login.path)
        if stamp == login.stamp or stamp is None:
            return False  # unchanged, or removed: the client's tokens still work
        login.stamp = stamp
        try:
            tokens = load_tokens(login.path)
        except ValueError:
            return False
        if tokens is None or tokens.get("refresh_token") == login.refresh_token:
            return False
        logger.info("globus: a new login in %s: using it", login.path)
        return True

    def _build_client(self) -> tuple[globus_sdk.TransferClient, _Login]:
        path = self.tokens_path()
        stamp = _stamp(path)
        try:
            tokens = load_tokens(path)
        except ValueError as exc:
            raise TransferError(f"{exc}: run `{self._command()}`", retryable=True) from None
        if tokens is None:
            raise TransferError(f"not logged in to Globus ({path} missing): run `{self._command()}`", retryable=True)
        login = _Login(path=path, refresh_token=str(tokens["refresh_token"]), stamp=stamp)

        def on_refresh(response: globus_sdk.OAuthRefreshTokenResponse) -> None:
            fresh = response.by_resource_server.get(TRANSFER_RESOURCE_SERVER) or {}
            if fresh.get("access_token"):
                self._save_refreshed(login, fresh)

        authorizer = globus_sdk.RefreshTokenAuthorizer(
            login.refresh_token, globus_sdk.NativeAppAuthClient(tokens["client_id"], app_name="balsam"),
            access_token=tokens.get("access_token"), expires_at=tokens.get("expires_at_seconds"),
            on_refresh=on_refresh,
        )
        client = globus_sdk.TransferClient(
            authorizer=authorizer, app_name="balsam", retry_config=RetryConfig(max_retries=self.options.http_retries)
        )
        return client, login

    def _save_refreshed(self, login: _Login, fresh: Mapping[str, Any]) -> None:
        """Write a refreshed access token into the tokens file, over what the file holds now, and
        only while it holds the login this client uses: a `globus-login` run since wins (the next
        call builds a client from it)."""
        with self._save_lock:
            used = login.refresh_token
            login.refresh_token = str(fresh.get("refresh_token") or used)
            try:
                current = load_tokens(login.path)
            except ValueError:
                current = None
            if current is None or current.get("refresh_token") != used:
                return  # a newer login, or none (removed: logged out): not the agent's to rewrite
            save_tokens(login.path, {**current, "access_token": fresh["access_token"],
                                     "refresh_token": login.refresh_token,
                                     "expires_at_seconds": fresh.get("expires_at_seconds")})
            login.stamp = _stamp(login.path)

    # -- paths -------------------------------------------------------------------------------------

    def to_endpoint(self, local: str) -> str:
        """A site path in the site collection's namespace."""
        prefix, site = self.options.endpoint_site_path, self.site_path
        if not prefix:
            return local
        if not site:
            raise TransferError("globus: endpoint_site_path is set but the site directory is unknown", retryable=False)
        site = os.path.normpath(os.path.abspath(site))
        local_norm = os.path.normpath(local)
        if local_norm != site and not local_norm.startswith(site.rstrip("/") + "/"):
            raise TransferError(f"globus: {local} is outside the site directory {site}; "
                                "endpoint_site_path cannot map it", retryable=False)
        return posixpath.join(prefix, os.path.relpath(local_norm, site)).rstrip("/") or "/"

    def from_endpoint(self, path: str) -> str:
        """A path of the site collection's namespace as a site path (a path outside
        ``endpoint_site_path`` is no site path: returned as it is)."""
        prefix, site = self.options.endpoint_site_path, self.site_path
        if not prefix or not site:
            return path
        norm, root = posixpath.normpath(path), posixpath.normpath(prefix)
        if norm != root and not norm.startswith(root.rstrip("/") + "/"):
            return path
        rel = posixpath.relpath(norm, root)
        return os.path.normpath(os.path.join(site, rel))

    def _direction(self, doc: Mapping[str, Any]) -> TransferDirection:
        """The direction of a task: from its label (submit_batch's), else from its collections."""
        match = LABEL_DIRECTION.search(str(doc.get("label") or ""))
        if match:
            return TransferDirection.stage_in if match.group(1) == "in" else TransferDirection.stage_out
        to_site = str(doc.get("destination_endpoint_id")) == str(self.options.endpoint_id)
        return TransferDirection.stage_in if to_site else TransferDirection.stage_out

    # -- the contract ------------------------------------------------------------------------------

    def new_submission_token(self) -> Optional[str]:
        """A Globus submission id: submitting the same batch with it again returns the same task."""
        try:
            return str(self.client().get_submission_id()["value"])
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None

    @classmethod
    def check_location(cls, location: TransferLocation) -> None:
        if not location.netloc:
            extra = location.path.strip("/")
            hint = f" (one '/' too many? globus://{extra})" if _is_uuid(extra) else ""
            raise TransferError(f"expected globus://<collection-id>, got {location.url!r}{hint}", retryable=False)
        if not _is_uuid(location.netloc):
            raise TransferError(f"expected globus://<collection-id> with a collection UUID, got {location.netloc!r}",
                                retryable=False)
        if location.prefix:
            # Applying it would make skipped-file errors name prefixed paths no item has.
            raise TransferError(f"globus://<collection-id> takes no path, got {location.path!r}: "
                                "write the full collection path in the jobs' transfers", retryable=False)

    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile],
                     token: Optional[str] = None) -> str:
        site_ep = self.options.endpoint_id
        if not site_ep:
            raise TransferError("globus: transfers.globus_endpoint_id (this site's collection id) is not set in settings.yml",
                                retryable=False)
        self.check_location(location)
        remote_ep = location.netloc
        if remote_ep not in self._collections:
            self._collections.append(remote_ep)
        stage_in = direction == TransferDirection.stage_in
        src_ep, dest_ep = (remote_ep, site_ep) if stage_in else (site_ep, remote_ep)
        extra: dict[str, Any] = {"submission_id": token} if token else {}
        if self.options.task_timeout_sec:
            # The agent cancels the task at this age too; the service stops it even if that cancel
            # never reaches it (Globus unreachable, the agent down).
            deadline = self.now() + dt.timedelta(seconds=self.options.task_timeout_sec)
            extra["deadline"] = deadline.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        data = globus_sdk.TransferData(
            src_ep, dest_ep, label=f"{self.options.label} stage-{'in' if stage_in else 'out'} ({len(files)} files)",
            sync_level=self.options.sync_level, verify_checksum=self.options.verify_checksum,
            encrypt_data=self.options.encrypt_data, preserve_timestamp=self.options.preserve_timestamp,
            skip_source_errors=True, notify_on_succeeded=False, notify_on_failed=False, notify_on_inactive=False,
            **extra,
        )
        for f in files:
            src = f.src if stage_in else self.to_endpoint(f.src)
            dest = self.to_endpoint(f.dest) if stage_in else f.dest
            data.add_item(src, dest, recursive=f.recursive)
        try:
            response = self.client().submit_transfer(data)
        except TransferError:
            raise
        except Exception as exc:
            if self._site_collection_missing(exc, remote_ep):
                raise _site_collection_unknown(site_ep, str(getattr(exc, "code", "") or "")) from None
            raise self._error(exc) from None
        return str(response["task_id"])

    def _site_collection_missing(self, exc: BaseException, remote_ep: str) -> bool:
        """Whether a 404 of a submission is for this site's collection (settings.yml's
        globus_endpoint_id), not the location's: by the id the error names, else by asking Globus."""
        if not isinstance(exc, globus_sdk.TransferAPIError) or exc.http_status != 404:
            return False
        site_ep = str(self.options.endpoint_id)
        text = f"{getattr(exc, 'message', '') or ''} {exc.text or ''}"
        if site_ep in text or remote_ep in text:
            return site_ep in text
        try:
            self.client().get_endpoint(site_ep)
        except globus_sdk.GlobusAPIError as probe:
            return probe.http_status == 404
        except Exception:  # noqa: BLE001 - cannot tell: the submission's own error is reported
            return False
        return False

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        statuses: dict[str, TaskStatus] = {}
        try:
            client = self.client()
            for start in range(0, len(task_ids), TASK_LIST_LIMIT):
                chunk = list(task_ids[start:start + TASK_LIST_LIMIT])
                page = client.task_list(filter={"task_id": chunk}, limit=len(chunk))
                for doc in page["DATA"]:
                    statuses[str(doc["task_id"])] = self._status(client, doc)
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None
        return statuses

    def _status(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any]) -> TaskStatus:
        info = {k: doc.get(k) for k in ("files", "files_transferred", "files_skipped", "bytes_transferred",
                                        "effective_bytes_per_second", "faults") if doc.get(k) is not None}
        status = doc.get("status")
        if status == "SUCCEEDED":
            errors: dict[str, str] = {}
            stage_in = self._direction(doc) == TransferDirection.stage_in
            if doc.get("subtasks_skipped_errors"):
                # Every page: an error left on a later one would leave its file's item done.
                for skipped in client.paginated.task_skipped_errors(doc["task_id"]).items():
                    dest = str(skipped.get("destination_path") or "")
                    # A stage-out's destination is the location's path, even on the site's own
                    # collection (another directory of it): only a stage-in writes site paths.
                    key = self.from_endpoint(dest) if stage_in else dest
                    errors[key] = one_line(f"{skipped.get('error_code', 'error')}: "
                                           f"{skipped.get('error_details') or skipped.get('source_path')}")
            return TaskStatus(TaskState.done, info=info, file_errors=errors)
        if status == "FAILED":
            fatal = doc.get("fatal_error") or {}
            reason = fatal.get("description") or fatal.get("code") or doc.get("nice_status_short_description") or "failed"
            return TaskStatus(TaskState.failed, one_line(f"Globus task {doc['task_id']} failed: {reason}"), info=info)
        if status == "INACTIVE":
            why = doc.get("nice_status_short_description") or doc.get("nice_status") or "paused"
            return TaskStatus(TaskState.inactive, one_line(f"{why}; if credentials expired run `{self._command()}`"), info=info)
        nice = doc.get("nice_status")
        reason = ""
        if nice and nice not in NICE_OK:
            info["nice_status"] = nice
        if doc.get("is_paused") or (nice and nice not in NICE_OK):
            # Globus retries a fault (a permission denied, an endpoint error) until the deadline, and
            # an admin's pause holds the task: say so, or it reads as slow for hours.
            what = doc.get("nice_status_short_description") or nice or "paused"
            details = ", ".join(filter(None, (nice if nice and nice != what else "",
                                              f"{doc['faults']} faults so far" if doc.get("faults") else "")))
            state = "paused in Globus" if doc.get("is_paused") else "Globus keeps retrying"
            reason = one_line(f"{state}: {what}{f' ({details})' if details else ''}")
        return TaskStatus(TaskState.active, info=info, reason=reason)

    def cancel_task(self, task_id: str) -> None:
        try:
            response = self.client().cancel_task(task_id)
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None
        if str(response.get("code") or "") == "TaskComplete":
            # Said apart from a cancel: the agent logs that it had already run to its end.
            raise TransferError(f"Globus task {task_id} had already finished", retryable=False)
