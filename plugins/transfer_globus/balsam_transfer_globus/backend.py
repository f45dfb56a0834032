"""The ``globus`` transfer backend: a batch of files is one Globus Transfer task.

- ``submit``: one ``TransferData`` (``sync_level``, ``verify_checksum``, ``encrypt_data``,
  ``skip_source_errors`` so one missing file does not sink its batch, ``fail_on_quota_errors`` so a
  full quota fails the task at once instead of Globus retrying it until the deadline) between the
  location's collection (``globus://<collection-id>``) and this site's (``endpoint_id``, set by
  ``transfers.globus_endpoint_id``). Site-side paths are rewritten from the site directory to
  ``endpoint_site_path`` when the endpoint sees the site under another prefix; every file is always
  added (Balsam 0.7 submitted an empty batch when that setting was unset). The task gets a Globus
  ``deadline`` (see :func:`globus_deadline`): ``task_timeout_sec`` (``transfers.task_timeout_sec``,
  through ``section_keys``) plus room for the time it may wait in Globus's queue, so Globus stops a
  task the agent gives up on even when the agent cannot reach Globus to cancel it, without cutting
  short a task that waited its turn (the agent's own deadline counts from the task's start).
- ``poll``: one ``task_list`` call per TASK_FILTER_LIMIT (50) in-flight task ids, the most one
  filter may name (a call that fails costs its own tasks only: they stay ``active`` with the
  reason and ``unread``; the poll raises when no call answered, asking no more when the first
  FAILED_CHUNKS_IN_A_ROW failed, or on a rate limit; see GlobusTransfer._task_list); a succeeded task with skipped
  files costs ``task_skipped_errors`` calls (one per page of errors), which name the failed files
  (a file inside a directory item is named by its own path; the agent files it under that item;
  a home-directory path Globus reports resolved is named as submitted, see :func:`_skipped_keys`,
  the home read as for a failed task's delivered files; a path several items write, nested items
  too, is the item's whose source Globus reports, else each holder's, filed under a name the agent
  gives that item: an outer directory item's own dest for its file inside an inner item; one
  that may be a home item's while that home cannot be read fails a try of every item of the task;
  after an agent restart the task's items are not known here: each file is named by the path Globus
  reports and the status says ``file_errors_attributed`` False, so that the agent charges it to
  every item that may hold it, nested ones included).
  A task whose outcome needs such calls (also a failed task's delivered files and last event) and
  whose calls fail is reported ``active`` with the reason that poll, read again at the next; the
  poll's other tasks settle. A finished task's status, once read, is remembered (while its document
  is the same) and not read again should the agent's update of its items fail.
  A task the list leaves out is not taken for gone (the agent would submit its files a second time
  while it runs): it costs one ``get_task`` call (rare: a task is listed only to the identity that
  submitted it, so a login with another identity, or a linked one, hides it). A 404 makes it
  ``unknown``; found, its own status; a 403 (not the logged-in identity's) or any other error keeps
  it ``active`` with the reason (the agent's deadline ends it if it stays so).
  An ``ACTIVE`` task whose ``nice_status`` is ``Queued`` (Globus runs a few tasks of a user at once,
  the others wait) is reported ``queued``, with QUEUED_REASON as its ``reason`` (shown on its items;
  the agent does not take it for a task that is not moving): the agent's deadline counts from its start.
- A ``FAILED`` task (a fatal error, its deadline, a cancel) that had delivered some files is
  reported ``done`` with ``file_errors`` naming each file it did not deliver (with the task's
  fatal error and last fault): the agent retries those alone. Which files arrived is read from
  ``task_successful_transfers`` (one call per page, never one per file), against the files this
  process submitted in the task; a directory item counts as not delivered (Globus lists the files
  it copied, not whether the directory is complete), as does a file skipped because it was already
  in sync (not listed either: its retry is a quick no-op). A task none of whose files arrived, or
  submitted by an earlier agent process (its file list is not known), is ``failed`` as a whole.
  Both sides are compared normalized (``~/`` as ``/~/``, ``.`` and ``..`` collapsed as Globus reports
  them; a ``/~/`` destination, as submitted or made by ``endpoint_site_path``, also matches the
  path Globus reports once it resolved that home: the collection's home directory is read from
  Globus, one ``operation_ls`` of ``/~/`` per collection and login for the backend's life (see
  GlobusTransfer._home; an ls that fails for a moment, 5xx, 429 or the network, keeps the task
  active until the next cycle, and is not asked again in the same poll; a 5xx ``ExternalError`` or
  ``EndpointError``, the collection's own trouble, is a home unknown for HOME_RECHECK_SEC), never
  guessed from the reported paths; a path two items write
  delivers neither, nor, while that home cannot be read, a path reported otherwise than in home
  form that may be a home item's); a task that delivered files none of which matches logs one
  warning. A task's files are remembered until no poll has named it
  for FORGET_AFTER_POLLS polls and FORGET_AFTER_SEC.
- A task cancelled outside balsam (by its owner, e.g. in the Globus web app: ``fatal_error``
  ``CANCELED`` without balsam having asked for it; or by a collection's administrator:
  ``canceled_by_admin``) is not retried: someone meant it to stop. The files it delivered are done
  (read as for a failed task: ``done`` with ``file_errors`` and ``file_errors_retryable`` False), the
  others fail for good, their jobs FAILED with who cancelled it and the administrator's message; one
  that delivered nothing (or whose files this process does not know) is ``failed``, not retryable. A cancel the agent asked for
  (``cancel_task``: its deadline, deleted jobs) is known by the task ids this process cancelled;
  after a restart, by the task having ended at least ``task_timeout_sec`` after its submission
  (the agent's deadline cannot fire earlier): those are retryable, as the agent's deadline is.
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
  the access token) and network errors are retryable (a 429's or 503's ``Retry-After``, at most
  MAX_RETRY_AFTER_SEC, goes with the error as ``retry_after_sec``: globus-sdk's own retries wait at
  most 10 s, and the agent then holds its calls off for the rest); so is a 404 for this site's own collection
  (``transfers.globus_endpoint_id`` is wrong: a settings error, the items wait for it to be fixed),
  that setting missing (the same), and a submission's 409 "A transfer with identical paths has not yet completed" (an earlier task
  of the login still writes those paths: one cancelled at the agent's deadline that Globus is still
  stopping, another job's, or one started outside balsam; see _paths_still_written): that error is
  ``batch_only`` (the location's other batches go on; Globus started no task of its submission id)
  and retryable for at most the Globus deadline span of a balsam task from the first such refusal
  of the id, then not (its files fail a try; see GlobusTransfer._paths_conflict). Other 4xx are not.
- Retries: ``http_retries`` bounds the retries of a request that failed with 5xx/429 or a network
  error; a 401 is always retried once with a refreshed access token (globus-sdk refreshes as a
  retry, which ``http_retries: 0`` used to forbid: a revoked access token then read as a revoked
  login for ever). globus-sdk's transport logs a WARNING of its own for every request that fails
  ("request reached max retries, ...", naming nothing): the backend sets ``globus_sdk.transport``
  to ERROR when it is built (unless configured otherwise), the agent logging each failure itself.
- Logging in again while the agent runs: after a credentials or consent error the client is dropped,
  and the next call builds one from the tokens file; a tokens file whose refresh token changed (a
  new ``globus-login``) replaces the client at the next call too. Refreshed access tokens are written
  back (0600, one rename) only while the file still holds the refresh token the agent last wrote or
  read there: a newer login in the file is never overwritten; one that cannot be written (a full or
  read-only file system) is used from memory, with a warning, rather than failing the request it was
  for, and written (a rotated refresh token with it) at the next refresh that can be. A refresh
  token Globus Auth refused (HTTP 400/401 ``invalid_grant``, ``invalid_client`` or
  ``unauthorized_client``: revoked, expired) is not sent again while the tokens file is unchanged,
  for at most LOGIN_REFUSED_RECHECK_SEC: the same error is answered without a call (it was a
  refused refresh per call, all night). Another 4xx (a proxy's page) is not remembered. A refusal is
  that of the login whose request it was: one of a login replaced meanwhile (a request that took its
  client before a new ``globus-login`` was picked up) neither locks out nor drops the new one.
- Task status: an ``ACTIVE`` task that Globus reports as not progressing (a fault it keeps retrying,
  e.g. ``PERMISSION_DENIED``) or paused (``is_paused``, e.g. by an administrator) carries that as its
  ``reason`` (shown on its items, logged once by the agent: the reason holds no counter, the
  number of faults is in ``info``).

Task ids are Globus's own, so an agent restarted after a crash resumes polling them.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import logging
import math
import os
import posixpath
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import attrs
import globus_sdk
from globus_sdk import gare as globus_gare
from globus_sdk.transport import RetryCheckResult, RetryConfig, RetryContext

from balsam.options import option
from balsam.states import TransferDirection
from balsam.transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

from .auth import TRANSFER_RESOURCE_SERVER, load_tokens, login_command, save_tokens, tokens_path
from .ids import canonical_id, is_uuid

__all__ = ["GlobusOptions", "GlobusTransfer", "globus_error"]

logger = logging.getLogger(__name__)

SYNC_LEVELS = ("exists", "size", "mtime", "checksum")
#: The direction in the labels submit_batch gives its tasks ("<label> stage-in (3 files)", "... (2 files,
#: 1 directory)", "... (3 directories)"; "(N files)" for every item of tasks of earlier versions).
LABEL_DIRECTION = re.compile(r"\bstage-(in|out) \(\d+ (?:files?|director(?:y|ies))(?:, \d+ director(?:y|ies))?\)$")
#: nice_status of an ACTIVE task that is progressing.
NICE_OK = ("OK",)
#: nice_status of an ACTIVE task waiting for its turn: Globus runs at most
#: GLOBUS_RUNNING_TASKS_PER_USER transfer tasks of a user at once, the others wait, ACTIVE and
#: "Queued" (docs.globus.org/api/transfer/task_behavior). Not started: reported ``queued``.
NICE_QUEUED = "Queued"
GLOBUS_RUNNING_TASKS_PER_USER = 3
#: The reason a queued task's items show (``TaskStatus.reason`` of a ``queued`` task).
QUEUED_REASON = (f"queued by Globus: it runs at most {GLOBUS_RUNNING_TASKS_PER_USER} transfer tasks of a user at "
                 "once, the others wait their turn")
#: Added to a task's Globus deadline so that the agent's own (checked once a cycle, then a cancel
#: call) always comes first while the agent can reach Globus.
DEADLINE_MARGIN_SEC = 600
#: The longest hold-off a ``Retry-After`` header is taken for (a bogus one must not stop transfers
#: for a day): the agent asks again after that.
MAX_RETRY_AFTER_SEC = 3600.0
#: Globus task_list answers at most this many tasks per call.
TASK_LIST_LIMIT = 1000
#: The most task ids one ``task_list`` ``task_id`` filter may name (Globus Transfer's task list:
#: "comma separated list of task ids, limit 50"; more is refused with a 400). A poll of more tasks in
#: flight (``max_concurrent_transfers`` above 50) is one call per 50 ids: one call for all of them
#: was refused every cycle, every task stuck "cannot poll its task" until its deadline cancelled it.
TASK_FILTER_LIMIT = 50
#: A poll whose first this many ``task_list`` calls all failed asks no more and raises (an outage, or a
#: login refused: each further call would fail the same way, after its retries). Once a call has
#: answered, every chunk is asked.
FAILED_CHUNKS_IN_A_ROW = 2
#: transfers.task_timeout_sec's default, for a backend built without it: how long a batch Globus
#: refuses for paths another task still writes may wait for that task (see _conflict_wait).
DEFAULT_TASK_TIMEOUT_SEC = 21600.0
#: The most ``http_retries``: globus-sdk sleeps between retries (exponential, up to 10 s each), all
#: inside the agent's cycle; 10 retries already hold one request about a minute, and a cycle makes
#: several. Past that, the next cycle trying again is the better retry.
MAX_HTTP_RETRIES = 10
#: The OAuth errors (RFC 6749 5.2) of Globus Auth's answer to a refresh that refuse the login itself:
#: the refresh token is revoked or expired, or the client is unknown or may not use it.
LOGIN_REFUSED_ERRORS = ("invalid_grant", "invalid_client", "unauthorized_client")
#: A refused login is answered without a call for at most this long while the tokens file is
#: unchanged (a new login replaces the file at once): Globus Auth is then asked again, in case it
#: refused by mistake (an outage answering 400) or the login was restored.
LOGIN_REFUSED_RECHECK_SEC = 900.0
#: The most collections whose home directory (one ``operation_ls`` each) the backend remembers.
HOME_CACHE_SIZE = 256
#: A home directory that could not be read is asked again after this long, not once per task per poll.
HOME_RECHECK_SEC = 300.0
#: fatal_error code of a cancelled task.
CANCELED = "CANCELED"
#: After an agent restart, a cancelled task that ran at least task_timeout_sec minus this after its
#: submission may have been cancelled by the previous agent's deadline (whose clock starts at the
#: cycle before the submission, on another host's clock): taken for balsam's cancel.
CANCEL_SLACK_SEC = 300
#: A task the backend remembers (its files, whether it cancelled it, its final status) is forgotten
#: once this many successful polls in a row did not ask about it (it left the agent's in-flight
#: items) *and* FORGET_AFTER_SEC went by since one did. Polls alone were no clock: the agent polls a
#: task once more after each deadline cancel (one call naming that task), so 3 cancels in one cycle
#: made the backend forget the file lists of the other tasks in flight (their next partial failure
#: then failed and resent every file, "not known after an agent restart"). A task in flight is named
#: by every cycle's poll, so it is never that long unasked.
FORGET_AFTER_POLLS = 3
FORGET_AFTER_SEC = 900.0
#: globus-sdk's transport logger: a WARNING per failed request, naming nothing (see the module doc).
SDK_TRANSPORT_LOGGER = "globus_sdk.transport"
#: Who cancelled a task, by its canceled_by_admin value.
ADMIN_SIDES = {"SOURCE": "the source collection's administrator",
               "DESTINATION": "the destination collection's administrator",
               "BOTH": "the administrators of both collections"}


def _sync_level(instance: Any, attribute: Any, value: str) -> None:
    if value not in SYNC_LEVELS:
        raise ValueError(f"expected one of {', '.join(SYNC_LEVELS)}, got {value!r}")


def _positive_or_none(instance: Any, attribute: Any, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be more than 0, got {value!r}")


def _collection_id(instance: Any, attribute: Any, value: Optional[str]) -> None:
    # Also reached through transfers.globus_endpoint_id (section_keys), whose refusal may be
    # reported under backend_options.globus: the message names both keys.
    if value is not None and not _is_uuid(value):
        raise ValueError(f"expected a Globus collection UUID (transfers.globus_endpoint_id or "
                         f"backend_options.globus.endpoint_id), got {value!r}")


def _client_id(instance: Any, attribute: Any, value: Optional[str]) -> None:
    if value is not None and not _is_uuid(value):
        raise ValueError(f"expected the UUID of a native app registered at app.globus.org, got {value!r}")


def _endpoint_path(instance: Any, attribute: Any, value: Optional[str]) -> None:
    # A collection path is absolute ("/..." or "/~/..." for the home directory; "~/..." too): a
    # relative one would make every site path of every task a path Globus resolves elsewhere.
    if value is not None and not (isinstance(value, str) and value.startswith(("/", "~/")) or value == "~"):
        raise ValueError(f"expected an absolute path on the site's collection (e.g. /~/balsam-site or "
                         f"/projects/me/site; transfers.globus_endpoint_site_path sets it too), got {value!r}")


def _http_retries(instance: Any, attribute: Any, value: int) -> None:
    # More than MAX_HTTP_RETRIES is accepted (Balsam took any number before the bound came: an agent
    # must not stop at its start after an upgrade) and used as MAX_HTTP_RETRIES, with one warning
    # when the backend is built (see GlobusTransfer._build_client).
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a number of retries, 0 or more (more than {MAX_HTTP_RETRIES} is used as "
                         f"{MAX_HTTP_RETRIES}), got {value!r}")


def _at_least_one(instance: Any, attribute: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")


@attrs.frozen
class GlobusOptions:
    endpoint_id: Optional[str] = option(
        None, "Globus collection id of this site's file system (transfers.globus_endpoint_id sets it too).",
        validator=_collection_id,
    )
    endpoint_site_path: Optional[str] = option(
        None, "The site directory as that collection sees it (an absolute collection path such as /~/balsam-site), "
        "when it differs from the local path (transfers.globus_endpoint_site_path sets it too).",
        validator=_endpoint_path,
    )
    client_id: Optional[str] = option(
        None, "Native-app client id (a UUID) `balsam site globus-login` uses (the agent uses the one saved with "
        "the tokens).", validator=_client_id,
    )
    tokens_file: Optional[str] = option(None, "Tokens written by `balsam site globus-login` (default $BALSAM_HOME/globus-tokens.json; "
                                        "a relative path is relative to the site directory).")
    sync_level: str = option("size", "Skip files already at the destination with the same: exists, size, mtime or checksum.",
                             validator=_sync_level)
    verify_checksum: bool = option(True, "Globus verifies each file's checksum after transfer.")
    encrypt_data: bool = option(True, "Encrypt data on the wire.")
    preserve_timestamp: bool = option(False, "Keep source modification times.")
    label: str = option("balsam", "Prefix of the task labels shown in the Globus web app.")
    fail_on_quota_errors: bool = option(
        True, "A destination over its quota fails the task at once (its files then fail a try each) instead of "
        "Globus retrying it until the deadline (task_timeout_sec, 6 h by default, for every try).")
    task_timeout_sec: Optional[float] = option(
        None, "The agent's deadline of a task from its start (transfers.task_timeout_sec sets it): the Globus "
        "deadline of each task is this plus room for waiting in Globus's queue. null: no Globus deadline.",
        validator=_positive_or_none)
    max_concurrent_transfers: int = option(
        5, "Tasks in flight at once (transfers.max_concurrent_transfers sets it): how long a task may wait in "
        "Globus's queue, and so its Globus deadline.", validator=_at_least_one)
    http_retries: int = option(3, f"Retries (at most {MAX_HTTP_RETRIES} are made) of a Globus request that failed with 5xx/429 or a "
                               "network error, within one cycle (then the next cycle tries again). A 401 is always "
                               "retried once with a refreshed access token.", validator=_http_retries)


def globus_deadline(submitted: dt.datetime, task_timeout_sec: float, max_concurrent_transfers: int) -> dt.datetime:
    """The Globus ``deadline`` of a task submitted at ``submitted``.

    The agent's deadline counts ``task_timeout_sec`` from the task's *start*, and a Globus task may
    wait, ``Queued``, while the user's first GLOBUS_RUNNING_TASKS_PER_USER tasks run. A deadline of
    submission + ``task_timeout_sec`` cut such a task short (Globus failed it after it had run for
    only part of its time). Of the agent's own tasks (at most ``max_concurrent_transfers`` in
    flight), the ones running when a task is submitted stop within ``task_timeout_sec`` (the agent
    cancels them), freeing their 3 places, and so does each later round of them: a new task has
    at most ``max_concurrent_transfers - 1`` ahead of it and starts within
    ceil((max_concurrent_transfers - 3) / 3) rounds of ``task_timeout_sec``. The deadline leaves
    that much room, one ``task_timeout_sec`` to run, and DEADLINE_MARGIN_SEC. Tasks of the same Globus user outside balsam can still make one wait
    longer: Globus then fails it at this deadline, its delivered files done, the others retried.
    """
    waiting = max(0, max_concurrent_transfers - GLOBUS_RUNNING_TASKS_PER_USER)
    rounds = math.ceil(waiting / GLOBUS_RUNNING_TASKS_PER_USER)
    return submitted + dt.timedelta(seconds=task_timeout_sec * (1 + rounds) + DEADLINE_MARGIN_SEC)


def _retry_config(http_retries: int) -> RetryConfig:
    """A RetryConfig retrying 5xx/429 and network errors ``http_retries`` times, and a 401 once with
    a refreshed access token whatever ``http_retries`` is (globus-sdk's refresh is a retry: with
    max_retries 0 the token was dropped but never refreshed before the request failed). One per
    client: the client adds its standard checks to it."""
    config = RetryConfig(max_retries=http_retries + 1)

    def within_http_retries(ctx: RetryContext) -> RetryCheckResult:
        response = ctx.response
        if response is not None and response.status_code in config.expired_authorization_status_codes:
            ctx.backoff = 0.0  # a new token needs no wait; globus-sdk's own check decides, once
            return RetryCheckResult.no_decision
        if ctx.attempt >= http_retries:
            return RetryCheckResult.do_not_retry
        return RetryCheckResult.no_decision

    config.checks.register_check(within_http_retries)
    return config


def _quiet_sdk_transport() -> None:
    """globus-sdk's transport logs "request reached max retries, done (fail, response)" or "request
    done (fail, error)" at WARNING for every failing request (~720 lines an hour of an outage at a
    5 s cycle), naming neither the request nor the error: the agent logs each failure itself, once
    per reason. Left alone when someone configured that logger."""
    sdk_logger = logging.getLogger(SDK_TRANSPORT_LOGGER)
    if sdk_logger.level == logging.NOTSET:
        sdk_logger.setLevel(logging.ERROR)


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
            # globus-sdk's own retries waited at most 10 s of a longer Retry-After: the agent waits
            # the rest rather than ask again next cycle.
            return TransferError(f"{service} unavailable (HTTP {' '.join(map(str, filter(None, (status, code))))}): "
                                 f"{message}", retryable=True, retry_after_sec=_retry_after(exc)), False
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


def _paths_still_written(exc: BaseException) -> bool:
    """Whether Globus refused a submission because a task of the same user with identical paths has
    not completed (HTTP 409 ``Conflict``, "A transfer with identical paths has not yet completed"):
    a task the agent cancelled at its deadline that is still stopping (Globus cancels asynchronously
    past 10 s, "CancelAccepted": a hung endpoint's task), or one started outside balsam. It ends on
    its own (at the latest at its Globus deadline): the batch waits, its files use no try, for at
    most the Globus deadline span of a balsam task (see GlobusTransfer._paths_conflict). Taken for
    a refusal, each retry of a file after a slow cancel failed a try on it, and its job FAILED."""
    return (isinstance(exc, globus_sdk.TransferAPIError) and exc.http_status == 409
            and "identical paths" in str(getattr(exc, "message", "") or exc.text or ""))


def _answer(exc: BaseException) -> str:
    """What Globus answered, for a message: ``(HTTP 409 Conflict): <its message>``. A body that is
    not JSON (a proxy's, a plain-text error) has no code nor message: ``(HTTP 409): <its text>``
    (it read ``(HTTP 409 None): None``)."""
    code = str(getattr(exc, "code", "") or "")
    status = " ".join(filter(None, (f"HTTP {getattr(exc, 'http_status', '')}", code)))
    message = one_line(getattr(exc, "message", "") or getattr(exc, "text", "") or getattr(exc, "http_reason", "") or "")
    return f"({status}): {message}" if message else f"({status})"


def _duration(seconds: float) -> str:
    """``12 h 10 min``, ``12 min``: a wait, for a message."""
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _login_refused(exc: BaseException) -> bool:
    """Whether Globus Auth refused the login itself: a 400 or 401 answer to the refresh of the access
    token whose OAuth ``error`` is LOGIN_REFUSED_ERRORS (a revoked or expired refresh token, an
    unknown client). Any other 4xx (a proxy's 403 or 407 page, a 408, a 404 during maintenance) says
    nothing of the login: taken for a refusal, it locked the agent out of Globus until the tokens
    file changed, though the next call would have worked. Nor an outage (5xx, 429) or a Transfer
    refusal (a consent, a session: other collections may work)."""
    if not isinstance(exc, globus_sdk.AuthAPIError) or exc.http_status not in (400, 401):
        return False
    body = exc.raw_json if isinstance(exc.raw_json, dict) else {}
    # OAuth errors carry their name in the body's "error" (globus-sdk leaves ``code`` None for them).
    return str(body.get("error") or exc.code or "") in LOGIN_REFUSED_ERRORS and _authorization_parameters(exc) is None


def _retry_after(exc: BaseException, now: Optional[dt.datetime] = None) -> Optional[float]:
    """The seconds a response's ``Retry-After`` header asks to wait (seconds or an HTTP date), at
    most MAX_RETRY_AFTER_SEC; None when there is none, or it is unreadable or past."""
    headers = getattr(exc, "headers", None)
    value = headers.get("Retry-After") if headers is not None and hasattr(headers, "get") else None
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_SEC)


def _site_collection_unknown(site_endpoint: str, code: str) -> TransferError:
    # A typo in settings.yml, not the jobs' fault: they wait (as for bad backend options) instead
    # of max_concurrent_transfers x transfer_batch_size jobs failing per cycle.
    return TransferError(f"Globus does not know this site's collection {site_endpoint} (HTTP 404 {code}): "
                         "check transfers.globus_endpoint_id in settings.yml, then restart the agent", retryable=True)


def _site_collection_unset() -> TransferError:
    # As for a collection Globus does not know: settings.yml's omission, not the jobs' fault (taken
    # for a refusal, each batch's files failed a try per cycle and their jobs FAILED within minutes).
    return TransferError("globus: transfers.globus_endpoint_id (this site's Globus collection id) is not set in "
                         "settings.yml: set it, then restart the agent", retryable=True)


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
    #: The refresh token last known to be in the file (read, or written by this backend): it differs
    #: from ``refresh_token`` while a rotated one could not be saved (a full file system). Whether
    #: the file still holds this login is judged by it: by ``refresh_token``, the file read as a
    #: newer login after one failed save, and the rotated token was never saved afterwards.
    saved_refresh_token: str = ""
    #: Which login this is, in this process (see _login_id): not derived from the refresh token,
    #: which Globus may rotate on any access-token refresh (the same login all the same).
    serial: int = 0


class _LoginAuthorizer(globus_sdk.RefreshTokenAuthorizer):
    """A RefreshTokenAuthorizer whose failed refresh names its login (``balsam_login`` on the error):
    a request may fail after another thread built a client from a newer login, and the refusal is
    the request's login's, not the current one's (see GlobusTransfer._error)."""

    def __init__(self, login: "_Login", *args: Any, **kwargs: Any) -> None:
        self.balsam_login = login
        super().__init__(*args, **kwargs)

    def _get_token_response(self) -> globus_sdk.OAuthRefreshTokenResponse:
        try:
            return super()._get_token_response()
        except globus_sdk.GlobusAPIError as exc:
            exc.balsam_login = self.balsam_login  # type: ignore[attr-defined]
            raise


#: Serials of the logins of this process's clients.
_LOGIN_SERIALS = itertools.count(1)


def _login_id(login: Optional[_Login]) -> Optional[int]:
    """Which login a client uses (None: an injected client). A client built anew from the login it
    replaces (the same refresh token, as rotated) keeps its id; a `globus-login` since gets a new one."""
    return None if login is None else login.serial


def _client_owner(client: Any) -> Any:
    """Whose home a client's ``ls /~/`` reads: its login's id (see _login_id), else (a client handed
    in) the client itself."""
    login = getattr(getattr(client, "authorizer", None), "balsam_login", None)
    return ("login", login.serial) if isinstance(login, _Login) else ("client", id(client))


#: Codes of Globus Transfer's 5xx answers that are no outage of Globus but the collection's own
#: trouble (its endpoint disconnected or refusing: "Unable to scan endpoint"): globus-sdk does not
#: retry them ("unlikely to actually be transient"), and neither does the home's ls every cycle.
NOT_TRANSIENT_CODES = ("ExternalError", "EndpointError")


def _transient(exc: BaseException) -> bool:
    """Whether a failed request may work at the next cycle as it is: Globus down (5xx), rate limited
    (429, or any answer with a Retry-After), the network. Not a refusal (403, 404), a consent, a
    session or credentials to renew (a new login), an unreadable answer, nor a 5xx that is the
    collection's own error (NOT_TRANSIENT_CODES: its endpoint may stay unreachable for hours)."""
    if isinstance(exc, globus_sdk.GlobusAPIError):
        if exc.http_status != 429 and any(code in str(exc.code or "") for code in NOT_TRANSIENT_CODES):
            return False
        return exc.http_status >= 500 or exc.http_status == 429 or _retry_after(exc) is not None
    return isinstance(exc, (globus_sdk.NetworkError, globus_sdk.GlobusConnectionError))


#: Strict (ids.UUID_TEXT, not uuid.UUID: a mistyped id is refused, not read as another one); shared
#: with ``balsam site globus-login``.
_is_uuid = is_uuid
#: A collection id as Globus writes it (lowercase, hyphenated), else as written (check_location refuses it).
_canonical_id = canonical_id


def _norm(path: str) -> str:
    """A collection path without repeated or trailing slashes, ``.`` or ``..`` (Globus reports
    ``/proj/run/../x`` as ``/proj/x``: compared as written, it matched no item), ``~/...`` written
    ``/~/...`` (how it is compared: Globus takes both for the home directory). A home path is
    normalized after ``/~`` only: ``/~/../group/x`` climbs out of the home (``/home/group/x`` for
    a home of ``/home/me``), which normpath of the whole path made ``/group/x``, another path."""
    text = str(path)
    if text == "~" or text.startswith("~/"):
        text = "/" + text
    if not text:
        return "/"
    if _is_home(text):
        rest = posixpath.normpath(text[len("/~/"):] or ".").lstrip("/")
        return "/~" if rest in ("", ".") else f"/~/{rest}"
    # normpath also drops repeated and trailing slashes, but keeps a leading "//" (POSIX).
    text = posixpath.normpath(text)
    return "/" + text.lstrip("/") if text.startswith("//") else text


def _is_home(path: str) -> bool:
    """Whether a collection path (``~/`` written ``/~/``) is in the home directory (``/~`` itself too)."""
    return path == "/~" or path.startswith("/~/")


def _resolved(dest: str, home: str) -> str:
    """A normalized home path (``/~/...``) as Globus reports it once it resolved the home directory
    to ``home`` (absolute): ``home`` joined with the part after ``/~``, the whole normalized (a
    ``..`` climbing out of the home climbs out of ``home``); ``/~`` itself is ``home``."""
    return _norm(f"{home.rstrip('/')}/{dest[len('/~/'):]}")


def _parts(path: str) -> list[str]:
    """A normalized path's components, ``/`` being a prefix of every absolute path's ([""])."""
    return [""] if path == "/" else path.split("/")


class _Items:
    """A task's submitted items by every path Globus may report them at (the one helper of
    _delivered and _skipped_keys): the destination as submitted (normalized) and, for a home path
    (``/~/...``), the same resolved with ``home`` (the collection's home directory, read from
    Globus: see GlobusTransfer._home; None when it could not be). A directory item holds every path
    under it too (by whole components: ``/a/bc`` is not under ``/a/b``; everything absolute is under
    ``/``). Built in the items' components, each reported path then costs its own depth."""

    def __init__(self, sent: Sequence[tuple[str, str, bool]], home: Optional[str]) -> None:
        self.sent = sent
        #: Whether a reported path can be told from a home item's resolved one: not while the task
        #: has home items whose home is unknown (any absolute path may be one of them).
        self.certain = home is not None or not any(_is_home(dest) for dest, _, _ in sent)
        #: {component: node}; a node's None: [(item index, the spelling ending there)].
        self.trie: dict = {}
        for i, (dest, _, _) in enumerate(sent):
            spellings = [dest]
            if home is not None and _is_home(dest):
                spellings.append(_resolved(dest, home))
            for spelling in dict.fromkeys(spellings):
                node = self.trie
                for part in _parts(spelling):
                    node = node.setdefault(part, {})
                node.setdefault(None, []).append((i, spelling))

    def holders(self, path: str) -> dict[int, str]:
        """{item index: its spelling} of each item a reported (normalized) path is, or is under (a
        directory item): several when several items write that path (none is told apart)."""
        found: dict[int, str] = {}
        parts = _parts(path)
        node = self.trie
        for depth, part in enumerate(parts, 1):
            node = node.get(part)
            if node is None:
                break
            for i, spelling in node.get(None, ()):
                if depth == len(parts) or self.sent[i][2]:
                    found.setdefault(i, spelling)
        return found

    def certain_of(self, path: str) -> bool:
        """Whether the items holding ``path`` are all of them (see ``certain``): a path reported
        in home form (``/~/...``) is no other item's."""
        return self.certain or _is_home(path)


def _needs_home(sent: Sequence[tuple[str, str, bool]], paths: Iterable[str]) -> bool:
    """Whether telling the items of reported (normalized) paths needs the collection's home: the
    task has home items and Globus reported a path otherwise than in home form."""
    return any(_is_home(dest) for dest, _, _ in sent) and any(not _is_home(path) for path in paths)


def _delivered(sent: Sequence[tuple[str, str, bool]], arrived: Iterable[str], home: Optional[str] = None) -> set[str]:
    """The submitted destinations (normalized) among the delivered ones (``arrived``, normalized),
    each read by the one item it can be (see _Items): the same path, or for a home path
    (``/~/...``) ``home`` + the rest. A path two items write (two spellings of one destination, a
    file inside a directory item) delivers neither; a directory item counts as not delivered (its
    listed files say nothing of the ones missing). ``home`` None (not resolved): a home item counts
    only when Globus reported it in home form, and a path reported otherwise counts for no item (it
    may be a home item's: as _skipped_keys, only what cannot collide); nothing is guessed."""
    items = _Items(sent, home)
    found: set[str] = set()
    for path in arrived:
        if not items.certain_of(path):
            # Perhaps a home item's too (its home unknown): as _skipped_keys, no item is sure of it.
            continue
        held = items.holders(path)
        if len(held) == 1:
            (i,) = held
            if not sent[i][2]:
                found.add(sent[i][0])
    return found


def _skipped_keys(sent: Sequence[tuple[str, str, bool]], paths: Sequence[str], home: Optional[str] = None,
                  sources: Optional[Sequence[str]] = None, origins: Optional[Sequence[str]] = None
                  ) -> dict[str, list[str]]:
    """{a skipped file's destination as Globus reports it: the names the agent files its error
    under} for the paths that are a submitted destination or inside a submitted directory (see
    _Items; ``home``: the collection's home, resolved, or None): the item's ``dest``, or for a file
    inside a directory item its own path under the item's ``dest``. A path several items write (two
    spellings of one destination, nested items) is the item's whose source it came from when
    ``sources`` (the reported source of each path) and ``origins`` (each item's source as submitted,
    normalized) tell it, else each holder's. Each name is one the agent's matcher
    (match_file_errors: an item's own ``dest``, else the deepest directory item holding the path)
    gives to that item: a file of an outer directory item that lies inside an inner item is named by
    the outer item's ``dest`` (its own path was the inner item's alone, and the outer one was recorded
    done without it); see _attributed. A path left out matches no item for sure: none, or one a home
    item whose home is not known may be (the caller then fails a try of every item of the task:
    nothing is recorded done on a guess)."""
    found: dict[str, list[str]] = {}
    for path, names in zip(paths, _skipped_names(sent, paths, home, sources, origins)):
        if names:
            found.setdefault(path, [key for key, _ in names])
    return found


def _skipped_names(sent: Sequence[tuple[str, str, bool]], paths: Sequence[str], home: Optional[str] = None,
                   sources: Optional[Sequence[str]] = None, origins: Optional[Sequence[str]] = None
                   ) -> list[list[tuple[str, str]]]:
    """For each of ``paths``, as _skipped_keys: [(the name its error is filed under, the file's own
    path under that item's dest)] ([] when left out); the two differ where the item's dest names a
    file inside it (its error then says which file)."""
    items = _Items(sent, home)
    found: list[list[tuple[str, str]]] = []
    for n, path in enumerate(paths):
        norm = _norm(path)
        found.append([])
        if not items.certain_of(norm):
            continue
        held = {i: norm[len(spelling.rstrip("/")):] for i, spelling in items.holders(norm).items()}
        source = sources[n] if sources is not None and n < len(sources) and sources[n] else None
        reported = _norm(source) if source is not None else ""
        if (source is not None and origins is not None and len(held) > 1
                and all(i < len(origins) and _is_home(origins[i]) == _is_home(reported) for i in held)):
            # The source says whose file it is: the item that reads it at the same place under its
            # own source (a nested source too: the relative parts must agree). Not when a holder's
            # source is in home form (/~/...) and the reported one is not, or the other way round:
            # one file, spelled ~/src by one item, resolved by the other, named the latter alone.
            own = [i for i, rel in held.items() if i < len(origins) and origins[i]
                   and reported == _norm(origins[i].rstrip("/") + rel if rel else origins[i])]
            if own:
                held = {i: held[i] for i in own}
        for i, rel in held.items():
            own = sent[i][1]
            name = (_attributed(sent, i, rel, held), own.rstrip("/") + rel if rel else own)
            if name not in found[-1]:
                found[-1].append(name)
    return found


def _agent_path(path: str) -> str:
    """A dest as the agent's matcher compares it (match_file_errors: repeated and trailing slashes dropped)."""
    return re.sub("/+", "/", path).rstrip("/") or "/"


def _attributed(sent: Sequence[tuple[str, str, bool]], i: int, rel: str, held: Iterable[int]) -> str:
    """The name of item ``i``'s skipped file ``rel`` (under its dest; '' the dest itself) that the
    agent's matcher gives to item ``i`` and to no item outside ``held`` (the items charged with it):
    the file's own path when the matcher gives it to them (its exact dest, else the deepest directory
    item it is in), else item ``i``'s own dest (matched exactly: a file of an outer directory item
    inside an inner item's dest went to the inner item only)."""
    own = sent[i][1]
    key = own.rstrip("/") + rel if rel else own
    path = _agent_path(key)
    dests = [(_agent_path(d), recursive) for _, d, recursive in sent]
    exact = {j for j, (d, _) in enumerate(dests) if d == path}
    if exact:
        return key if i in exact and exact <= set(held) else own
    inside = [(len(d), j) for j, (d, recursive) in enumerate(dests)
              if recursive and path.startswith(d.rstrip("/") + "/")]
    deepest = max((n for n, _ in inside), default=-1)
    # The matcher gives it to one of the deepest: to item i for sure only when no other is as deep.
    return key if {j for n, j in inside if n == deepest} == {i} else own


def _absolute_home(absolute_path: Any, path: Any) -> Optional[str]:
    """The home directory from a listing of ``/~/`` (normalized): its ``absolute_path`` (Globus
    Transfer's file_list: the listed directory with ``~`` expanded), else its ``path`` when that is
    absolute and not in home form; None when neither says (nothing is guessed)."""
    for value in (absolute_path, path):
        if (isinstance(value, str) and value.startswith("/")
                and not any(part.startswith("~") for part in value.split("/"))):
            return _norm(value)
    return None


def _counted(files: Sequence[TransferFile]) -> str:
    """A task's items in its label: "3 files", "2 files, 1 directory", "3 directories" (a directory
    item is no file: "3 files" for 3 directories read as 3 files in the Globus web app)."""
    dirs = sum(1 for f in files if f.recursive)
    plain = len(files) - dirs
    parts = [f"{plain} file{'' if plain == 1 else 's'}"] if plain or not dirs else []
    if dirs:
        parts.append(f"{dirs} director{'y' if dirs == 1 else 'ies'}")
    return ", ".join(parts)


def _final_key(doc: Mapping[str, Any]) -> tuple:
    """What a finished task's status is read from, beyond its id (a finished task's document does not
    change: a remembered status is used while this is the same)."""
    fatal = doc.get("fatal_error") or {}
    return tuple(str(doc.get(k)) for k in ("status", "completion_time", "files_transferred", "files_skipped",
                                           "subtasks_skipped_errors", "canceled_by_admin")) + (str(fatal.get("code")),)


def _time(text: Any) -> Optional[dt.datetime]:
    try:
        when = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


@attrs.define
class _Task:
    """What this process knows of a task it submitted or cancelled."""

    #: (the destination as sent to Globus, normalized; the file's ``dest`` as the agent gave it,
    #: which its file_errors must name; recursive). Empty: not submitted by this process.
    files: list[tuple[str, str, bool]] = attrs.field(factory=list)
    #: This process asked Globus to cancel it (the agent's deadline, or its items were deleted).
    cancelled: bool = False
    #: The poll (count) that last asked about it.
    seen: int = 0
    #: When a poll last asked about it (the backend's ``clock``; None: not yet).
    seen_at: Optional[float] = None
    #: Its final status once read (done or failed: Globus's answer no longer changes): later polls
    #: return it without reading its events and files again (the agent's update of its items may
    #: fail, and it is then polled again).
    final: Optional[TaskStatus] = None
    #: What of the task's document that status was read from (see _final_key).
    final_key: tuple = ()
    #: Whether the warning that none of its delivered files matched a submitted one was logged.
    unmatched_warned: bool = False
    #: The source of each of ``files`` as sent to Globus, normalized: a skipped file's reported
    #: source tells which item it is where nested items write the same path (see _skipped_keys).
    sources: list[str] = attrs.field(factory=list)
    #: Which login this process submitted it with (_login_id; None: an injected client, or not
    #: submitted here). A 404 for it after a login with another identity is not "gone".
    login: Optional[int] = None
    #: The collection it writes to (whose home directory its ``/~/`` destinations are in).
    collection: Optional[str] = None


class GlobusTransfer(TransferBackend):
    """Globus Transfer (``globus://<collection-id>``)."""

    options_schema = GlobusOptions
    section_keys = {"globus_endpoint_id": "endpoint_id", "globus_endpoint_site_path": "endpoint_site_path",
                    "task_timeout_sec": "task_timeout_sec", "max_concurrent_transfers": "max_concurrent_transfers"}
    description = "Globus Transfer tasks between this site's collection and globus://<collection-id> locations"

    def __init__(self, options: object = None, *, site_path: Optional[str] = None,
                 transfer_client: Optional[globus_sdk.TransferClient] = None) -> None:
        super().__init__(options, site_path=site_path)
        self._client = transfer_client
        #: This site's collection (transfers.globus_endpoint_id) as Globus writes it: sent, compared
        #: with the ids Globus reports and names in its errors, and a key of the home cache, so that
        #: an id written in capitals in settings.yml behaves as the lowercase one (None: not set).
        self._site_ep: Optional[str] = canonical_id(self.options.endpoint_id) if self.options.endpoint_id else None
        #: The login of a client built from the tokens file (None: none built, or one handed in).
        self._login: Optional[_Login] = None
        #: The login of the last client built (kept when the client is dropped: one built again
        #: from the same login is the same login).
        self._last_login: Optional[_Login] = None
        self._lock = threading.Lock()
        #: (the tokens file, its stamp, the error, when: self.clock()) of a login Globus Auth refused
        #: (a revoked or expired refresh token): answered without a call until that file changes (a
        #: new login), or for LOGIN_REFUSED_RECHECK_SEC.
        self._refused: Optional[tuple[Path, Optional[tuple[int, int, int]], str, float]] = None
        #: Serializes writes of refreshed tokens (a refresh may run in any thread using the client).
        self._save_lock = threading.Lock()
        #: Collections of this site and its locations: the login command names them all (the agent
        #: adds those of transfer_locations through use_locations, before any submission).
        self._collections: list[str] = [self._site_ep] if self._site_ep else []
        #: The clock of submissions' deadlines (tests set their own).
        self.now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)
        #: The tasks this process submitted or cancelled, by Globus task id (see _Task).
        self._tasks: dict[str, _Task] = {}
        self._tasks_lock = threading.Lock()
        #: Successful polls so far (a task unasked for FORGET_AFTER_POLLS of them, and for
        #: FORGET_AFTER_SEC, is forgotten).
        self._polls = 0
        #: The clock of that age, in seconds (tests set their own).
        self.clock: Callable[[], float] = time.monotonic
        #: {(the login (see _client_owner), collection): (its home directory as Globus resolves /~/,
        #: or None: not readable; when read)} (see _home): one operation_ls per collection and login
        #: for the backend's life, at most HOME_CACHE_SIZE.
        self._homes: dict[tuple[Any, str], tuple[Optional[str], float]] = {}
        #: {(login, collection): why its home was last said unknown}: the same reason on a later ask
        #: (every HOME_RECHECK_SEC) is logged at DEBUG, another one (a 403 after a null listing) at
        #: WARNING again; kept beside ``_homes`` (dropped with it, and when the home is read).
        self._home_said: dict[tuple[Any, str], str] = {}
        #: {submission id: (when Globus first refused it for paths another task still writes, when
        #: last, both ``self.clock()``; the UTC time the wait ends, for its reason)} (see
        #: _paths_conflict): the wait is bounded from the first refusal; an id not sent again for
        #: that long (its batch left the journal) is forgotten. The wait is measured on the monotonic
        #: clock: a wall clock set forward or back (NTP, a resumed VM) ended it early or stretched it.
        self._conflicts: dict[str, tuple[float, float, dt.datetime]] = {}
        #: {task id: whether the last poll that read it found it queued}: a task whose task_list chunk
        #: fails keeps that, so that a queued task's deadline does not start with a failed read.
        self._queued: dict[str, bool] = {}
        #: {(login, collection): the error} of an ls of its home that failed for a moment during the
        #: current poll: raised again for the rest of that poll without a call (each of its tasks
        #: asked again); emptied when a poll starts.
        self._home_failures: dict[tuple[Any, str], BaseException] = {}
        if self.options.http_retries > MAX_HTTP_RETRIES:
            logger.warning("globus backend option http_retries (transfers.backend_options.globus.http_retries): %d is "
                           "more than %d; %d are made (each waits up to 10 s inside the agent's cycle, and the next "
                           "cycle tries again anyway)", self.options.http_retries, MAX_HTTP_RETRIES, MAX_HTTP_RETRIES)
        _quiet_sdk_transport()

    def use_locations(self, locations: Sequence[TransferLocation]) -> None:
        # Known before the first submission, whose "not logged in" error must name them all: a
        # login consenting to the site's collection only would fail again on the remote one.
        for location in locations:
            collection = _canonical_id(location.netloc)  # listed once in the login command, however written
            if location.netloc and collection not in self._collections:
                self._collections.append(collection)

    # -- credentials -------------------------------------------------------------------------------

    def tokens_path(self) -> Path:
        """The tokens file this backend reads: ``tokens_file`` (relative: to the site directory), else
        the default. ``balsam site globus-login`` run in the site writes the same file."""
        return tokens_path(self.options.tokens_file, base=self.site_path)

    def _command(self) -> str:
        return login_command(self._collections, self.tokens_path())

    def _error(self, exc: BaseException) -> TransferError:
        error, relogin = _classify(exc, self._collections, self.tokens_path(), self._site_ep)
        if relogin:
            # The user is told to log in again: the next call must use what that login writes, not
            # this client's tokens (it would fail the same way until the agent restarts).
            with self._lock:
                failed = getattr(exc, "balsam_login", None)
                if failed is not None and self._login is not None and failed.serial != self._login.serial:
                    # The refresh of an earlier login failed (a request that took its client before a
                    # new `globus-login` was picked up): filed under the current login, it locked the
                    # new one out, and dropped its client.
                    return error
                if self._login is not None:
                    if _login_refused(exc):
                        # Globus Auth refused the refresh token itself: asking again with the same
                        # file is refused again (a poll and a submission per cycle, all night).
                        self._refused = (self._login.path, self._login.stamp, str(error), self.clock())
                    self._client, self._login = None, None
        return error

    def client(self) -> globus_sdk.TransferClient:
        with self._lock:
            if self._client is not None and self._login is not None and self._relogged_in(self._login):
                self._client, self._login = None, None
            if self._client is None:
                refused = self._refused
                if refused is not None:
                    path, stamp, message, since = refused
                    if (path == self.tokens_path() and _stamp(path) == stamp
                            and self.clock() - since < LOGIN_REFUSED_RECHECK_SEC):
                        # The file Globus Auth refused, unchanged: no new login yet.
                        raise TransferError(message, retryable=True)
                    self._refused = None
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
        if tokens is None or tokens.get("refresh_token") in (login.refresh_token, login.saved_refresh_token):
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
        refresh_token = saved = str(tokens["refresh_token"])
        last = self._last_login  # (under self._lock, as the client)
        if last is not None and last.path == path and refresh_token in (last.refresh_token, last.saved_refresh_token):
            # The same login built again: with its token as last rotated, which the file may not hold
            # yet (its save failed): the file's would be the superseded one.
            serial, refresh_token = last.serial, last.refresh_token
        else:
            serial = next(_LOGIN_SERIALS)
        login = _Login(path=path, refresh_token=refresh_token, stamp=stamp, serial=serial, saved_refresh_token=saved)
        self._last_login = login

        def on_refresh(response: globus_sdk.OAuthRefreshTokenResponse) -> None:
            fresh = response.by_resource_server.get(TRANSFER_RESOURCE_SERVER) or {}
            if fresh.get("access_token"):
                self._save_refreshed(login, fresh)

        retries = min(self.options.http_retries, MAX_HTTP_RETRIES)
        # Globus Auth's refresh follows http_retries too (globus-sdk's default is 5 retries, up to
        # 10 s apart, inside the cycle).
        auth_client = globus_sdk.NativeAppAuthClient(tokens["client_id"], app_name="balsam",
                                                     retry_config=_retry_config(retries))
        authorizer = _LoginAuthorizer(
            login, login.refresh_token, auth_client,
            access_token=tokens.get("access_token"), expires_at=tokens.get("expires_at_seconds"),
            on_refresh=on_refresh,
        )
        client = globus_sdk.TransferClient(authorizer=authorizer, app_name="balsam", retry_config=_retry_config(retries))
        return client, login

    def _save_refreshed(self, login: _Login, fresh: Mapping[str, Any]) -> None:
        """Write a refreshed access token into the tokens file, over what the file holds now, and
        only while it holds the login this client uses: a `globus-login` run since wins (the next
        call builds a client from it)."""
        with self._save_lock:
            login.refresh_token = str(fresh.get("refresh_token") or login.refresh_token)
            try:
                current = load_tokens(login.path)
            except ValueError:
                current = None
            # The file's refresh token against the one last saved there, not the one in use: after a
            # save that failed they differ, and a rotated token would then never be saved again.
            if current is None or current.get("refresh_token") != login.saved_refresh_token:
                return  # a newer login, or none (removed: logged out): not the agent's to rewrite
            try:
                save_tokens(login.path, {**current, "access_token": fresh["access_token"],
                                         "refresh_token": login.refresh_token,
                                         "expires_at_seconds": fresh.get("expires_at_seconds")})
            except OSError as exc:
                # Raised here, it failed the request the refresh was for (a full or read-only file
                # system, a quota), though the new token works: used from memory, and written with
                # the next refresh that can be (the file is untouched: save_tokens replaces it in one
                # rename). Until then the file holds the refresh token before any rotation, which
                # Globus Auth may refuse: an agent restarted meanwhile may need a new login.
                rotated = login.refresh_token != login.saved_refresh_token
                logger.warning("globus: cannot write the refreshed access token%s to %s (%s: %s); using it from "
                               "memory%s", " and its new refresh token" if rotated else "", login.path,
                               type(exc).__name__, one_line(exc.strerror or exc),
                               " (written at the next refresh that can be; an agent restarted before may need "
                               "a new globus-login)" if rotated else "")
                return
            login.saved_refresh_token = login.refresh_token
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
        to_site = _canonical_id(doc.get("destination_endpoint_id")) == self._site_ep
        return TransferDirection.stage_in if to_site else TransferDirection.stage_out

    # -- the contract ------------------------------------------------------------------------------

    def new_submission_token(self) -> Optional[str]:
        """A Globus submission id: submitting the same batch with it again returns the same task."""
        if not self._site_ep:
            raise _site_collection_unset()  # before a call for an id, and a journal record, per cycle
        try:
            return str(self.client().get_submission_id()["value"])
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None

    @classmethod
    def location_address(cls, location: TransferLocation) -> str:
        """The collection id as Globus writes it: the agent compares stage-outs' destinations by it,
        and a collection id written in capitals in one alias and in lower case in another named
        two places, so two jobs' items writing one file ran at once."""
        return _canonical_id(location.netloc)

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
        site_ep = self._site_ep
        if not site_ep:
            raise _site_collection_unset()
        self.check_location(location)
        remote_ep = _canonical_id(location.netloc)
        if remote_ep not in self._collections:
            self._collections.append(remote_ep)
        stage_in = direction == TransferDirection.stage_in
        src_ep, dest_ep = (remote_ep, site_ep) if stage_in else (site_ep, remote_ep)
        extra: dict[str, Any] = {"submission_id": token} if token else {}
        if self.options.task_timeout_sec:
            # The agent cancels the task task_timeout_sec after it starts; the service stops it even
            # if that cancel never reaches it (Globus unreachable, the agent down), leaving room for
            # the time it may wait in Globus's queue first (see globus_deadline).
            deadline = globus_deadline(self.now(), self.options.task_timeout_sec, self.options.max_concurrent_transfers)
            extra["deadline"] = deadline.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        data = globus_sdk.TransferData(
            src_ep, dest_ep, label=f"{self.options.label} stage-{'in' if stage_in else 'out'} ({_counted(files)})",
            sync_level=self.options.sync_level, verify_checksum=self.options.verify_checksum,
            encrypt_data=self.options.encrypt_data, preserve_timestamp=self.options.preserve_timestamp,
            skip_source_errors=True, fail_on_quota_errors=self.options.fail_on_quota_errors,
            notify_on_succeeded=False, notify_on_failed=False, notify_on_inactive=False,
            **extra,
        )
        sent: list[tuple[str, str, bool]] = []
        sources: list[str] = []
        for f in files:
            src = f.src if stage_in else self.to_endpoint(f.src)
            dest = self.to_endpoint(f.dest) if stage_in else f.dest
            data.add_item(src, dest, recursive=f.recursive)
            sent.append((_norm(dest), f.dest, f.recursive))
            sources.append(_norm(src))
        try:
            client = self.client()
            login = _login_id(self._login)
            response = client.submit_transfer(data)
        except TransferError:
            raise
        except Exception as exc:
            if self._site_collection_missing(exc, remote_ep):
                raise _site_collection_unknown(site_ep, str(getattr(exc, "code", "") or "")) from None
            if _paths_still_written(exc):
                raise self._paths_conflict(exc, token) from None
            raise self._error(exc) from None
        task_id = str(response["task_id"])
        with self._tasks_lock:
            self._conflicts.pop(token or "", None)
            # Also for a duplicate submission (a journaled token sent again): the same files.
            task = self._tasks.setdefault(task_id, _Task(seen=self._polls))
            task.files, task.sources, task.login, task.collection = sent, sources, login, dest_ep
        return task_id

    def _site_collection_missing(self, exc: BaseException, remote_ep: str) -> bool:
        """Whether a 404 of a submission is for this site's collection (settings.yml's
        globus_endpoint_id), not the location's: by the id the error names, else by asking Globus."""
        if not isinstance(exc, globus_sdk.TransferAPIError) or exc.http_status != 404:
            return False
        site_ep = str(self._site_ep)
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

    def _conflict_wait(self) -> dt.timedelta:
        """How long a batch Globus refuses for paths an earlier task of the login still writes (HTTP
        409 "identical paths") waits for that task, its files using no try: the Globus deadline span
        of a task balsam submits (globus_deadline: ``task_timeout_sec`` times 1 + its rounds of
        Globus's queue, plus DEADLINE_MARGIN_SEC; 12 h 10 min with the defaults). A balsam task, one
        cancelled at the agent's deadline that Globus is still stopping or another job's writing the
        same files, has ended by then; one writing them longer was started outside balsam (the web
        app, the CLI; it may have no deadline), and the batch no longer waits for it with no bound."""
        start = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
        timeout = self.options.task_timeout_sec or DEFAULT_TASK_TIMEOUT_SEC
        return globus_deadline(start, timeout, self.options.max_concurrent_transfers) - start

    def _paths_conflict(self, exc: BaseException, token: Optional[str]) -> TransferError:
        """The error of a submission refused because an earlier task of the login still writes some
        of its paths (see _paths_still_written): ``batch_only`` (the location's other batches go on;
        Globus started no task of this submission id), retryable (the batch is sent again each cycle
        with its id, its files using no try) until _conflict_wait has passed since the first such
        refusal of that id this process saw; then not retryable (its files each fail a try, and their
        retry goes under a new id, with a wait of its own). The reason names the time the wait ends:
        the same text each cycle (written once on the items)."""
        now = self.clock()
        wait = self._conflict_wait().total_seconds()
        with self._tasks_lock:
            for old, (_, last, _) in list(self._conflicts.items()):
                if now - last > wait:
                    del self._conflicts[old]  # its batch is no longer sent (it left the journal)
            first, _, until_at = (self._conflicts[token] if token and token in self._conflicts
                                  else (now, now, self.now() + dt.timedelta(seconds=wait)))
            if token:
                self._conflicts[token] = (first, now, until_at)
            if now - first >= wait:
                self._conflicts.pop(token or "", None)
                return TransferError(
                    f"Globus still refuses the batch after {_duration(now - first)} {_answer(exc)}: "
                    "a task of this login has written some of its paths for longer than any task balsam submits "
                    "may run (its Globus deadline: transfers.task_timeout_sec, room for Globus's queue, and "
                    f"{DEADLINE_MARGIN_SEC} s), one started outside balsam?; this try of its files fails",
                    retryable=False, batch_only=True)
        until = until_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return TransferError(
            f"Globus refused the batch for now {_answer(exc)}: an earlier Globus task of this login still writes "
            "some of these paths (one the agent cancelled that Globus is still stopping, another job's, or one "
            f"started outside balsam); the batch is sent again each cycle until that task ends, until {until} at "
            "most (then its files fail a try)", retryable=True, batch_only=True)

    def _task_list(self, client: globus_sdk.TransferClient, task_ids: Sequence[str]
                   ) -> tuple[list[Mapping[str, Any]], dict[str, TransferError]]:
        """(the documents ``task_list`` answered, {task id: the error} of those whose call failed):
        one call per TASK_FILTER_LIMIT ids. A failing call costs its own tasks only (they are read
        again next poll). When the first FAILED_CHUNKS_IN_A_ROW calls all fail (Globus down), or
        every call does, the poll raises, as a failed poll says nothing; once a call has answered,
        every chunk is asked (at most one call per chunk). A rate limit raises at once (the agent
        holds the backend off for its Retry-After). Failing the whole poll for one chunk, the tasks
        the other calls had read waited a cycle, and a chunk failing every cycle stalled all of
        them; stopping after any two failed calls in a row, the chunks after them were never asked,
        their tasks reported as failed reads every cycle."""
        docs: list[Mapping[str, Any]] = []
        failed: dict[str, TransferError] = {}
        first: Optional[TransferError] = None
        answered = failed_calls = 0
        per_call = min(TASK_LIST_LIMIT, TASK_FILTER_LIMIT)
        for start in range(0, len(task_ids), per_call):
            chunk = list(task_ids[start:start + per_call])
            if first is not None and not answered and failed_calls >= FAILED_CHUNKS_IN_A_ROW:
                raise first
            try:
                docs.extend(client.task_list(filter={"task_id": chunk}, limit=len(chunk))["DATA"])
            except Exception as exc:  # noqa: BLE001 - this chunk's tasks only, unless all fail
                problem = exc if isinstance(exc, TransferError) else self._error(exc)
                if problem.retry_after_sec or getattr(exc, "http_status", None) == 429:
                    raise problem from None
                logger.debug("globus: task_list of %d tasks failed", len(chunk), exc_info=True)
                first, failed_calls = first or problem, failed_calls + 1
                failed.update(dict.fromkeys(chunk, problem))
                continue
            answered += 1
        if first is not None and not answered:
            raise first
        return docs, failed

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        statuses: dict[str, TaskStatus] = {}
        with self._tasks_lock:
            self._home_failures.clear()  # a home that failed in an earlier poll is asked again
        try:
            client = self.client()
            docs, failed = self._task_list(client, task_ids)
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None
        for task_id, problem in failed.items():
            # Still running as far as anyone knows (its files may be being written): in flight with
            # the reason, ``unread`` (the agent treats it as a failed poll's task: one last read
            # queued is not taken for started, and its deadline still counts), queued as it last was.
            # The reason is the call's, the same for its 50 tasks (the agent logs it once).
            statuses[task_id] = TaskStatus(
                TaskState.active, queued=self._queued.get(task_id, False), unread=True,
                reason=one_line(f"its Globus task could not be polled (will retry): {problem}"))
        for doc in docs:
            statuses[str(doc["task_id"])] = self._settled_status(client, doc)
        for task_id in task_ids:
            if task_id not in statuses:
                # One call per task the list left out (rare: see the module doc), never "unknown" on
                # the list's word: the agent would submit its files again beside the running task.
                statuses[task_id] = self._unlisted_status(client, task_id)
        for task_id in task_ids:
            # Updated, not replaced: the agent polls a task alone after cancelling it at its deadline.
            if statuses[task_id].state in (TaskState.active, TaskState.inactive):
                self._queued[task_id] = statuses[task_id].queued
            else:
                self._queued.pop(task_id, None)
        self._forget_tasks_not_in(task_ids)
        return statuses

    def _unlisted_status(self, client: globus_sdk.TransferClient, task_id: str) -> TaskStatus:
        """The status of a task ``task_list`` did not answer: ``get_task``'s. A task list shows only
        the tasks of the identity that submitted them, so a login with another identity (or a linked
        one, a new session) hides a task that still runs. Gone for Globus (404): ``unknown``. Not
        readable (403: another identity's; an error): ``active`` with the reason, the agent's
        deadline ending it if it stays so. Rate limited (429, or an error with a Retry-After): the
        TransferError is raised, with its ``retry_after_sec``, so the agent holds the backend off."""
        try:
            doc = client.get_task(task_id)
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status == 404:
                said = " ".join(filter(None, ("HTTP 404", str(exc.code or ""))))
                if not self._submitted_with_another_login(task_id):
                    return TaskStatus(TaskState.unknown, f"Globus does not know task {task_id} ({said})")
                # Globus answers 404, not only 403, for a task of another identity: one this process
                # submitted before a new `globus-login` (picked up live) may still run. Taken for
                # gone, its files went a second time beside it. It stays in flight; the agent's
                # deadline ends it if it stays so.
                logger.debug("globus: task %s, submitted with an earlier login, is not found (%s)", task_id, said)
                return TaskStatus(TaskState.active, reason=one_line(
                    f"Globus does not show task {task_id} to the logged-in identity ({said}; it was submitted "
                    f"with an earlier login, perhaps of another identity): run `{self._command()}` with the "
                    f"identity that submitted it; else it is ended at transfers.task_timeout_sec"))
            logger.debug("globus: cannot read task %s left out of the task list", task_id, exc_info=True)
            if exc.http_status == 403:
                return TaskStatus(TaskState.active, reason=one_line(
                    f"Globus task {task_id} is not visible to the logged-in identity (logged in as another "
                    f"identity?): run `{self._command()}` with the identity that submitted it"))
            problem = self._error(exc)
            if exc.http_status == 429 or problem.retry_after_sec:
                # The whole poll fails with it: the agent holds the backend off for its Retry-After
                # instead of this task reading "active" while the next ids are asked at once.
                raise problem from None
            return self._unreadable(task_id, problem)
        except Exception as exc:  # noqa: BLE001 - network: this task only, read again next cycle
            logger.debug("globus: cannot read task %s left out of the task list", task_id, exc_info=True)
            problem = exc if isinstance(exc, TransferError) else self._error(exc)
            if problem.retry_after_sec:
                raise problem from None  # as above: the agent's hold, not "active"
            return self._unreadable(task_id, problem)
        return self._settled_status(client, doc.data if hasattr(doc, "data") else doc)

    def _submitted_with_another_login(self, task_id: str) -> bool:
        """Whether this process submitted ``task_id`` with another login than the one it uses now (a
        `globus-login` since, perhaps with another identity, to whom Globus answers 404 for it)."""
        with self._tasks_lock:
            known = self._tasks.get(task_id)
        with self._lock:
            current = _login_id(self._login)
        return known is not None and known.login is not None and known.login != current

    @staticmethod
    def _unreadable(task_id: str, problem: TransferError) -> TaskStatus:
        return TaskStatus(TaskState.active, reason=one_line(f"Globus task {task_id} is missing from the task list and "
                                                            f"cannot be read (will retry): {problem}"))

    def _settled_status(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any]) -> TaskStatus:
        """One task's status: its final one as read before, else read now. A task whose outcome needs
        more calls (a failed task's delivered files and events, a succeeded one's skipped files) that
        fail is reported active this poll, with the reason: the other tasks of the poll settle (one
        unreadable task made every task "cannot poll its task"), and it is read again next cycle."""
        task_id = str(doc["task_id"])
        final = doc.get("status") in ("SUCCEEDED", "FAILED")
        key = _final_key(doc)
        with self._tasks_lock:
            known = self._tasks.get(task_id)
            if final and known is not None and known.final is not None and known.final_key == key:
                return known.final
        try:
            status = self._status(client, doc)
        except Exception as exc:  # noqa: BLE001 - this task's outcome only; the poll goes on
            problem = exc if isinstance(exc, TransferError) else self._error(exc)
            if problem.retry_after_sec or getattr(exc, "http_status", None) == 429:
                # Rate limited: the poll fails with it so the agent holds the backend off (see
                # _unlisted_status); the task is read again once the hold lifts.
                raise problem from None
            logger.debug("globus: cannot read the outcome of task %s", task_id, exc_info=True)
            return TaskStatus(TaskState.active, info={"globus_status": doc.get("status")},
                              reason=one_line(f"Globus task {task_id} ended ({doc.get('status')}) but its outcome "
                                              f"cannot be read yet (will retry): {problem}"))
        if final and status.state in (TaskState.done, TaskState.failed):
            with self._tasks_lock:
                task = self._tasks.setdefault(task_id, _Task(seen=self._polls, seen_at=self.clock()))
                task.final, task.final_key = status, key
        return status

    def _forget_tasks_not_in(self, task_ids: Sequence[str]) -> None:
        """Forget the tasks no poll asked about for FORGET_AFTER_POLLS polls and FORGET_AFTER_SEC
        (their items were recorded done or failed, or deleted). Kept until then, not dropped once
        reported finished: should the agent's update of their items fail, the next poll reports them
        the same way. Both bounds: the agent polls one task again after each deadline cancel, several
        times in a cycle, which is no time for the cycle's other tasks."""
        with self._tasks_lock:
            self._polls += 1
            clock = self.clock()
            for task_id in task_ids:
                if task_id in self._tasks:
                    self._tasks[task_id].seen, self._tasks[task_id].seen_at = self._polls, clock
            for task_id, task in list(self._tasks.items()):
                if task.seen_at is None:
                    task.seen_at = clock  # submitted or cancelled, not polled yet: its age starts now
                if self._polls - task.seen >= FORGET_AFTER_POLLS and clock - task.seen_at >= FORGET_AFTER_SEC:
                    del self._tasks[task_id]

    def _skipped_errors(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any], stage_in: bool
                        ) -> tuple[dict[str, str], bool]:
        """({the failed file's dest as the agent names it: error} of a task's skipped files (every
        page), whether those names are the items' (``TaskStatus.file_errors_attributed``: False when
        this process does not know the task's files, after an agent restart: each error is then filed
        under the path Globus reports, which the agent charges to every item that may hold it)."""
        skipped_list = [(str(skipped.get("destination_path") or ""),
                         one_line(f"{skipped.get('error_code', 'error')}: "
                                  f"{skipped.get('error_details') or skipped.get('source_path')}"),
                         str(skipped.get("source_path") or ""))
                        for skipped in client.paginated.task_skipped_errors(doc["task_id"]).items()]
        sent, collection, origins = self._files_of(doc)
        # Named by the submitted file when this process knows the task's files: Globus may report a
        # home-directory path (/~/...) resolved (/home/me/...), as it does its delivered files,
        # which named no item, and the agent then failed a try of every item of the task.
        paths = [dest for dest, _, _ in skipped_list]
        home = self._home(client, collection) if _needs_home(sent, map(_norm, paths)) else None
        names = _skipped_names(sent, paths, home, [source for _, _, source in skipped_list], origins)
        #: Whether a path may be a home item's whose home is not known (then no item is sure of it).
        unsure = home is None and any(_is_home(dest) for dest, _, _ in sent)
        errors: dict[str, str] = {}
        more: dict[str, int] = {}
        for (dest, error, _), named in zip(skipped_list, names):
            if named:
                for key, file in named:
                    # An item's own dest naming a file inside it: the error says which file.
                    text = error if key == file else one_line(f"{file}: {error}")
                    if key in errors:
                        more[key] = more.get(key, 0) + 1
                    else:
                        errors[key] = text
            elif unsure and not _is_home(_norm(dest)):
                # Perhaps a home item's (its home could not be read): under a name no item has, so
                # that every item of the task fails a try, not one recorded done on a guess.
                errors[f"unattributed:{dest}"] = one_line(f"{error} (which item it is cannot be told: the home "
                                                          f"directory of collection {collection} could not be read)")
            else:
                # A stage-out's destination is the location's path, even on the site's own collection
                # (another directory of it): only a stage-in writes site paths.
                errors[self.from_endpoint(dest) if stage_in else dest] = error
        for key, count in more.items():
            errors[key] = one_line(f"{errors[key]} (and {count} more failed file{'s' if count > 1 else ''})")
        # Not known here (submitted before the agent restarted): a path inside nested items cannot
        # be told whose (its deepest holder alone was failed, and an outer item recorded done).
        return errors, bool(sent)

    def _files_of(self, doc: Mapping[str, Any]) -> tuple[list[tuple[str, str, bool]], str, list[str]]:
        """(the files this process submitted in a task (see _Task.files; empty: not known), the
        collection it writes to, their sources (see _Task.sources))."""
        with self._tasks_lock:
            task = self._tasks.get(str(doc["task_id"]))
            sent = list(task.files) if task is not None else []
            sources = list(task.sources) if task is not None else []
            collection = task.collection if task is not None and task.collection else None
        return sent, str(collection or doc.get("destination_endpoint_id") or ""), sources

    def _home(self, client: globus_sdk.TransferClient, collection: str) -> Optional[str]:
        """The home directory of ``collection`` as Globus resolves ``/~/`` (where the files of a
        ``/~/...`` destination are reported), read with one ``operation_ls`` of ``/~/`` (its
        ``absolute_path``) and remembered for the backend's life and the client's login (the home
        of a collection does not move under a running agent; another identity's may differ). None
        when it cannot be read (no permission, a consent or session, the collection unknown, an
        unreadable answer): the caller then counts nothing on a home path as delivered but what
        Globus reported in home form, and fails a try of every item for a skipped file it cannot
        tell; asked again after HOME_RECHECK_SEC (not once per task per poll); so is a 5xx that is
        the collection's own error (see _transient). A failure that may pass (5xx, 429, a
        Retry-After, the network) is raised, and raised again without a call for the rest of the
        poll only: the task is then reported active and read again (see _settled_status). The ls needs the same login and
        consent as the transfer."""
        now = self.clock()
        # By login too: another identity (a `globus-login` since) may have another home on a
        # mapped collection, where the old one's matched none of its paths.
        cache_key = (_client_owner(client), _canonical_id(collection))
        with self._tasks_lock:
            known = self._homes.get(cache_key)
            failed = self._home_failures.get(cache_key)
        if known is not None and (known[0] is not None or now - known[1] < HOME_RECHECK_SEC):
            return known[0]
        if failed is not None:
            raise failed
        home: Optional[str] = None
        try:
            listing = client.operation_ls(collection, path="/~/", limit=1)
            home = _absolute_home(listing.get("absolute_path"), listing.get("path"))
            if home is None:
                why = f"absolute_path {listing.get('absolute_path')!r}, path {listing.get('path')!r}"
                logger.log(self._home_level(cache_key, why), "globus: the home directory of collection %s cannot be "
                           "told from its listing of /~/ (%s): a task's files in it are not matched to what Globus "
                           "reports", collection, why)
        except Exception as exc:  # noqa: BLE001 - the safe reading follows, and it is asked again later
            if _transient(exc):
                # Globus down or rate limited for a moment: not "home unknown" (every item of the task
                # failed a try on it, for good): the caller reports the task active (held off on a
                # 429) and it is read again next cycle. Remembered for the rest of this poll only:
                # its other tasks are not each one more call to a service that just failed.
                with self._tasks_lock:
                    self._home_failures[cache_key] = exc
                raise
            # Not self._error: a refused ls must not drop the client (the transfers themselves work).
            problem, _ = _classify(exc, self._collections, self.tokens_path(), self._site_ep)
            logger.log(self._home_level(cache_key, f"ls /~/: {problem}"), "globus: cannot read the home directory "
                       "of collection %s (ls /~/: %s): its tasks' files in it are not matched to the paths Globus "
                       "reports (delivered: not counted; skipped: every item fails a try)", collection, problem)
        with self._tasks_lock:
            if cache_key not in self._homes and len(self._homes) >= HOME_CACHE_SIZE:
                oldest = next(iter(self._homes))
                del self._homes[oldest]
                self._home_said.pop(oldest, None)
            self._homes[cache_key] = (home, now)
            if home is not None:
                self._home_said.pop(cache_key, None)  # a later problem is news again
        return home

    def _home_level(self, cache_key: tuple[Any, str], why: str) -> int:
        """WARNING the first time a collection's home is unknown for reason ``why``, DEBUG when the
        last ask said the same: asked again every HOME_RECHECK_SEC, a collection whose listing never
        names its home (Globus answers ``absolute_path: null`` for ``/~/`` on some collections)
        logged the same warning 12 times an hour, while a new reason (a 403: a permission to grant)
        is news for the operator."""
        with self._tasks_lock:
            same = self._home_said.get(cache_key) == why
            self._home_said[cache_key] = why
        return logging.DEBUG if same else logging.WARNING

    def _status(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any]) -> TaskStatus:
        info = {k: doc.get(k) for k in ("files", "files_transferred", "files_skipped", "bytes_transferred",
                                        "effective_bytes_per_second", "faults") if doc.get(k) is not None}
        status = doc.get("status")
        if status == "SUCCEEDED":
            stage_in = self._direction(doc) == TransferDirection.stage_in
            # Every page: an error left on a later one would leave its file's item done.
            errors, attributed = (self._skipped_errors(client, doc, stage_in) if doc.get("subtasks_skipped_errors")
                                  else ({}, True))
            return TaskStatus(TaskState.done, info=info, file_errors=errors, file_errors_attributed=attributed)
        if status == "FAILED":
            return self._failed(client, doc, info)
        if status == "INACTIVE":
            why = str(doc.get("nice_status_short_description") or doc.get("nice_status") or "paused")
            # Said once: "credentials expired; if credentials expired run ..." read as a stutter.
            hint = "run" if "credential" in why.lower() else "if credentials expired run"
            return TaskStatus(TaskState.inactive, one_line(f"{why}; {hint} `{self._command()}`"), info=info)
        nice = doc.get("nice_status")
        if nice == NICE_QUEUED and not doc.get("is_paused"):
            # Not started (Globus runs a few tasks of a user at once): the agent's deadline waits.
            return TaskStatus(TaskState.active, info=info, queued=True, reason=QUEUED_REASON)
        reason = ""
        if nice and nice not in NICE_OK:
            info["nice_status"] = nice
        if doc.get("is_paused") or (nice and nice not in NICE_OK):
            # Globus retries a fault (a permission denied, an endpoint error) until the deadline, and
            # an admin's pause holds the task: say so, or it reads as slow for hours. No counter in
            # the line (the faults are in info): the agent logs a reason again whenever it changes.
            what = doc.get("nice_status_short_description") or nice or "paused"
            detail = nice if nice and nice != what else ""
            state = "paused in Globus" if doc.get("is_paused") else "Globus keeps retrying"
            reason = one_line(f"{state}: {what}{f' ({detail})' if detail else ''}")
        return TaskStatus(TaskState.active, info=info, reason=reason)

    # -- a failed task -----------------------------------------------------------------------------

    def _failed(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any], info: dict[str, Any]) -> TaskStatus:
        """A FAILED task: cancelled outside balsam (not retried), else done for the files it
        delivered with file_errors naming the others, or failed when it delivered none (or this
        process does not know its files)."""
        task_id = str(doc["task_id"])
        fatal = doc.get("fatal_error") or {}
        code = str(fatal.get("code") or "")
        delivered = int(doc.get("files_transferred") or 0)
        total = doc.get("files")
        so_far = f" ({delivered} of {total} files had been delivered)" if delivered and total else ""
        outside = self._cancelled_outside_balsam(doc)
        if outside:
            # Someone meant it to stop: its undelivered files are not tried again (retryable False,
            # file_errors_retryable False), and the files it delivered are done.
            info["cancelled_by"] = outside
            message = one_line(doc.get("canceled_by_admin_message") or "")
            error = one_line(f"Globus task {task_id} was cancelled by {outside}{f': {message}' if message else ''}; "
                             "not retried")
            return self._partly_delivered(client, doc, info, error, so_far, retryable=False)
        if code == CANCELED:
            # Not outside balsam: the agent's deadline (its other cancels are of tasks it no longer polls).
            reason = "cancelled by the balsam agent (transfers.task_timeout_sec)"
        else:
            description = str(fatal.get("description") or "")
            reason = (f"{code}: {description}" if code and description and code not in description
                      else description or code or str(doc.get("nice_status_short_description") or "failed"))
            fault = self._last_fault(client, doc)
            if fault:
                reason += f" (last fault: {fault})"
        error = one_line(f"Globus task {task_id} failed: {reason}")
        return self._partly_delivered(client, doc, info, error, so_far, retryable=True)

    def _partly_delivered(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any], info: dict[str, Any],
                          error: str, so_far: str, *, retryable: bool) -> TaskStatus:
        """A FAILED task with ``error``: done for the files it delivered with file_errors naming the
        others, or failed as a whole when it delivered none (or this process does not know its files).
        ``retryable``: whether its undelivered files may be tried again."""
        task_id = str(doc["task_id"])
        delivered = int(doc.get("files_transferred") or 0)
        with self._tasks_lock:
            sent = list(self._tasks[task_id].files) if task_id in self._tasks else []
        if not delivered or not sent:
            # Nothing arrived, or the files of the task are not known here (submitted before the
            # agent restarted): each of its files fails a try.
            why = "" if sent or not delivered else "; which files were delivered is not known after an agent restart"
            return TaskStatus(TaskState.failed, one_line(error + so_far + why), retryable=retryable, info=info)
        try:
            arrived = {_norm(str(row.get("destination_path") or ""))
                       for row in client.paginated.task_successful_transfers(task_id).items()}
            home = self._home(client, self._files_of(doc)[1]) if _needs_home(sent, arrived) else None
            matched = _delivered(sent, arrived, home)
        except Exception as exc:
            if _transient(exc):
                # Raised as it is: wrapped, a 429 without Retry-After lost its http_status, and the
                # poll reported the task active instead of holding the backend off (_settled_status).
                raise
            problem = self._error(exc)
            if problem.retryable:
                raise problem from None  # Globus down, a login to renew: the poll waits for the next cycle
            # Refused for good: report the task as a whole rather than block every poll on it.
            logger.debug("globus: cannot list the files task %s delivered", task_id, exc_info=True)
            return TaskStatus(TaskState.failed, one_line(f"{error}{so_far}; which files were delivered cannot be read "
                                                         f"({problem})"), retryable=retryable, info=info)
        # A directory item counts as undelivered (its listed files say nothing of the ones missing).
        errors = {key: one_line(f"not delivered: {error}") for dest, key, recursive in sent
                  if recursive or dest not in matched}
        if not matched and any(not recursive for _, _, recursive in sent):
            with self._tasks_lock:
                task = self._tasks.get(task_id)
                first = task is not None and not task.unmatched_warned
                if task is not None:
                    task.unmatched_warned = True
            # The home unknown: a path may match and still not be told from a home item's (see _delivered).
            untold = (home is None and any(_is_home(dest) for dest, _, _ in sent)
                      and any(not _is_home(path) for path in arrived))
            if first:
                # Not silent: the whole task is failed and its delivered files are sent again.
                logger.warning("globus: task %s delivered %d files but none matches a submitted destination%s (e.g. "
                               "%s delivered, %s submitted): every file of it is tried again", task_id, delivered,
                               " that cannot be a home item's (the collection's home could not be read)" if untold
                               else "", min(arrived) if arrived else "none listed", sent[0][0])
        if len(errors) == len(sent):
            return TaskStatus(TaskState.failed, one_line(error + so_far), retryable=retryable, info=info)
        if retryable and doc.get("subtasks_skipped_errors"):
            # A skipped file's own error says more than the task's (which it is not delivered anyway).
            stage_in = self._direction(doc) == TransferDirection.stage_in
            try:
                errors.update(self._skipped_errors(client, doc, stage_in)[0])
            except Exception as exc:
                if _transient(exc):
                    raise  # as below: its http_status tells the poll to hold off on a 429
                problem = self._error(exc)
                if problem.retryable:
                    raise problem from None
                logger.debug("globus: cannot read the skipped errors of task %s", task_id, exc_info=True)
        info["task_error"] = error
        # Not retryable (a cancel outside balsam): each undelivered file's error says who cancelled.
        return TaskStatus(TaskState.done, info=info, file_errors=errors, file_errors_retryable=retryable)

    def _cancelled_outside_balsam(self, doc: Mapping[str, Any]) -> str:
        """Who cancelled a task, when it was not balsam ('' otherwise)."""
        admin = str(doc.get("canceled_by_admin") or "").upper()
        if admin:
            return ADMIN_SIDES.get(admin, f"an administrator ({admin})")
        if str((doc.get("fatal_error") or {}).get("code") or "") != CANCELED:
            return ""
        task_id = str(doc["task_id"])
        with self._tasks_lock:
            if task_id in self._tasks and self._tasks[task_id].cancelled:
                return ""
        limit = self.options.task_timeout_sec
        requested, completed = _time(doc.get("request_time")), _time(doc.get("completion_time"))
        if limit and requested and completed and (completed - requested).total_seconds() >= limit - CANCEL_SLACK_SEC:
            # Ended at least task_timeout_sec after its submission: a previous agent process may have
            # cancelled it at its deadline (it never cancels a task earlier): treated as balsam's.
            return ""
        return "its owner, outside balsam (e.g. in the Globus web app)"

    def _last_fault(self, client: globus_sdk.TransferClient, doc: Mapping[str, Any]) -> str:
        """The task's last error event, in a few words ('' when none or it cannot be read: one call,
        made only for a failed task that had faults)."""
        if not doc.get("faults"):
            return ""
        try:
            events = client.task_event_list(doc["task_id"], limit=1, query_params={"filter": "is_error:1"})
            event = next(iter(events), None)
        except Exception:  # noqa: BLE001 - the fatal error alone is still worth reporting
            logger.debug("globus: cannot read the events of task %s", doc["task_id"], exc_info=True)
            return ""
        if not event:
            return ""
        details = one_line(event.get("details") or "", limit=200)
        return one_line(" ".join(filter(None, (f"{event.get('code') or 'error'}:", str(event.get("description") or ""),
                                               f"({details})" if details else ""))))

    def cancel_task(self, task_id: str) -> None:
        with self._tasks_lock:
            # Before the call: a cancel whose answer is lost may still have reached Globus.
            self._tasks.setdefault(task_id, _Task(seen=self._polls)).cancelled = True
        try:
            response = self.client().cancel_task(task_id)
        except TransferError:
            raise
        except Exception as exc:
            raise self._error(exc) from None
        if str(response.get("code") or "") == "TaskComplete":
            # Said apart from a cancel: the agent logs that it had already run to its end.
            raise TransferError(f"Globus task {task_id} had already finished", retryable=False)
