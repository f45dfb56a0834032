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
- Errors: consent required, missing or expired/revoked credentials become one line naming the exact
  ``balsam site globus-login -e ...`` command (with ``--tokens-file PATH`` when ``tokens_file`` is
  not the default), retryable (the items wait, their jobs do not fail);
  5xx, 429 and network errors are retryable; other 4xx are not.

Task ids are Globus's own, so an agent restarted after a crash resumes polling them.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
import globus_sdk
from globus_sdk.transport import RetryConfig

from balsam.options import option
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

from .auth import load_tokens, login_command, save_tokens, tokens_path

__all__ = ["GlobusOptions", "GlobusTransfer", "globus_error"]

SYNC_LEVELS = ("exists", "size", "mtime", "checksum")
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


def globus_error(exc: BaseException, collections: Sequence[str], tokens_file: Optional[Path] = None) -> TransferError:
    """One TransferError for anything globus-sdk raises (``tokens_file``: the file the agent reads)."""
    command = login_command(collections, tokens_file)
    if isinstance(exc, globus_sdk.GlobusAPIError):
        code = str(exc.code or "")
        status = exc.http_status
        if code == "ConsentRequired" or getattr(getattr(exc, "info", None), "consent_required", None):
            return TransferError(f"Globus needs your consent to reach these collections: run `{command}`", retryable=True)
        if isinstance(exc, globus_sdk.AuthAPIError) or status == 401 or code in ("AuthenticationFailed", "invalid_grant"):
            return TransferError(f"Globus credentials expired or were revoked: run `{command}`", retryable=True)
        message = one_line(getattr(exc, "message", "") or exc.text or exc.http_reason or "")
        if status >= 500 or status == 429:
            return TransferError(f"Globus Transfer unavailable (HTTP {status} {code}): {message}", retryable=True)
        return TransferError(f"Globus refused the request (HTTP {status} {code}): {message}", retryable=False)
    if isinstance(exc, (globus_sdk.NetworkError, globus_sdk.GlobusConnectionError)):
        return TransferError(f"cannot reach Globus: {type(exc).__name__}", retryable=True)
    return TransferError(f"globus: {type(exc).__name__}: {one_line(exc)}", retryable=True)


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
        self._lock = threading.Lock()
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
        return globus_error(exc, self._collections, self.tokens_path())

    def client(self) -> globus_sdk.TransferClient:
        with self._lock:
            if self._client is None:
                path = self.tokens_path()
                try:
                    tokens = load_tokens(path)
                except ValueError as exc:
                    raise TransferError(f"{exc}: run `{self._command()}`", retryable=True) from None
                if tokens is None:
                    raise TransferError(f"not logged in to Globus ({path} missing): run `{self._command()}`", retryable=True)

                def on_refresh(response: globus_sdk.OAuthRefreshTokenResponse) -> None:
                    fresh = response.by_resource_server.get("transfer.api.globus.org") or {}
                    if fresh.get("access_token"):
                        save_tokens(path, {**tokens, "access_token": fresh["access_token"],
                                           "refresh_token": fresh.get("refresh_token") or tokens["refresh_token"],
                                           "expires_at_seconds": fresh.get("expires_at_seconds")})

                authorizer = globus_sdk.RefreshTokenAuthorizer(
                    tokens["refresh_token"], globus_sdk.NativeAppAuthClient(tokens["client_id"], app_name="balsam"),
                    access_token=tokens.get("access_token"), expires_at=tokens.get("expires_at_seconds"),
                    on_refresh=on_refresh,
                )
                self._client = globus_sdk.TransferClient(
                    authorizer=authorizer, app_name="balsam", retry_config=RetryConfig(max_retries=self.options.http_retries)
                )
            return self._client

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
        prefix, site = self.options.endpoint_site_path, self.site_path
        if not prefix or not site:
            return path
        rel = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(prefix))
        return os.path.normpath(os.path.join(site, rel))

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
            raise self._error(exc) from None
        return str(response["task_id"])

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
            if doc.get("subtasks_skipped_errors"):
                # Every page: an error left on a later one would leave its file's item done.
                for skipped in client.paginated.task_skipped_errors(doc["task_id"]).items():
                    dest = str(skipped.get("destination_path") or "")
                    key = self.from_endpoint(dest) if str(doc.get("destination_endpoint_id")) == str(self.options.endpoint_id) else dest
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
        if nice and nice not in ("Queued", "OK"):
            info["nice_status"] = nice
        return TaskStatus(TaskState.active, info=info)

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
