"""The transfer backend contract (entry-point group ``balsam.transfers``).

A site's ``transfers.transfer_locations`` maps aliases to URLs (``globus://<endpoint-uuid>``,
``local://`` or ``file://``, ``rsync://user@host``); the URL's protocol names the backend (the
entry-point name; ``file`` is another name of ``local``). The ``transfers`` agent module hands a
backend *batches*: one :meth:`TransferBackend.submit` call per (direction, location) batch of
(src, dest, recursive) files, which becomes one transfer task, and one :meth:`TransferBackend.poll`
call for all of a backend's in-flight tasks per cycle.

Paths: for a stage-in, ``src`` is the remote path (in the location's namespace) and ``dest`` an
absolute path on the site's file system; for a stage-out the other way round. A backend that sees
the site under another prefix (a Globus endpoint) rewrites the local side itself.

Locations: each backend checks the URLs of its protocol when settings.yml is read
(:meth:`TransferBackend.check_location`), so a malformed URL is a settings error naming its line,
not a job failure later. A path after the address (``local:///scratch``, ``rsync://me@host/scratch``)
is a directory prefix of the location's paths (:meth:`TransferLocation.remote_path`); a backend that
cannot honour one refuses it there.

Errors: a backend raises only :class:`TransferError` (one line, ``retryable`` says whether trying
the same thing again may work); the public methods of the base class turn anything else into one,
so nothing else reaches the agent. A task that ran and failed is reported by :meth:`poll` as a
:class:`TaskStatus` in state ``failed`` with the error; a task id the backend no longer knows
(its process restarted) is ``unknown``, and the agent submits those items again: a backend says
``unknown`` only when it knows the task is gone, never because one listing left it out (its files
would be sent a second time while the first task still runs). A :meth:`poll`
that raises says nothing about the tasks: their items stay in flight whatever ``retryable`` says,
until the tasks' deadline (``transfers.task_timeout_sec``). An error with ``retry_after_sec`` (the
service's rate limit) holds the agent's polls and submissions to that backend off for that long. A task the backend has accepted but not
started yet (it waits for one of a bounded number of workers, or in its service's queue) is
``active`` with ``queued`` set: the deadline counts from when it starts, not from its submission. A
task whose state one call of a poll could not read (the poll's other calls answered) is ``active``
with ``unread`` set: the agent treats it as a failed poll's task. A
task that delivered some files and not others is ``done`` with ``file_errors`` naming the others
(``file_errors_retryable`` False when they must not be tried again: they fail their jobs at once).

Cancels: the agent cancels a task that ran past ``transfers.task_timeout_sec`` and polls it once
more. A ``failed`` answer to that poll is taken for the agent's own cancel whatever its message or
``retryable`` says: the task's files each fail one try (retryable), the backend's message kept in
their error. A backend that delivered some files before the cancel answers ``done`` with
``file_errors`` for the others; only there does ``file_errors_retryable=False`` make them fail for
good (a cancel by someone else, for a reason of its own). A backend's own report of a task the
agent cancelled should say ``retryable=True`` (``local`` and ``rsync`` do).
"""

from __future__ import annotations

import abc
import enum
import logging
from typing import Any, ClassVar, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import attrs

from .options import NoOptions, build_options
from .states import TransferDirection

__all__ = [
    "PROTOCOL_ALIASES",
    "TaskState",
    "TaskStatus",
    "TransferBackend",
    "TransferError",
    "TransferFile",
    "TransferLocation",
    "UNKNOWN_TASK",
    "backend_name_for",
    "one_line",
]

logger = logging.getLogger(__name__)

#: The error of an ``unknown`` status :meth:`TransferBackend.poll` fills in for an id the backend left
#: out (a backend that knows why says so in its own ``unknown`` status).
UNKNOWN_TASK = "the backend does not know this task"

#: Protocols that are other names of a backend.
PROTOCOL_ALIASES: Mapping[str, str] = {"file": "local"}


