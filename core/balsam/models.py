"""The records Balsam stores, as attrs classes (the fields and defaults of Balsam 0.7).

These are plain data: the REST server validates payloads into them, the client reads responses
into them, and :mod:`balsam.serialization` turns them into JSON-ready dicts and back.

Field metadata ``role`` says who writes a field:

- ``"server"``: set by the server only (ids, timestamps, derived state); ignored on create/update.
- ``"create"``: accepted when the record is created, not afterwards.
- ``"update"``: accepted on update only (``state_timestamp``, ``state_data`` go into the EventLog).
- absent: writable on create and update.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Optional

import attrs

from .states import BatchJobMode, BatchJobState, JobState, TransferDirection, TransferItemState

SERVER = {"role": "server"}
CREATE_ONLY = {"role": "create"}
UPDATE_ONLY = {"role": "update"}

#: Limits shared by the server and the client (Balsam 0.7 values).
MAX_PAGE_SIZE = 100_000
MAX_ITEMS_PER_BULK_OP = 5_000
MAX_JOBS_PER_SESSION_ACQUIRE = 2_048
#: The most ``K:V`` filters (``tags=``, ``data=``, ``filter_tags=`` of a listing, an acquire's
#: ``filter_tags``, a BatchJob's) one request or record may give. Each is one clause of the query:
#: some 500 made SQLite refuse the statement ("Expression tree is too large (maximum depth 1000)"),
#: which was answered, and logged, as a database outage (503). The settings refuse a site's
#: ``filter_tags`` beyond it, and a launcher whose merged tags exceed it stops at start.
MAX_TAG_FILTERS = 100
#: Job ids one session heartbeat (``PUT /sessions/{id}``) may ask about; a launcher holding more
#: sends a different window of them on each heartbeat.
MAX_JOB_IDS_PER_SESSION_TICK = 100_000
#: Chunks per ``POST /jobs/reservations`` (a client reserves again for the chunks after them).
MAX_CHUNKS_PER_RESERVATION = 100
MAX_SERIALIZED_CLASS_CHARS = 262_144
MAX_SERIALIZED_PAYLOAD_CHARS = 512_000
#: The BatchJob ``status_info`` key naming the program that created it (an agent module:
#: ``queue_maintainer``, ``elastic_queue``); none for a user's own. ``balsam queue ls`` shows it in
#: its ``submitted_by`` column and filters on it (``--submitted-by``), knowing no module by name.
SUBMITTED_BY_KEY = "submitted_by"
#: The keyset-paging filter of the big lists (jobs, batch-jobs, transfers, events): ``id__gt=N``
#: keeps the records whose id is greater than N (strictly: the last id of the page before). Not a
#: Balsam 0.7 parameter; named like the other lookups (``state__ne``, ``workdir__contains``), since
#: the ``_after`` filters (``last_update_after``...) include their bound.
ID_AFTER = "id__gt"


def field_role(cls: type, name: str) -> Optional[str]:
    return attrs.fields_dict(cls)[name].metadata.get("role")


def writable_fields(cls: type, *, on: str) -> list[str]:
    """Names of the fields a client may send when it ``on="create"``\\s or ``on="update"``\\s a record."""
    skip = {"server", "update" if on == "create" else "create"}
    return [f.name for f in attrs.fields(cls) if f.metadata.get("role") not in skip]


@attrs.define(kw_only=True)
class User:
    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    username: str


@attrs.define(kw_only=True)
class AllowedQueue:
    max_nodes: int
    max_walltime: int
    max_queued_jobs: int
    #: The fewest nodes the queue takes (Polaris' prod: 10); a BatchJob below it is refused before
    #: qsub, and the elastic queue raises its requests to it. Balsam 0.7 had no such limit (its
    #: clients ignore the field). Left out of the wire and settings.yml when 1, so that every queue
    #: without a minimum reads as before.
    min_nodes: int = attrs.field(default=1, metadata={"omit_if_default": True})

    def validate(self, *, cross_field: bool = True) -> dict[str, str]:
        """Problems of a settings.yml queue (``{field: problem}``, reported with file and line).
        ``cross_field=False`` leaves out ``min_nodes`` above ``max_nodes``, a rule the API's schema
        cannot state (the server stores such a queue; it refuses every BatchJob in one line).

        A queue with ``max_nodes`` or ``max_walltime`` below 1 refuses every BatchJob (``1..0``);
        ``max_queued_jobs`` 0 means no limit to the scheduler module, a negative one holds every
        BatchJob back forever."""
        problems = {}
        # The API's schema of a queue holds 32-bit integers (openapi AllowedQueue), as do the BatchJob
        # num_nodes and wall_time_min the limits are compared with: a larger limit means nothing,
        # and one past 64 bits passed check-settings, then the server refused every settings push.
        most = 2**31 - 1
        for name in ("max_nodes", "max_walltime"):
            if getattr(self, name) < 1:
                problems[name] = f"must be at least 1, got {getattr(self, name)!r}"
        if self.min_nodes < 1 or (cross_field and self.min_nodes > max(self.max_nodes, 1)):
            problems["min_nodes"] = f"must be between 1 and max_nodes {self.max_nodes}, got {self.min_nodes!r}"
        if self.max_queued_jobs < 0:
            problems["max_queued_jobs"] = f"must not be negative (0: no limit), got {self.max_queued_jobs!r}"
        for name in ("max_nodes", "max_walltime", "max_queued_jobs", "min_nodes"):
            if name not in problems and getattr(self, name) > most:
                problems[name] = f"must be at most {most}, got {getattr(self, name)!r}"
        return problems


@attrs.define(kw_only=True)
class BackfillWindow:
    num_nodes: int
    wall_time_min: int


@attrs.define(kw_only=True)
class SchedulerJobStatus:
    """What the scheduler says about one of the user's batch jobs (pushed to ``Site.queued_jobs``)."""

    scheduler_id: int
    state: BatchJobState
    queue: str
    num_nodes: int
    wall_time_min: int
    project: str
    time_remaining_min: int
    queued_time_min: int
    #: The scheduler's own word on why the job is not running yet (Slurm pending reason, PBS
    #: comment, Cobalt hold state); empty when it says nothing. Not in the 0.7 wire format: the
    #: wire leaves it out when empty (``OMIT_IF_DEFAULT``: a 0.7 client under pydantic's
    #: extra="allow", set by libEnsemble, refuses the unknown key, so Site.objects.get failed).
    message: str = attrs.field(default="", metadata={"omit_if_default": True})


#: ``--site`` words that select something other than the site of that name (the CLI's
#: balsam.cli._site_selector): every site, the active sites, the current site.
SITE_SELECTOR_ALL, SITE_SELECTOR_ACTIVE, SITE_SELECTOR_THIS = "all", "active", "this"
SITE_SELECTOR_WORDS = frozenset({SITE_SELECTOR_ALL, SITE_SELECTOR_ACTIVE, SITE_SELECTOR_THIS})


def site_name_problem(name: str) -> str:
    """Why ``--site NAME`` could never select a site of this name ("" when it can): digits are read
    as a site id, a comma separates several selectors, all/active/this are selectors of their own.
    The server refuses such a name on create and rename (balsam.server.routes.sites)."""
    word = name.strip()
    if word.isdecimal():
        return f"must not be all digits ({name!r}): `--site {word}` means the site with id {word}"
    if "," in name:
        return f"must not contain a comma ({name!r}): `--site a,b` means the sites a and b"
    if word in SITE_SELECTOR_WORDS:
        return (f"must not be {word!r}: `--site {word}` selects "
                f"{'the current site' if word == SITE_SELECTOR_THIS else f'{word} sites'}")
    return ""


@attrs.define(kw_only=True)
class Site:
    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    name: str
    path: Path
    globus_endpoint_id: Optional[str] = None
    backfill_windows: dict[str, list[BackfillWindow]] = attrs.Factory(dict)
    queued_jobs: dict[int, SchedulerJobStatus] = attrs.Factory(dict)
    optional_batch_job_params: dict[str, str] = attrs.Factory(dict)
    allowed_projects: list[str] = attrs.Factory(list)
    allowed_queues: dict[str, AllowedQueue] = attrs.Factory(dict)
    transfer_locations: dict[str, str] = attrs.Factory(dict)
    last_refresh: Optional[dt.datetime] = attrs.field(default=None, metadata=SERVER)
    creation_date: Optional[dt.datetime] = attrs.field(default=None, metadata=SERVER)