class TransferError(Exception):
    """A transfer could not be started, polled or cancelled. The message is one line for users
    (it ends up in the item's ``transfer_info.error`` and the job's FAILED event); ``retryable``
    says whether the same request may work later (a network blip) or never will (a bad URL);
    ``retry_after_sec``, when set, is how long the service asked not to be called again (an HTTP 429's
    ``Retry-After``): the agent then neither polls nor submits to the backend until it has passed.
    ``batch_only`` (a submission's error, ``retryable`` or not): the service refused this batch for
    its own files, and started no task of it (Globus: an earlier task still writes some of its
    paths). The location's other batches go on in the same cycle (any other refusal holds them back
    for the cycle), and a journaled batch sent again only to find its task (an item held again
    since) leaves the journal. Retryable, the files use no try and the batch, journaled with its
    token, is sent again after the cycle's new batches for ``retry_backoff_sec``, then in its turn;
    not retryable, its files each fail a try."""

    def __init__(self, message: str, *, retryable: bool, retry_after_sec: Optional[float] = None,
                 batch_only: bool = False) -> None:
        super().__init__(one_line(message))
        self.retryable = retryable
        self.retry_after_sec = retry_after_sec
        self.batch_only = batch_only


def one_line(text: Any, limit: int = 500) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@attrs.frozen
class TransferLocation:
    """A parsed ``transfer_locations`` entry: ``alias: protocol://netloc[/path]``."""

    alias: str
    url: str
    protocol: str
    #: ``user@host`` for rsync, the endpoint id for Globus, empty for local.
    netloc: str
    #: A path after the netloc (rarely used: a prefix the backend may apply).
    path: str = ""

    @classmethod
    def parse(cls, alias: str, url: str) -> "TransferLocation":
        if not isinstance(url, str) or "://" not in url:
            raise TransferError(
                f"transfer location {alias!r}: expected protocol://address (e.g. globus://<endpoint-id>), got {url!r}",
                retryable=False,
            )
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # "Invalid IPv6 URL" (rsync://me@[::1/p): a settings error, not a traceback
            raise TransferError(f"transfer location {alias!r}: {exc} in {url!r}", retryable=False) from None
        protocol = parts.scheme.lower()
        if not protocol:
            raise TransferError(f"transfer location {alias!r}: no protocol in {url!r}", retryable=False)
        rest = url.partition("://")[2]
        cut = min((rest.index(c) for c in "?#" if c in rest), default=-1)
        if cut >= 0:
            # urlsplit takes what follows for a query or a fragment, which no backend reads:
            # local:///data/run#1 was the directory /data/run, without a word.
            mark, dropped = rest[cut], rest[cut:]
            raise TransferError(
                f"transfer location {alias!r}: {mark!r} in {url!r} starts a URL "
                f"{'query' if mark == '?' else 'fragment'}, which no backend reads ({dropped!r} would be "
                f"dropped); for a directory named with it, end the location above that directory and write "
                f"the rest in the jobs' paths",
                retryable=False)
        return cls(alias=alias, url=url, protocol=protocol, netloc=parts.netloc, path=parts.path)

    @property
    def backend_name(self) -> str:
        return backend_name_for(self.protocol)

    @property
    def prefix(self) -> str:
        """The directory prefix of the location's paths ('' when none: no path, or ``/``)."""
        return self.path.rstrip("/")

    def remote_path(self, path: str) -> str:
        """``path`` as a job wrote it (``alias:/abs/path``), inside the location's prefix. Raises a
        non-retryable :class:`TransferError` for a path whose ``..`` climbs out of the prefix
        (``/../x`` under ``local:///scratch/me`` was ``/scratch/x``, outside the location's directory)."""
        if not self.prefix:
            return path
        if _climbs_out(path):
            raise TransferError(
                f"remote path {path!r} leads outside the directory {self.prefix} of transfer location "
                f"{self.alias!r} (its '..' climbs above {self.alias}:/)", retryable=False)
        return self.prefix + path


def _climbs_out(path: str) -> bool:
    """Whether ``path``, read from its root, climbs above it with ``..`` (as written: nothing on the
    location's side is looked at, its links included)."""
    depth = 0
    for part in path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def backend_name_for(protocol: str) -> str:
    """The ``balsam.transfers`` entry-point name that serves ``protocol``."""
    protocol = protocol.lower()
    return PROTOCOL_ALIASES.get(protocol, protocol)


@attrs.frozen
class TransferFile:
    """One file or directory of a task."""

    src: str
    dest: str
    recursive: bool = False