@attrs.define(kw_only=True)
class AppParameter:
    required: bool
    default: Optional[str] = None
    help: str = ""


@attrs.define(kw_only=True)
class TransferSlot:
    required: bool
    direction: TransferDirection
    local_path: Path
    description: str = ""
    recursive: bool = False


@attrs.define(kw_only=True)
class App:
    """The server-side record of an ApplicationDefinition."""

    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    site_id: int
    name: str
    serialized_class: str
    source_code: str
    description: str = ""
    parameters: dict[str, AppParameter] = attrs.Factory(dict)
    transfers: dict[str, TransferSlot] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class JobTransferItem:
    location_alias: str
    path: Path


def workdir_problem(workdir: Any) -> Optional[str]:
    """Why ``workdir`` cannot be a job's working directory, or None.

    A workdir is a relative path inside the site's ``data/`` directory: never absolute, never
    ``..`` (``a/../../x`` climbs out as surely as ``../x``), never empty or ``.`` (data/ itself).
    """
    text = str(workdir) if workdir is not None else ""
    if ".." not in text and text.strip("./") and not text.startswith("/") and text.strip() == text:
        return None  # the usual case, without splitting the path (launchers check every job)
    if not text.strip():
        return "must not be empty (a path relative to the site's data/ directory)"
    if text.startswith("/"):
        return f"must be relative to the site's data/ directory, got the absolute path {text!r}"
    parts = PurePosixPath(text).parts
    if ".." in parts:
        return f"must stay inside the site's data/ directory ('..' is not allowed), got {text!r}"
    if not parts:
        return f"must name a directory inside the site's data/ directory, not data/ itself (got {text!r})"
    return None


def site_path_problem(path: Any) -> Optional[str]:
    """Why ``path`` cannot be a site's path, or None: the site's directory on its host, absolute
    (the API checks it; the Python API checks it too when the field is set)."""
    return None if str(path).startswith("/") else f"must be an absolute path, got {str(path)!r}"


def job_workdir(data_path: "Path | str", workdir: Any) -> Path:
    """``data_path / workdir``, checked again where jobs run (the API refuses bad workdirs, but a
    launcher must not trust that): raises ValueError if it would leave ``data_path``."""
    problem = workdir_problem(workdir)
    if problem is not None:
        raise ValueError(f"workdir {problem}")
    return (data_path if isinstance(data_path, Path) else Path(data_path)) / str(workdir)


@attrs.define(kw_only=True)
class Job:
    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    workdir: Path
    app_id: int
    tags: dict[str, str] = attrs.Factory(dict)
    serialized_parameters: str = ""
    data: dict[str, Any] = attrs.Factory(dict)
    return_code: Optional[int] = None
    num_nodes: int = 1
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    launch_params: dict[str, str] = attrs.Factory(dict)
    gpus_per_rank: float = 0.0
    node_packing_count: int = 1
    wall_time_min: int = 0
    parent_ids: set[int] = attrs.field(factory=set, metadata=CREATE_ONLY)
    transfers: dict[str, JobTransferItem] = attrs.field(factory=dict, metadata=CREATE_ONLY)
    batch_job_id: Optional[int] = None
    state: Optional[JobState] = None
    state_timestamp: Optional[dt.datetime] = attrs.field(default=None, metadata=UPDATE_ONLY)
    state_data: dict[str, Any] = attrs.field(factory=dict, metadata=UPDATE_ONLY)
    pending_file_cleanup: bool = True
    serialized_return_value: str = ""
    serialized_exception: str = ""
    last_update: Optional[dt.datetime] = attrs.field(default=None, metadata=SERVER)

    #: Fields never stored on the job row (they describe an event or create child rows).
    NOT_STORED: ClassVar[frozenset[str]] = frozenset({"state_timestamp", "state_data", "transfers"})


@attrs.define(kw_only=True)
class BatchJobPartition:
    job_mode: BatchJobMode
    num_nodes: int
    filter_tags: dict[str, str] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class BatchJob:
    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    site_id: int
    project: str
    queue: str
    num_nodes: int
    wall_time_min: int
    job_mode: BatchJobMode
    optional_params: dict[str, str] = attrs.Factory(dict)
    filter_tags: dict[str, str] = attrs.Factory(dict)
    partitions: Optional[list[BatchJobPartition]] = None
    scheduler_id: Optional[int] = None
    state: BatchJobState = BatchJobState.pending_submission
    status_info: dict[str, str] = attrs.Factory(dict)
    start_time: Optional[dt.datetime] = None
    end_time: Optional[dt.datetime] = None


@attrs.define(kw_only=True)
class Session:
    """A launcher's (or the processing module's) lease on the jobs it acquired."""

    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    site_id: int
    batch_job_id: Optional[int] = None
    heartbeat: Optional[dt.datetime] = attrs.field(default=None, metadata=SERVER)


@attrs.define(kw_only=True)
class SessionAcquire:
    """Body of ``POST /sessions/{id}``: which jobs a session wants to lease."""

    max_num_jobs: int
    filter_tags: dict[str, str] = attrs.Factory(dict)
    max_wall_time_min: Optional[int] = None
    max_nodes_per_job: Optional[int] = None
    max_aggregate_nodes: Optional[float] = None
    #: Only jobs asking at most this many GPUs per node (``ranks_per_node * gpus_per_rank``): a
    #: launcher whose nodes have no GPU sends 0, and jobs that need one stay for another launcher.
    max_gpus_per_node: Optional[float] = None
    serial_only: bool = False
    sort_by: Optional[str] = None
    states: set[JobState] = attrs.Factory(lambda: {JobState.preprocessed, JobState.restart_ready})
    app_ids: set[int] = attrs.Factory(set)


@attrs.define(kw_only=True)
class TransferItem:
    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    job_id: int = attrs.field(metadata=SERVER)
    direction: TransferDirection = attrs.field(metadata=SERVER)
    local_path: Path = attrs.field(metadata=SERVER)
    remote_path: Path = attrs.field(metadata=SERVER)
    location_alias: str = attrs.field(metadata=SERVER)
    recursive: bool = attrs.field(default=False, metadata=SERVER)
    state: TransferItemState = TransferItemState.pending
    task_id: str = ""
    transfer_info: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class EventLog:
    """One job state change (table ``log_events``); read-only."""

    id: Optional[int] = attrs.field(default=None, metadata=SERVER)
    job_id: int = attrs.field(metadata=SERVER)
    timestamp: dt.datetime = attrs.field(metadata=SERVER)
    from_state: str = attrs.field(metadata=SERVER)
    to_state: str = attrs.field(metadata=SERVER)
    data: dict[str, Any] = attrs.field(factory=dict, metadata=SERVER)


ALL_MODELS: tuple[type, ...] = (User, Site, App, Job, BatchJob, Session, TransferItem, EventLog)

for _model in (AllowedQueue, BackfillWindow, SchedulerJobStatus, AppParameter, TransferSlot, JobTransferItem,
               BatchJobPartition, SessionAcquire, *ALL_MODELS):
    attrs.resolve_types(_model)