class TaskState(str, enum.Enum):
    active = "active"
    #: Paused by the service (Globus: credentials expired, endpoint paused); may resume.
    inactive = "inactive"
    done = "done"
    failed = "failed"
    #: The backend does not know this task id (e.g. it lived in a process that has since died).
    unknown = "unknown"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class TaskStatus:
    state: TaskState
    #: One line, set when ``failed`` (or the reason a task is ``inactive``).
    error: str = ""
    #: Whether running the same files again may succeed (only meaningful when ``failed``).
    retryable: bool = True
    #: Progress figures for users (``files``, ``files_done``, ``bytes`` ...), kept in ``transfer_info``.
    info: Mapping[str, Any] = attrs.field(factory=dict)
    #: A ``done`` task whose some files failed: {the file's ``dest``: one-line error}. The other
    #: files of the task are done.
    file_errors: Mapping[str, str] = attrs.field(factory=dict)
    #: One line for users, set on an ``active`` task that makes no progress for a reason its service
    #: reports (Globus: a fault it keeps retrying, a pause by an administrator); the agent shows it
    #: as the items' reason and logs it once. Empty: the task is progressing (or the backend cannot tell).
    reason: str = ""
    #: An ``active`` task that has not started yet: it waits for the backend's capacity (the ``local``
    #: and ``rsync`` backends run at most ``threads`` tasks at once, the others queue behind them).
    #: The agent's deadline (``transfers.task_timeout_sec``) does not run while a task is queued: it
    #: counts from the first poll that finds it started. A backend that cannot tell leaves it False,
    #: and the deadline counts from the submission. A queued task may carry its own one-line
    #: ``reason`` (what it waits for, e.g. the service's limit of running tasks); the agent shows it
    #: on the items and does not take it for a task that is not moving.
    queued: bool = False
    #: Whether the files named in ``file_errors`` may be tried again (only meaningful when ``done``
    #: with ``file_errors``). False: each fails for good and its job goes to FAILED with its error
    #: (e.g. someone cancelled the task on purpose after some files were delivered); the task's other
    #: files are still done. True (the default): each fails a try, as a failed task's files do.
    file_errors_retryable: bool = True
    #: Whether each key of ``file_errors`` names the item it is charged to as the agent matches them
    #: (an item's own ``dest``, else the deepest directory item holding the path). True (the default:
    #: ``local`` and ``rsync`` file each error under its own item's ``dest``). False when the backend
    #: only knows the path of the failed file (Globus after an agent restart: the task's items are
    #: not known to it): the agent then charges a key to every item that may hold it (an item whose
    #: ``dest`` it is and every directory item it is inside), so that no outer directory item is
    #: recorded done while a file of it may be missing.
    file_errors_attributed: bool = True
    #: An ``active`` status standing in for one the backend could not read in this poll (Globus: the
    #: call of its ``task_list`` chunk failed while others answered); ``reason`` says why. The agent
    #: takes it as it takes a poll that raised, for this task alone: it stays in flight as it was
    #: (one last read ``queued`` is not taken for started, ``queued`` here is ignored), its deadline
    #: counts from its start if known (last read queued: from the first of an unbroken row of
    #: failed reads; else from its submission), and it is logged once per reason, not as a task
    #: that is not moving.
    unread: bool = False


class TransferBackend(abc.ABC):
    """Moves batches of files between the site and one kind of location.

    Subclasses implement :meth:`submit_batch` and :meth:`poll_tasks` (and :meth:`cancel_task` where
    the service can cancel); they are built once per agent with ``options`` (an instance of
    :attr:`options_schema`, from ``transfers.backend_options.<name>`` in settings.yml).
    """

    #: The frozen attrs class of this backend's options (see balsam.options).
    options_schema: ClassVar[type] = NoOptions
    #: ``transfers:`` section keys copied into this backend's options when set there (settings.yml
    #: compatibility with Balsam 0.7, e.g. ``globus_endpoint_id``): {section key: option name}.
    section_keys: ClassVar[Mapping[str, str]] = {}
    #: One line for ``balsam plugins ls``.
    description: ClassVar[str] = ""
    #: Whether the agent polls this backend's young tasks soon after their submission (0.5 s, then
    #: as long as the youngest has run, up to ``transfers.service_period``) rather than once a
    #: period. For backends whose small tasks end in a second or so (``local``, ``rsync``): a job
    #: then waits ~0.5 s for a small stage-in instead of a whole period. Off by default: a service
    #: whose tasks take minutes (Globus) would be asked every second for nothing, and so would the
    #: API; only tasks of backends that set it shorten the period.
    quick_poll: ClassVar[bool] = False

    def __init__(self, options: Any = None, *, site_path: Optional[str] = None) -> None:
        self.options = build_options(self.options_schema, options, where=f"transfers.backend_options.{self.name}")
        #: The site directory (local paths handed to the backend are inside its ``data/``); backends
        #: that see the site under another prefix (a Globus endpoint) rewrite paths relative to it.
        self.site_path = site_path

    @property
    def name(self) -> str:
        return getattr(self, "_entry_point_name", "") or type(self).__name__

    # -- what subclasses implement -------------------------------------------------------------

    @abc.abstractmethod
    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> str:
        """Start one task moving ``files``; return its id (unique for this backend)."""

    @abc.abstractmethod
    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        """The status of each of ``task_ids``, in as few service calls as the service allows."""

    def cancel_task(self, task_id: str) -> None:
        raise TransferError(f"{self.name}: tasks cannot be cancelled", retryable=False)

    @classmethod
    def check_location(cls, location: TransferLocation) -> None:
        """Refuse a ``transfer_locations`` URL this backend cannot honour (a missing or malformed
        address, a port or path prefix it would ignore): raise :class:`TransferError` with one line
        saying what is wrong. Called when settings.yml is read, before any job uses the location."""

    @classmethod
    def location_address(cls, location: TransferLocation) -> str:
        """The place ``location`` names (its netloc: an endpoint, a collection id), spelt one way for
        this backend's service. The agent compares stage-outs' destinations by it (two jobs' items
        writing one file take turns, see balsam.site.modules.transfers), so two spellings the service
        takes for one place must give one address (Globus: a collection id in either case). Called on
        the class (no credentials, no connection), once per location; what it raises is taken as
        "the netloc as written". Default: the netloc as written."""
        return location.netloc

    def new_submission_token(self) -> Optional[str]:
        """A token that makes a repeated submission of the same batch return the same task instead of
        starting a second one (Globus: a submission id), or None when the service has no such thing.

        The agent journals the token *before* submitting; after a crash between the submission and
        its record it submits the same files again with the same token. Backends returning a token
        accept ``token=`` in :meth:`submit_batch`.
        """
        return None

    def use_locations(self, locations: Sequence[TransferLocation]) -> None:
        """Told once, right after the agent builds the backend: the ``transfer_locations`` this
        backend serves. A backend whose messages name them (Globus: the login command lists every
        collection) keeps them; the default ignores them."""

    def close(self) -> None:
        """Release threads, processes or connections (called once when the agent stops)."""

    # -- what the agent calls: nothing but TransferError escapes -----------------------------------

    def submit(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile],
               token: Optional[str] = None) -> str:
        if not files:
            raise TransferError(f"{self.name}: refusing to submit an empty batch to {location.alias!r}", retryable=False)
        try:
            extra = {"token": token} if token else {}
            task_id = self.submit_batch(location, TransferDirection(direction), list(files), **extra)
        except TransferError:
            raise
        except Exception as exc:
            logger.debug("%s: submit to %s failed", self.name, location.alias, exc_info=True)
            raise TransferError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from exc
        if not task_id or not isinstance(task_id, str):
            raise TransferError(f"{self.name}: submit returned no task id ({task_id!r})", retryable=True)
        return task_id

    def poll(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        """A status for every id in ``task_ids`` (ids the backend left out are ``unknown``)."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        try:
            found = dict(self.poll_tasks(ids))
        except TransferError:
            raise
        except Exception as exc:
            logger.debug("%s: poll failed", self.name, exc_info=True)
            raise TransferError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from exc
        return {tid: found.get(tid) or TaskStatus(TaskState.unknown, UNKNOWN_TASK) for tid in ids}

    def submission_token(self) -> Optional[str]:
        """:meth:`new_submission_token`, guarded like the other calls."""
        try:
            return self.new_submission_token()
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from exc

    def cancel(self, task_id: str) -> None:
        try:
            self.cancel_task(task_id)
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from exc


def build_backend(cls: type, name: str, options: Any = None, *,
                  site_path: Optional[str] = None) -> TransferBackend:
    """Instantiate a backend class registered as ``name`` with ``options`` (a plain mapping, or an
    instance of its ``options_schema``)."""
    if not (isinstance(cls, type) and issubclass(cls, TransferBackend)):
        raise TransferError(f"transfer backend {name!r} is not a balsam.transfer.TransferBackend ({cls!r})", retryable=False)
    backend = cls.__new__(cls)
    backend._entry_point_name = name  # type: ignore[attr-defined]
    try:
        backend.__init__(options, site_path=site_path)  # type: ignore[misc]
    except TransferError:
        raise
    except Exception as exc:
        raise TransferError(f"transfers.backend_options.{name}: {one_line(exc)}", retryable=False) from exc
    return backend
