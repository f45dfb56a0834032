"""The ``processing`` agent module: runs the app hooks between the launcher's runs.

========================  ==================  ==========================================
job state                 hook                default (app does not override the hook)
========================  ==================  ==========================================
STAGED_IN                 ``preprocess``      PREPROCESSED
RUN_DONE                  ``postprocess``     POSTPROCESSED
RUN_ERROR                 ``handle_error``    FAILED (tail of job.out in the event)
RUN_TIMEOUT               ``handle_timeout``  RESTART_READY
========================  ==================  ==========================================

A RUN_DONE job whose app keeps the default ``postprocess`` (not a ``run()`` app) mostly never
reaches this module: the launcher reports it POSTPROCESSED in the same call
(``launcher.default_postprocess_in_launcher``, on by default; the same test as here, see
:class:`~balsam.launcher.app_run.PreparedJob`). With the key off, or for jobs whose launcher did not
(a spooled update, a 0.7 launcher), this module gives it.

Jobs are leased through a Session of their own (no BatchJob), with the launchers'
:class:`~balsam.client.lease.JobLease` (exactly-once acquisition). An acquire that finds nothing
asks the server to wait for jobs (``Prefer: wait``, up to a cycle's sleep), so a launcher's RUN_DONE
is taken as soon as the server has it.
Jobs whose app keeps the default hook are moved in bulk in the agent process (no process is spawned:
this path carries the launchers' thousands of jobs per second). Jobs whose app overrides the hook
wait in a queue per app and go to a pool of ``num_workers`` worker processes, ``TASKS_PER_WORKER``
chunks per worker at most, the apps taking turns chunk by chunk (:meth:`ProcessingModule._feed`;
a cycle with jobs queued spends its sleep handing each freed worker its next chunk); the workers
append the hook's output to the job's ``balsam.log``. ``run()`` apps get their return value or
exception from ``job.out``.
The module holds ``prefetch_depth`` jobs at most (in the pools, queued, in its backlog), with one
exception, so that hooks never hold back the jobs that need none: when hook jobs take all of it
(slow hooks, hung ones), each cycle still acquires up to ``HOOK_OVERFLOW_ACQUIRE`` jobs, up to
``MAX_HELD_PER_PREFETCH`` x ``prefetch_depth`` held in all (the bound on memory). Those whose app
keeps the default hook are moved at once; more hook jobs join the queues. Queued jobs stay leased
to this module's session (its heartbeat lists no job ids: the server holds them by the session), so
no other session takes them; at stop, those not yet handed to a worker are released with the
session, their hooks never started (the next agent runs them once). Results go to
the launchers' BulkStatusUpdater (bulk PATCHes; retried through API outages, so no result is lost
while the jobs stay leased to this module's session). Each cycle also sends the job updates that
launchers spooled in the site's ``spool/`` because the API was gone when they stopped.
At stop, the results of the hooks that finish within ``HOOKS_STOP_LIMIT_SEC`` are sent before the
session is released (see :meth:`ProcessingModule.close`).
A worker writes each job's result to a results file of its task as the job's hook completes: when
a hook kills its worker (``os._exit``, a crash) or is ended at stop, the chunk's return value is
lost, but the jobs whose hooks completed keep their results; only the others run again, so no
completed hook runs twice: those whose hooks were running at a death each alone (one of them killed
the worker), the others (not started, or ended by a hook timeout's kill) queued as before. Each
cycle reads those files of the tasks still running: a completed hook's result is sent without
waiting for the rest of its chunk.
The files are in the site (``spool/hook-results/<agent>/``, one folder per agent, locked while it
lives), and a file is deleted only once the server has its results: when the agent itself dies (a
``kill -9``, a crash, the node lost), the next agent sends the results its hooks had recorded before
it acquires a job (:meth:`ProcessingModule._recover_results`), under the dead agent's session, so
those hooks do not run again either. A hook running at the agent's death has no result: it runs
again under the next agent once the dead session ends (at least once, not exactly once). Where the
dead agent ran on this host and kernel (its pid gone, its lock file naming this kernel's boot id:
certain), the next agent ends that session itself once those results are sent and the site's spool
is empty (``DELETE /sessions/{id}``: the folder's lock file names it), so its
jobs are released at once rather than at the session's expiry; an agent of another host's session
is left to expire (its death is only inferred from a silent lock file).
(An unlocked folder is taken for a dead agent's only once its pid is gone, or, from another host,
once its lock file is silent: :func:`_owner_gone`. Where the site's file system refuses ``flock``
or is full, the folder is in /tmp, without that replay: :meth:`ProcessingModule._make_results_dir`.)
The worker (:func:`~balsam.site.hooks_runner.run_hooks`, one call per chunk, the file's one writer)
also writes a line there as each hook starts, so the module knows which hook runs, in which worker,
since when: a hook running longer than ``hook_timeout_sec`` has its worker killed and
its job FAILED (a WARNING names it at half that time); the rest of its chunk takes the worker-death
path above.
Nothing of the pools outlives the agent, a SIGKILLed one included: each worker watches a pipe whose
write end only the agent holds, and kills itself when it reads EOF; the forkserver and the resource
tracker then exit by themselves (see :func:`_end_with_agent`).
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import attrs

from ...client.lease import JobLease, tick_period_from_env
from ...client.status_updater import SESSION_KEY, BulkStatusUpdater, SpoolReplayer, excerpt, http_status
from ...models import MAX_JOBS_PER_SESSION_ACQUIRE, workdir_problem
from ...options import option
from ...states import PROCESSABLE_STATES, JobState
from ...launcher.spawner import boot_id  # stdlib only: the spawner's own identity of this kernel
from ...util import NO_ROOM_ERRNOS, START_TIME_TOLERANCE_SEC, process_start_time
from ..apps import AppCache
from ..hooks_runner import (
    HOOK_FOR_STATE,
    NOT_APPLIED_KEY,
    SAVED_KEY,
    WORKDIR_KEY,
    WORKDIR_NO_ROOM,
    api_json,
    default_update,
    now_iso,
    read_results,
    run_hooks,
)
from ..module import AgentModule
from ..site_ops import agent_silence_limit

#: The module's own logger, for what runs outside a module instance (the replay updater's thread).
_logger = logging.getLogger("balsam.site.modules.processing")

#: Jobs handed to one worker task (amortizes the IPC and app deserialization).
WORKER_CHUNK = 16
#: Tasks (chunks) in the shared pool at once, per worker: the one it runs and the next, ready. The
#: other hook jobs wait in the module's queues, one per app, and the apps take turns (see
#: :meth:`ProcessingModule._feed`): one app's thousands of jobs hold another's back by a few chunks
#: at most, and a worker death (a hook timeout) breaks only the chunks in the pool.
TASKS_PER_WORKER = 2
#: When the jobs waiting for the hook workers (in the pool and queued) take all of
#: ``prefetch_depth``, each cycle still acquires up to this many jobs: those whose app keeps the
#: default hook are moved at once, behind hooks that are slow or hung...
HOOK_OVERFLOW_ACQUIRE = 100
#: ...while the module holds fewer than this many times ``prefetch_depth`` jobs in all (memory).
MAX_HELD_PER_PREFETCH = 2
SESSION_TICK_SEC = 30.0
#: While jobs keep arriving (a launcher is finishing them), cycles this often (a launcher's status
#: updater sends a batch every 0.1 s)...
FOLLOW_UP_SEC = 0.1
#: ...until this long after the last job arrived; then every ``period``.
FOLLOW_UP_WINDOW_SEC = 2.0
#: Hooks still running in the workers (and nothing arriving): their results are looked for this often.
HOOKS_POLL_SEC = 0.2
#: At stop, the hook chunks in the workers (running or queued) get this long to finish...
HOOKS_STOP_WAIT_SEC = 20.0
#: ...then those not started are cancelled, and the hooks already running get until this long after
#: the stop began; the workers of those still running then are ended. Their jobs are released with
#: the session, and their hooks run again under the next agent. Within ``balsam site stop``'s
#: default 45 s, with room to send the results.
HOOKS_STOP_LIMIT_SEC = 35.0
#: A worker ended at stop (or by a hook timeout) gets this long to go after SIGTERM, then SIGKILL,
#: and this long again to be gone: a hook may ignore SIGTERM, and a worker left running keeps its
#: hook going beside the next agent's run of it, and the interpreter's exit waits for it.
WORKER_END_GRACE_SEC = 2.0
#: The launcher's reasons of the RUN_TIMEOUT jobs a cycle moves by the default handle_timeout are
#: read from their events (the acquired jobs carry no ``state_data``), this many job ids per GET (a
#: URL of a few kB)...
TIMEOUT_REASON_IDS_PER_GET = 500
#: ...newest RUN_TIMEOUT events first, up to this many pages per GET's ids (a job re-run many times
#: has older RUN_TIMEOUT events; the jobs whose reason is still not found get the default message)...
TIMEOUT_REASON_PAGES = 3
#: ...with this many retries: the reason is worth one, not a cycle held through an API outage.
TIMEOUT_REASON_RETRY_COUNT = 1
#: The hook workers' results files go in ``<site spool>/HOOK_RESULTS_DIR/<agent>/``, beside
#: ``<agent>.lock``, which the agent holds locked (``flock``) for its life: the kernel releases it
#: when the agent dies, however it dies, and the next agent then sends what is left there.
#: A sub-folder: the launchers' spool files are the ``*.jsonl`` at the top of the spool folder.
HOOK_RESULTS_DIR = "hook-results"
#: A results file's name: ``<task number>-s<session id>.jsonl``, the session that held its jobs.
_RESULTS_NAME = re.compile(r"^\d+-s(\d+)\.jsonl$")
#: An agent's lock file (``<agent>.lock``) holds the kernel boot id of its host (``boot <id>``, its
#: first line) and the ids of the processing sessions it held jobs under (``processing <id>``, one a
#: line): the next agent ends them once that agent is certainly dead (a session may hold jobs and no
#: results file). In the lock file, not the folder: the folder holds results files only. Only lines
#: of that kind are ended: a line of another shape (an older version's bare id, a corrupted line)
#: could name a launcher's session, whose DELETE would make its RUNNING jobs RUN_TIMEOUT.
_SESSION_LINE = "processing"
_BOOT_LINE = "boot"
#: Retries of the DELETE of a dead agent's session: past them, the session's expiry releases its jobs.
END_DEAD_SESSION_RETRY_COUNT = 2
_LOCK_SUFFIX = ".lock"
#: A lock file is made and locked under this name, then renamed to ``<agent>.lock``: a starting
#: agent's recovery never finds it unlocked in between (and took it for a dead agent's).
_NEW_LOCK_SUFFIX = ".lock.new"
#: The agent touches its lock file this often (mtime): where a lock is seen only on its own node
#: (Lustre ``localflock``, NFS ``local_lock=flock``), an agent on another host takes the folder for
#: a dead agent's only once the lock has not been touched for the agent silence limit.
LOCK_TOUCH_SEC = 10.0
#: A job whose workdir cannot be prepared for want of room (ENOSPC, EDQUOT: the site's fault, not
#: the job's) is given back as the launcher gives such jobs back: not FAILED, held (still leased to
#: this module's session, released with it at stop) and tried again this often, a WARNING when the
#: first is held and an INFO once the workdirs of those given back are made (:meth:`ProcessingModule._room_again`).
NO_ROOM_RETRY_SEC = 10.0
#: What the module leases while jobs wait for room: its states whose hooks make no workdir.
NO_WORKDIR_STATES: frozenset[JobState] = PROCESSABLE_STATES - {JobState.staged_in}


def _room_where(workdir: Path) -> tuple[Path, str]:
    """The file system where ``workdir`` could not be made: its nearest existing directory (itself,
    if it was a file in it that failed), and the bytes and inodes free there. statvfs(data_path)
    told of another file system where the workdir's (a tmpfs, a quota'd project directory mounted
    below data) had no free inode: 'data has 82 GB free'."""
    where = workdir
    while not os.path.isdir(where) and where != where.parent:  # os.path: False, not raised, on EACCES
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError as exc:
        return where, f"free space unknown: {exc}"
    return where, f"{st.f_bavail * st.f_frsize} bytes free and {st.f_favail} inodes free"


#: The agent's end of the "agent alive" pipe, and the process it belongs to (see :func:`_agent_alive`).
_alive_pipe: Optional[tuple[Connection, Connection, int]] = None
_alive_lock = threading.Lock()


def _agent_alive() -> Connection:
    """The read end of this process's "agent alive" pipe, for its hook workers: the write end is
    held by this process alone (``os.pipe`` is close-on-exec, and forkserver workers inherit
    nothing from it) and never written to, so a worker reads EOF exactly when this process is gone,
    whatever ended it. Made once per process and kept until its exit: closing it would end the
    workers of every pool, also those a later pool of the process still runs."""
    global _alive_pipe
    with _alive_lock:
        if _alive_pipe is None or _alive_pipe[2] != os.getpid():
            reader, writer = multiprocessing.Pipe(duplex=False)
            _alive_pipe = (reader, writer, os.getpid())
        return _alive_pipe[0]


def _balsam_environ() -> dict[str, str]:
    """This process's ``BALSAM_*`` variables, for :func:`_worker_init`."""
    return {key: value for key, value in os.environ.items() if key.startswith("BALSAM_")}


def _worker_init(agent_alive: Optional[Connection] = None, environ: Optional[dict[str, str]] = None) -> None:
    # Ctrl-C in a foreground agent reaches the whole process group: the agent stops the pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if environ is not None:
        # The forkserver is started once per process, with the environment of that moment, and the
        # workers are forked from it: a hook's own API calls (self.job.save()) went to the server
        # and user ($BALSAM_HOME ...) of the process's first pool, not of the module's site.
        for key in [key for key in os.environ if key.startswith("BALSAM_") and key not in environ]:
            del os.environ[key]
        os.environ.update(environ)
        default = sys.modules.get("balsam.client.default")
        if default is not None:
            default.reset_default_client()
    if agent_alive is not None:
        threading.Thread(target=_end_with_agent, args=(agent_alive,), name="balsam-agent-watch", daemon=True).start()


def _end_with_agent(agent_alive: Connection) -> None:
    """Worker thread: wait for the agent's end (EOF on ``agent_alive``), then SIGKILL this worker
    (the hook it runs is released with the agent's session and runs again under the next agent).

    Why: a SIGKILLed agent never shuts its pools down, and nothing else ended them: the workers block
    on their call queue, whose write end they hold themselves; the forkserver (their parent, not the
    agent) exits only once every holder of its "alive" pipe is gone, the workers included; the
    resource tracker exits once every holder of its pipe (the agent, the workers) is gone. All four
    stayed, orphaned, for ever (~70 MiB per killed agent). Once the workers end themselves, the
    forkserver and the tracker exit by themselves, the tracker unlinking the pools' semaphores in
    /dev/shm first (why a worker kills only itself, not the agent's process group: a killed tracker
    leaves them there).
    ``prctl(PR_SET_PDEATHSIG)`` in the workers would not do it: it fires on the death of their
    parent, the forkserver, which waits for the workers. A pipe works on macOS as well as Linux.
    A hook that holds the GIL (a C call that never releases it) delays its worker's end until it
    lets go; hooks' own child processes are not ended (they are not the pool's)."""
    try:
        while os.read(agent_alive.fileno(), 1):  # nothing is ever written: returns at EOF
            pass
    except OSError:  # the fd was closed under us (a hook closing every fd): cannot watch, let it run
        return
    os.kill(os.getpid(), signal.SIGKILL)


@attrs.define
class _HookTask:
    """What the module knows of one worker task (a chunk of jobs of one app) while it runs."""

    #: The pool it runs in (the one whose worker is killed when its hook times out).
    pool: Optional[cf.ProcessPoolExecutor]
    #: Bytes of its results file read so far: whole lines only.
    offset: int = 0
    #: The job whose hook runs now (its start line read, its result not), its worker's pid, and
    #: when the module read the start line (``ProcessingModule.clock``).
    running: Optional[int] = None
    pid: Optional[int] = None
    since: float = 0.0
    warned: bool = False


def _count_states(jobs: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.get("state", "?")] = counts.get(job.get("state", "?"), 0) + 1
    return counts


#: The most hook worker processes: each is a Python process of its own (tens of MB), fed by the
#: agent's one processing thread at TASKS_PER_WORKER tasks each; a thousand already outruns what one
#: thread feeds, and a huge number (1e20 passed the check) could never be started.
MAX_NUM_WORKERS = 1024


@attrs.frozen
class ProcessingSettings:
    """The ``processing:`` section of settings.yml."""

    num_workers: int = option(2, "Processes running the apps' preprocess/postprocess hooks.")
    prefetch_depth: int = option(1000, "Jobs fetched ahead for the hook workers.")
    hook_timeout_sec: float = option(
        3600.0, "Seconds a hook may run: one running longer has its worker killed and its job FAILED "
        "('<hook> hook timed out after N s'). A WARNING names the job at half that time.")

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.num_workers < 1:
            problems["num_workers"] = "must be at least 1"
        elif self.num_workers > MAX_NUM_WORKERS:
            problems["num_workers"] = f"must be at most {MAX_NUM_WORKERS}, got {self.num_workers!r}"
        if self.prefetch_depth < 1:
            problems["prefetch_depth"] = "must be at least 1"
        if not self.hook_timeout_sec > 0:
            problems["hook_timeout_sec"] = "must be more than 0"
        return problems


class ProcessingModule(AgentModule):
    section = "processing"
    default_period = 1.0
    period_fields = ()
    options_schema = ProcessingSettings
    section_comment = "Runs the apps' preprocess/postprocess hooks."
    enabled_by_default = True

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        super().__init__(site_config, config, client)
        self.apps = AppCache(client)
        self.lease: Optional[JobLease] = None
        self.pool: Optional[cf.ProcessPoolExecutor] = None
        #: Each worker task's jobs still without a result (its completed hooks' results are taken
        #: from its results file as they come, see _read_progress).
        self.pending: dict[cf.Future, list[dict]] = {}
        self.tasks: dict[cf.Future, _HookTask] = {}
        #: Ids of jobs whose hook timed out (their worker is being killed) -> the reason they fail with.
        self.timed_out: dict[int, str] = {}
        #: The pools this module broke itself, killing the worker of a hook that timed out (id ->
        #: pool, held so that its id is not another's), kept until their last task is harvested:
        #: the pool fails its futures one by one, so the hung job's chunk may be harvested a cycle
        #: before the others (and the hung hook's result may come as its worker is killed).
        self.timeout_pools: dict[int, cf.ProcessPoolExecutor] = {}
        #: Times the hooks (monotonic seconds); tests put a clock of their own.
        self.clock: Callable[[], float] = time.monotonic
        self.updater: Optional[BulkStatusUpdater] = None
        self.spool: Optional[SpoolReplayer] = None
        #: Jobs leased but not yet handled (e.g. the app lookup failed in an API outage): kept for
        #: the next cycle, since no other session can take them while we hold them.
        self.backlog: list[dict] = []
        #: Jobs leased for a hook of their app's own that wait for a worker (app id -> jobs, in the
        #: order the apps take turns): the pool gets ``TASKS_PER_WORKER`` chunks per worker at
        #: most (see _feed). They stay leased to our session meanwhile; at close they are released
        #: with it, their hooks not run.
        self.queued: dict[int, deque[dict]] = {}
        #: Ids of jobs whose hook worker died while they were in its chunk: run again alone, once,
        #: one at a time in a pool of one worker of their own (a death there is theirs alone).
        self.alone: set[int] = set()
        #: Those waiting for the one running alone.
        self.alone_queue: deque[dict] = deque()
        #: Ids of jobs queued again after a worker death as not suspects (their hooks had not started,
        #: or a hook timeout's kill ended them), until they have a result: a second death in their
        #: chunk runs them alone after all (a results file that could not be written has no start
        #: lines, and a job that kills its worker must not be queued again and again).
        self.requeued: set[int] = set()
        self.isolation_pool: Optional[cf.ProcessPoolExecutor] = None
        self.isolated: Optional[cf.Future] = None
        #: Set as a hook task ends (from the pool's thread): a cycle that has hook jobs queued
        #: feeds the freed worker at once rather than at the next cycle (see _feed_while_waiting).
        self._task_done = threading.Event()
        #: Each hook task's results file (see run_hooks): after a worker death, the jobs of its chunk
        #: whose hooks completed keep their results; only the others run again.
        self.results_files: dict[cf.Future, Optional[Path]] = {}
        #: The results folder: the site's (see HOOK_RESULTS_DIR), or one in /tmp where the site's
        #: cannot be made or locked, or None where neither can (then no results files at all).
        self._results_dir: Optional[Path] = None
        self._results_dir_made = False
        #: The sessions written in the folder's lock file (see _note_session).
        self._noted_sessions: set[int] = set()
        #: The lock of ``_results_dir`` (held while this module lives: see HOOK_RESULTS_DIR); None
        #: for a folder in /tmp. Touched every LOCK_TOUCH_SEC (``_touched``: when, monotonic) by a
        #: thread of its own: a cycle blocked for minutes (API outage retries) must not make this
        #: agent look dead to the agents of other hosts (see _owner_gone).
        self._results_lock: Optional[int] = None
        self._touched = 0.0
        self._toucher: Optional[threading.Thread] = None
        self._stop_touching = threading.Event()
        self._results_count = itertools.count()
        #: Results files whose results are all handed to the status updater, and (with the sequence
        #: of the last of them) those waiting for the updater to have sent them: a file deleted
        #: sooner loses its results if the agent dies first, and the next agent runs its hooks again.
        self._spent_files: list[Path] = []
        self._retiring: deque[tuple[int, Path]] = deque()
        self._last_sequence = 0
        #: The results folders of dead agents being replayed: (sequence of the last result, the
        #: folder, its lock file, the lock's fd, the dead agent's sessions to end: empty unless it
        #: certainly died, see _recover_results); deleted once the updater is through them.
        self._recovering: list[tuple[int, Path, Path, int, list[int]]] = []
        #: Their sessions to end, by folder name, once their results are sent (_end_dead_sessions).
        self._to_end: list[tuple[str, list[int]]] = []
        self._recovered = False
        #: Lock files (``.lock`` and ``.lock.new``) of folders seen unlocked whose agent may live
        #: (_owner_gone said no: a lock touched lately on another host, a pid still running): looked
        #: at again every LOCK_TOUCH_SEC (``_rechecked``: when, monotonic) until their agent is
        #: gone, so that a folder seen "fresh" at this agent's start is still replayed once silent.
        self._skipped: set[Path] = set()
        self._rechecked = 0.0
        #: Sends those results (see _replay_updater).
        self.replay_updater: Optional[BulkStatusUpdater] = None
        self.processed = 0
        #: Jobs given back for want of room to prepare their workdirs (see NO_ROOM_RETRY_SEC), when
        #: they are tried again (monotonic), and the ids of those given back without a result yet.
        #: ``_no_room_since``: when the first was held (None: the disk has room as far as we know,
        #: or nothing given back is left to tell: see _room_again).
        self.no_room: list[dict] = []
        #: close() has begun: a job given back now is released with the session, not tried again.
        self._stopping = False
        self._no_room_retry_at = 0.0
        self._no_room_since: Optional[float] = None
        self._no_room_ids: set[int] = set()
        #: The jobs handed to the hook workers, by id, until their result is sent: a result marked
        #: WORKDIR_NO_ROOM gives its job back (_take_no_room).
        self._hook_jobs: dict[int, dict] = {}
        #: When a cycle last acquired jobs (monotonic seconds; None: never).
        self._last_arrival: Optional[float] = None

    # -- configuration -----------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return int(self.options.num_workers)

    @property
    def prefetch_depth(self) -> int:
        return int(self.options.prefetch_depth)

    @property
    def hook_timeout_sec(self) -> float:
        return float(self.options.hook_timeout_sec)

    @property
    def max_tasks(self) -> int:
        """Tasks (chunks) in the shared pool at once (see ``TASKS_PER_WORKER``)."""
        return self.num_workers * TASKS_PER_WORKER

    @property
    def max_held(self) -> int:
        """Jobs the module holds at most (in the pools, queued for them, in its backlog)."""
        return MAX_HELD_PER_PREFETCH * self.prefetch_depth

    @property
    def data_path(self) -> Path:
        return Path(getattr(self.site_config, "data_path", Path(self.site_config.site_path) / "data"))

    @property
    def tail_num_lines(self) -> int:
        return int(self.site_config.settings.launcher.error_tail_num_lines)

    def _filter_tags(self) -> dict:
        return dict(getattr(getattr(self.site_config, "settings", None), "filter_tags", None) or {})

    # -- session -----------------------------------------------------------------------------------
    @property
    def session_id(self) -> Optional[int]:
        return self.lease.session_id if self.lease is not None else None

    def _acquire(self, max_jobs: int, wait_sec: Optional[float] = None,
                 states: Optional[Iterable[JobState]] = None) -> list[dict]:
        if self.lease is None:
            self.lease = JobLease(
                self.client, self.site_id, filter_tags=self._filter_tags(), states=PROCESSABLE_STATES,
                tick_period=min(SESSION_TICK_SEC, tick_period_from_env()), heartbeat_thread=False,
                name="processing session",
            )
        self._note_session()  # before it holds any job
        try:
            return self.lease.acquire(max_jobs, wait_sec=wait_sec, states=states)
        finally:
            self._note_session()  # a session replaced during the acquire

    def _note_session(self) -> None:
        """Append our session's id to the results folder's lock file (once per session): if this
        agent dies, the next one on this host ends that session (_recover_results) rather than wait
        for its expiry. Best effort: a session not noted (no folder yet, one in /tmp without a lock
        file and without replay, a write refused) expires."""
        session_id = self.session_id
        if (session_id is None or session_id in self._noted_sessions or self._results_lock is None
                or self._results_dir is None):
            return
        try:
            with open(_lock_of(self._results_dir), "a") as file:
                file.write(f"{_SESSION_LINE} {session_id}\n")
        except OSError:
            return
        self._noted_sessions.add(session_id)

    def _tick(self) -> None:
        if self.lease is not None:
            self.lease.tick_if_due()

    # -- worker pool -------------------------------------------------------------------------------
    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            # forkserver: the agent has threads, and forking a threaded process is unsafe.
            # The workers end themselves when the agent is gone, a SIGKILL included (_end_with_agent).
            self.pool = cf.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_worker_init,
                initargs=(_agent_alive(), _balsam_environ()),
            )
        return self.pool

    def _isolation_pool(self) -> cf.ProcessPoolExecutor:
        if self.isolation_pool is None:
            self.isolation_pool = cf.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("forkserver"), initializer=_worker_init,
                initargs=(_agent_alive(), _balsam_environ()),
            )
        return self.isolation_pool

    @property
    def spool_path(self) -> Path:
        return Path(getattr(self.site_config, "spool_path", Path(self.site_config.site_path) / "spool"))

    def _updater(self) -> BulkStatusUpdater:
        if self.updater is None:
            # Results go under this module's session (the one holding the jobs now): the server
            # refuses those of a job a user moved meanwhile (failed it, re-queued it), which this
            # module would otherwise overwrite with a stale hook result.
            self.updater = BulkStatusUpdater(
                self.client, max_wait_sec=0.05, close_timeout=30.0, name="processing-updates", spool_dir=self.spool_path,
                session_id=lambda: self.session_id, on_refused=self._fail_refused_result,
            )
            self.spool = SpoolReplayer(self.spool_path, self.updater)
        return self.updater

    def _fail_refused_result(self, update: dict, error: BaseException) -> Optional[dict]:
        """A hook result the server refuses as invalid (422: a hook set ``num_nodes = 0``, a tag that
        is not text ...) fails its job with the server's reason: dropped, it left the job leased to
        this session and never processed again. Other refusals are not ours to override: 409 is a
        job a user moved meanwhile (or whose lease we lost), 404 a deleted job."""
        if http_status(error) != 422 or update.get("state") is None:
            return None
        reason = " ".join(_refusal_reason(error).split())[:1000]
        self.logger.warning("job %s: the server refused its hook result (%s); the job is FAILED", update.get("id"), reason)
        failed = {"id": update["id"], "state": JobState.failed.value, "state_timestamp": now_iso(),
                  "state_data": api_json({"message": f"the server refused the hook's result: {reason}"})}
        if SESSION_KEY in update:
            failed[SESSION_KEY] = update[SESSION_KEY]
        return failed

    def _send(self, updates: list[dict]) -> None:
        updater = self._updater()
        saved = [u["id"] for u in updates if u.get(SAVED_KEY)]
        if saved:
            # The hook saved the state itself: the server has it and no longer leases the job to
            # this session, which would have the same state refused (an ERROR line for a job that
            # is fine).
            self.logger.info("jobs %s: their hooks saved their new states themselves (self.job.save()); nothing "
                             "more to send", saved[:20])
            lost = [u for u in updates if u.get(SAVED_KEY) and u.get(NOT_APPLIED_KEY)]
            if lost:
                # One line for the lot (a launcher that took many such jobs): the first job's reason.
                more = f" (and {len(lost) - 1} more jobs: {[u['id'] for u in lost[1:21]]})" if len(lost) > 1 else ""
                self.logger.warning("job %s: %s%s", lost[0]["id"], lost[0][NOT_APPLIED_KEY], more)
        for update in updates:
            if update.get(SAVED_KEY):
                continue
            fields = dict(update)
            job_id = fields.pop("id")
            state = fields.pop("state", None)
            timestamp = fields.pop("state_timestamp", None)
            state_data = fields.pop("state_data", None)
            fields.pop(WORKDIR_KEY, None)  # the worker's word to this module (_take_no_room), not a job field
            if state_data:
                # The server refuses a NUL or a lone surrogate (an exception's text, a job's output):
                # a refused result leaves its job leased to this session, never processed again.
                state_data = api_json(state_data)
            self._last_sequence = updater.put(job_id, state, timestamp, state_data, **fields)
        updater.send_soon()  # a cycle's results come together: nothing to wait for
        self.processed += len(updates)
        for update in updates:
            self._hook_jobs.pop(update["id"], None)
        if self._no_room_ids:
            # Settled, by whatever result: a job given back that is FAILED otherwise (its app cannot
            # be loaded, its hook raised) says nothing of the room (_room_again says when there is).
            self._no_room_ids.difference_update(update["id"] for update in updates)
            if not self._no_room_ids and not self.no_room and self._no_room_since is not None:
                # Nothing given back is left to tell whether there is room: a full disk met later
                # is warned of again.
                self._no_room_since = None
        if self.requeued:
            self.requeued.difference_update(update["id"] for update in updates)

    def _hold_no_room(self, job: dict, error: str) -> None:
        """Give ``job`` back for want of room to prepare its workdir: held, tried again every
        NO_ROOM_RETRY_SEC, never FAILED; logged once (a WARNING naming the path and the room left)
        while the disk stays full, not once per job."""
        self.no_room.append(job)
        self._no_room_ids.add(job["id"])
        if not self._no_room_retry_at:
            self._no_room_retry_at = time.monotonic() + NO_ROOM_RETRY_SEC
        if self._stopping:
            # A result harvested while the module stops: released with the session below ("stopping:
            # N jobs held ... are released"), never tried again here (a WARNING promised retries).
            self.logger.debug("job %s given back for want of room while stopping (released): %s", job["id"], error)
        elif self._no_room_since is None:
            self._no_room_since = time.monotonic()
            where, room = _room_where(self.data_path / job["workdir"])
            self.logger.warning("job %s: %s; %s has %s: the jobs whose workdirs cannot be prepared are given back, "
                                "not FAILED, and tried again every %g s until there is room", job["id"], error,
                                where, room, NO_ROOM_RETRY_SEC)
        else:
            self.logger.debug("job %s given back for want of room: %s", job["id"], error)

    def _take_no_room(self, updates: list[dict]) -> list[dict]:
        """``updates`` (hook workers' results) without their ``WORKDIR_KEY``, less those marked
        WORKDIR_NO_ROOM: balsam's own preparation of the workdir found no room, and those jobs are
        given back (:meth:`_hold_no_room`). By that field, not by the error's text: a hook whose
        job's error reads the same (set by the hook itself) is FAILED as any failing hook. A job
        given back whose result has no mark (its workdir was made, its hook ran) shows that there
        is room again."""
        kept, made = [], []
        for update in updates:
            mark = update.get(WORKDIR_KEY)
            if mark is not None:
                update = {key: value for key, value in update.items() if key != WORKDIR_KEY}
            job = self._hook_jobs.pop(update.get("id"), None) if mark == WORKDIR_NO_ROOM else None
            if job is not None:
                self._hold_no_room(job, (update.get("state_data") or {}).get("error", "no room"))
                continue
            # A no-room result of a job not known here (none is expected) is sent as the FAILED it is.
            kept.append(update)
            if mark is None and update.get("id") in self._no_room_ids:
                made.append(update["id"])
        if made:
            self._room_again(made)
        return kept

    def _room_again(self, made: list[int]) -> None:
        """The workdirs of ``made``, jobs given back for want of room, were made now: the disk has
        room again, said once (INFO) when no job is held any more. Only then: a job given back that
        gets another result (FAILED: its app cannot be loaded, its workdir is refused otherwise)
        says nothing of the room, and the INFO came on any result."""
        self._no_room_ids.difference_update(made)
        if self._no_room_since is not None and not self.no_room:
            self.logger.info("job workdirs can be prepared again in %s after %.0f s: the jobs given back "
                             "for want of room are processed", self.data_path, time.monotonic() - self._no_room_since)
            self._no_room_since = None

    def _retry_no_room(self) -> None:
        """The jobs given back for want of room go back to the backlog when due."""
        if self.no_room and time.monotonic() >= self._no_room_retry_at:
            self.backlog.extend(self.no_room)
            self.no_room = []
            self._no_room_retry_at = 0.0

    def _harvest(self) -> list[dict]:
        updates = self._read_progress()
        ended: list[dict] = []  # the FAILEDs this module makes for the jobs of hooks that did not return
        shared_pool, isolation_pool = self.pool, self.isolation_pool  # as they are now
        stopped: set[int] = set()
        # The pools that this module broke itself, killing the worker of a hook that timed out: the
        # job that ended the worker is known there, the others are not suspects (see below).
        # Recorded at the kill (_watch_hooks), kept until the pool's last chunk is harvested: found
        # from the tasks running now only, it was lost once the hung job's chunk had been harvested
        # (or its result read), and the others' hooks ended by the kill ran again, each alone.
        for t in self.tasks.values():
            if t.running is not None and t.running in self.timed_out and t.pool is not None:
                self.timeout_pools[id(t.pool)] = t.pool
        timed_out_pools = set(self.timeout_pools)
        for future in [f for f in self.pending if f.done()]:
            jobs = self.pending.pop(future)
            results_file = self.results_files.pop(future, None)
            task = self.tasks.pop(future, None)
            chunk_ids = [j["id"] for j in jobs]
            try:
                # Only the jobs still without a result: the others' came from the results file.
                updates.extend(u for u in future.result() if u.get("id") in chunk_ids)
            except Exception as exc:  # the worker process itself died (e.g. a hook called os._exit)
                # A broken pool fails its chunks' futures before it ends their workers: a worker
                # whose hook ignores SIGTERM could still be running hooks of this chunk. Its results
                # are final only once every worker of that pool is gone. The pool the chunk ran in
                # (its task's), not the module's pool now: the pool fails its futures one by one,
                # each waking the module, and a chunk harvested after a new pool was started for the
                # others killed the new pool's workers (and their hooks ran again, each alone).
                pool = task.pool if task is not None else isolation_pool if future is self.isolated else shared_pool
                if isinstance(exc, cf.process.BrokenProcessPool) and pool is not None and id(pool) not in stopped:
                    stopped.add(id(pool))
                    _kill_workers(pool)
                # The hooks of the chunk that completed before it died: their results, not a second
                # run (their side effects happened once already).
                completed = read_results(results_file, jobs)
                if completed:
                    updates.extend(completed.values())
                    self.alone.difference_update(completed)
                    jobs = [j for j in jobs if j["id"] not in completed]
                    self.logger.warning("hook worker died (%s): the hooks of jobs %s had completed; their results are kept",
                                        exc, sorted(completed))
                # A hook that timed out: its worker was killed for it. It fails with the reason,
                # and is not run again (it would hang again); the rest go the way of any death.
                hung = [j for j in jobs if j["id"] in self.timed_out]
                if hung:
                    ended.extend(_failed(j, self.timed_out[j["id"]]) for j in hung)
                    self.alone.difference_update(j["id"] for j in hung)
                    jobs = [j for j in jobs if j["id"] not in self.timed_out]
                if future is self.isolated:
                    self.isolation_pool = None  # the job alone killed it: it fails below
                elif isinstance(exc, cf.process.BrokenProcessPool):
                    if task is None or task.pool is self.pool:
                        self.pool = None
                    # One worker's death breaks the pool and fails every chunk in it, of any app.
                    # Not suspects, queued again as any hook job (in chunks, all workers): the jobs
                    # whose hooks had not started (no start line: the chunks waiting in the pool,
                    # the rest of each running chunk), and, in a pool broken by a hook timeout,
                    # those whose hooks it ended (the timed-out job is the one). Each went to the
                    # isolation worker, one at a time: one hung hook in 4 workers sent ~128 jobs
                    # there, for minutes with slow hooks.
                    started = _started_ids(results_file)
                    by_timeout = task is not None and id(task.pool) in timed_out_pools
                    innocent = [j for j in jobs if j["id"] not in self.alone and started is not None and (
                        by_timeout or (j["id"] not in started and j["id"] not in self.requeued))]
                    if innocent:
                        self.requeued.update(j["id"] for j in innocent)
                        self.backlog.extend(innocent)
                        self.logger.warning("hook worker died (%s): jobs %s, whose hooks had not started or were ended "
                                            "by a hook timeout's kill, are queued again", exc, [j["id"] for j in innocent])
                        jobs = [j for j in jobs if j not in innocent]
                    # The hooks that were running at the death (one killed the worker): each job
                    # not yet run alone is run again alone, so only the job whose hook kills its
                    # worker fails (with the reason), not its neighbours.
                    again = [j for j in jobs if j["id"] not in self.alone]
                    if again:
                        self.alone.update(j["id"] for j in again)
                        self.backlog.extend(again)
                        self.logger.warning("hook worker died (%s): jobs %s are run again, each alone",
                                            exc, [j["id"] for j in again])
                    jobs = [j for j in jobs if j not in again]
                if jobs:
                    self.logger.error("hook worker failed for jobs %s: %s", [j["id"] for j in jobs], exc)
                ended.extend(_failed(j, f"the hook worker process died: {exc}") for j in jobs)
            finally:
                if results_file is not None:
                    self._spent_files.append(results_file)  # deleted once its results are sent (_retire)
                for job_id in chunk_ids:
                    self.timed_out.pop(job_id, None)
            self.alone.difference_update(j["id"] for j in jobs)  # settled: they have their update
            if future is self.isolated:
                self.isolated = None
        if self.timeout_pools:  # forgotten with their last task
            live = {id(t.pool) for t in self.tasks.values()}
            self.timeout_pools = {key: pool for key, pool in self.timeout_pools.items() if key in live}
        self._watch_hooks()
        # Here, for every caller (the cycle, the feeding between cycles, the stop): the feeding sent
        # the results it harvested as they were, and a no-room result FAILED its job. The workers'
        # results only: the FAILEDs made here (a hook timed out, its worker died) say nothing of the
        # room (an unmarked result says its workdir was made: _room_again).
        return self._take_no_room(updates) + ended

    def _read_progress(self) -> list[dict]:
        """The results of the hooks completed since the last read, from the results files of the
        tasks still in the workers; also which hook each task runs now. A hung hook held the
        results of its whole chunk (``WORKER_CHUNK`` jobs) until it returned."""
        updates: list[dict] = []
        now = self.clock()
        for future, jobs in self.pending.items():
            task, path = self.tasks.get(future), self.results_files.get(future)
            if task is None or path is None:
                continue
            records = _new_lines(path, task)
            if not records:
                continue
            remaining = {j["id"] for j in jobs}
            for record in records:
                if "id" not in record and "start" in record:  # the next hook starts: the previous one is over
                    task.running, task.pid, task.since, task.warned = record["start"], record.get("pid"), now, False
                elif record.get("id") in remaining:
                    remaining.discard(record["id"])
                    updates.append(record)
                    self.alone.discard(record["id"])  # settled
                    self.timed_out.pop(record["id"], None)  # it completed as its worker was killed: kept
                    if task.running == record["id"]:
                        task.running = None
            if len(remaining) < len(jobs):
                self.pending[future] = [j for j in jobs if j["id"] in remaining]
        return updates

    def _watch_hooks(self) -> None:
        """A hook past half ``hook_timeout_sec``: a WARNING naming its job, once. Past it: its
        worker is killed; the task's future then breaks, and the job fails in :meth:`_harvest`."""
        timeout = self.hook_timeout_sec
        now = self.clock()
        for future, task in self.tasks.items():
            job_id = task.running
            if job_id is None or future.done() or job_id in self.timed_out:
                continue
            ran = now - task.since
            hook = self._hook_of(future, job_id)
            if ran >= timeout:
                reason = f"{hook} hook timed out after {timeout:g} s"
                self.timed_out[job_id] = reason
                self.logger.error("job %s: %s (processing.hook_timeout_sec): its worker (pid %s) is killed, the job "
                                  "FAILED; the hooks not yet completed in that pool run again",
                                  job_id, reason, task.pid)
                if task.pool is not None:
                    self.timeout_pools[id(task.pool)] = task.pool
                _kill_worker(task.pool, task.pid)
            elif ran >= timeout / 2 and not task.warned:
                task.warned = True
                self.logger.warning("job %s: its %s hook has run for %.0f s; it is ended at %g s "
                                    "(processing.hook_timeout_sec)", job_id, hook, ran, timeout)

    def _hook_of(self, future: cf.Future, job_id: int) -> str:
        for job in self.pending.get(future, []):
            if job["id"] == job_id:
                return HOOK_FOR_STATE.get(JobState(job["state"]), "hook")
        return "hook"

    def hooks_running(self) -> dict[int, float]:
        """Job id -> seconds its hook has run (by ``clock``), for the hooks the workers run now."""
        now = self.clock()
        return {t.running: now - t.since for f, t in self.tasks.items() if t.running is not None and not f.done()}

    def _submit(self, info: Any, jobs: list[dict], *, alone: bool = False) -> cf.Future:
        """Hand ``jobs`` (of one app) to a hook worker (``alone``: the isolation pool's), with a
        results file of their own."""
        if not self._results_dir_made:
            self._results_dir_made = True
            self._results_dir = self._make_results_dir()
        self._note_session()
        # The session that holds the jobs now, the one their results are sent under, also by the
        # next agent when this one dies before sending them (_recover_results).
        results_file = (None if self._results_dir is None
                        else self._results_dir / f"{next(self._results_count)}-s{self.session_id}.jsonl")
        args = (run_hooks, info.record, jobs, info.python_app, str(self.data_path), self.tail_num_lines,
                None if results_file is None else str(results_file))
        pool = self._isolation_pool if alone else self._pool
        try:
            future = pool().submit(*args)
        except RuntimeError:  # a broken pool (a worker died): start a fresh one
            if alone:
                self.isolation_pool = None
            else:
                self.pool = None
            future = pool().submit(*args)
        self._track(future, jobs, results_file, self.isolation_pool if alone else self.pool)
        return future

    def _track(self, future: cf.Future, jobs: list[dict], results_file: Optional[Path],
               pool: Optional[cf.ProcessPoolExecutor]) -> None:
        self.pending[future] = list(jobs)
        self.results_files[future] = results_file
        self.tasks[future] = _HookTask(pool)
        future.add_done_callback(lambda _future: self._task_done.set())

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every result handed to the status updater has been sent."""
        done = self.updater.flush(timeout) if self.updater is not None else True
        self._retire()
        return done

    # -- results files across agents ---------------------------------------------------------------
    @property
    def hook_results_path(self) -> Path:
        return self.spool_path / HOOK_RESULTS_DIR

    def _make_results_dir(self) -> Optional[Path]:
        """This agent's results folder (:meth:`_make_site_results_dir`). Where the site's cannot be
        made (a full disk or quota) or locked (``flock`` refused: Lustre ``noflock``, some FUSE or
        DVS mounts), one WARNING, and a folder in /tmp for the agent's life, as before results were
        kept in the site: the hooks are still timed and a worker's death keeps its completed
        hooks' results, but a killed agent's results are not sent by the next one. Where /tmp
        fails too: no results files (None). Never raises: hook jobs are processed regardless."""
        try:
            return self._make_site_results_dir()
        except OSError as exc:
            problem = exc
        try:
            fallback: Optional[Path] = Path(tempfile.mkdtemp(prefix="balsam-hook-results-"))
        except OSError as exc:
            fallback = None
            problem = OSError(f"{problem}; and in {tempfile.gettempdir()}: {exc}")
        self.logger.warning("cannot keep the hook results in %s (%s): they go to %s for this agent's life; the "
                            "results of hooks completed when it is killed are not sent by the next agent (those "
                            "hooks run again)", self.hook_results_path, problem, fallback or "no file")
        return fallback

    def _make_site_results_dir(self) -> Path:
        """This agent's results folder in the site, its lock taken first (so that no other agent
        takes the folder for a dead one's). In the site, not in /tmp: the next agent must find it
        (it may run on another login node), and a dead agent's folder no longer stays behind in
        /tmp. The lock file is made and locked under a name recovery does not look at, then
        renamed: ``<agent>.lock`` is locked from the moment it exists."""
        parent = self.hook_results_path
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        new = parent / f"{path.name}{_NEW_LOCK_SUFFIX}"
        lock = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            boot = boot_id()
            if boot != "-":  # unknown ("-"); see _died_here; best effort (a lock file without it: the old rule)
                try:
                    os.write(lock, f"{_BOOT_LINE} {boot}\n".encode())
                except OSError:
                    pass
            os.rename(new, _lock_of(path))
            path.mkdir()
        except OSError:
            for leftover in (new, _lock_of(path)):
                _remove(leftover)
            os.close(lock)
            raise
        self._results_lock = lock
        self._touched = time.monotonic()
        self._stop_touching.clear()
        self._toucher = threading.Thread(target=self._keep_touching, name="processing-lock-touch", daemon=True)
        self._toucher.start()
        return path

    def _keep_touching(self) -> None:
        """The toucher thread: :meth:`_touch_lock` every LOCK_TOUCH_SEC until close()."""
        while not self._stop_touching.wait(LOCK_TOUCH_SEC):
            self._touch_lock()

    def _touch_lock(self) -> None:
        """Every LOCK_TOUCH_SEC, this agent's lock file's mtime is set to now: it lives (for the
        agents of other hosts, see :meth:`_owner_gone`)."""
        lock = self._results_lock
        if lock is None or time.monotonic() - self._touched < LOCK_TOUCH_SEC:
            return
        self._touched = time.monotonic()
        try:
            os.utime(lock)
        except OSError:  # a touch missed: tried again LOCK_TOUCH_SEC later
            pass

    def _stop_toucher(self) -> None:
        """Stopped before the lock's fd is closed (a touch of a reused fd number would be another file's)."""
        self._stop_touching.set()
        if self._toucher is not None:
            self._toucher.join(5.0)
            self._toucher = None

    def _fs_now(self) -> float:
        """Now, by the clock of the site's file system (which sets the mtimes _owner_gone compares
        with): this agent's own lock file, touched now. The local clock where there is none."""
        if self._results_lock is not None:
            try:
                os.utime(self._results_lock)
                return os.fstat(self._results_lock).st_mtime
            except OSError:
                pass
        return time.time()

    def _retire(self) -> None:
        """Delete the results files whose results the status updater has sent (or dropped)."""
        if self.updater is None:
            return
        self._end_dead_sessions()
        for path in self._spent_files:
            self._retiring.append((self._last_sequence, path))
        self._spent_files = []
        while self._retiring and self.updater.done_through(self._retiring[0][0]):
            _remove(self._retiring.popleft()[1])
        replay = self.replay_updater
        if replay is None or replay.gave_up:  # not sent (a revoked credential): kept for the next agent
            return
        for entry in [e for e in self._recovering if replay.done_through(e[0])]:
            self._recovering.remove(entry)
            self._to_end.append((entry[1].name, entry[4]))
            _drop_results_dir(*entry[1:4])
        self._end_dead_sessions()
        if not self._recovering and not self._skipped and replay.pending == 0:
            # Nothing left to recover: its thread goes (a later re-check makes a new one if needed).
            replay.close()
            self.replay_updater = None

    def _recheck_skipped(self) -> None:
        """Every LOCK_TOUCH_SEC, the folders skipped because their agent may live are looked at
        again (an open, an flock and an fstat each): replayed once their agent is gone."""
        if self._skipped and time.monotonic() - self._rechecked >= LOCK_TOUCH_SEC:
            self._rechecked = time.monotonic()
            self._recover_results(only=list(self._skipped))

    def _recover_results(self, only: Optional[list[Path]] = None) -> None:
        """Send the hook results that dead agents of this site recorded and did not send (their
        results folders whose lock nobody holds), before this module acquires any job.

        Each result goes under the session its file names, the dead agent's session that held the
        job when its hook ran (the server takes it only from the job's holder). Why this is never
        applied twice, nor over another session's work: the server checks ``jobs.session_id`` under
        the job's row lock, in the same transaction that applies the update; a session's expiry
        (which clears the holder of all its jobs), an acquire, a user's move (which ends the lease)
        and any applied state change all change that column under the same lock; and session ids
        are never reused (server/tables.py).
        - The dead session still holds the job: nobody else moved it since (a move by anyone else
          would have cleared the holder), so it is still in the state its hook ran for, and the
          result is applied, once: its state change clears the holder, so any second copy (the
          same folder sent again after this agent too dies before deleting it, the updater's
          spool of it) is refused (409) and dropped.
        - The dead session expired first (the next agent started late): the job was released and
          maybe acquired by another session, ours included (this runs before our first acquire,
          but the updater sends asynchronously): the holder is not the dead session, so the result
          is refused and dropped, and the job's hook runs again under whoever holds it. That is the
          at-least-once case, with the hook that was running at the death; nothing is applied on a
          job another session holds.
        A folder is deleted once the updater is through its results (:meth:`_retire`), keeping its
        lock meanwhile: if this agent dies first, the next one sends them again (refused if applied).
        One bulk PATCH per batch, as for every result; they go through an updater of their own,
        which drops them rather than send them without their session (:class:`_ReplayUpdater`).
        An unlocked folder is taken for a dead agent's only if :meth:`_owner_gone` agrees; one it
        does not is looked at again later (``only``: those lock files, see :meth:`_recheck_skipped`).
        A ``.lock.new`` left by an agent that died between its creation and its rename (no folder
        yet) is deleted once its agent is gone too."""
        parent = self.hook_results_path
        try:
            if only is None:
                locks = sorted(parent.glob(f"*{_LOCK_SUFFIX}")) + sorted(parent.glob(f"*{_NEW_LOCK_SUFFIX}"))
            else:
                locks = sorted(only)
        except OSError:
            return
        updater: Optional[BulkStatusUpdater] = None
        silence_limit: Optional[float] = None
        now: Optional[float] = None
        for lock_path in locks:
            self._skipped.discard(lock_path)
            new = lock_path.name.endswith(_NEW_LOCK_SUFFIX)
            folder = lock_path.parent / lock_path.name[: -len(_NEW_LOCK_SUFFIX if new else _LOCK_SUFFIX)]
            if folder == self._results_dir:
                continue
            try:
                lock = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:  # deleted meanwhile
                continue
            if not _is_local_owner(folder.name) and silence_limit is None:
                silence_limit = agent_silence_limit(Path(getattr(self.site_config, "site_path", parent)))
            now = now or self._fs_now()
            # Asked before the flock, for a .lock.new: a starting agent's flock of it must not fail on ours.
            if new and not _owner_gone(folder.name, lock, silence_limit, now):
                os.close(lock)
                self._skipped.add(lock_path)
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its agent lives (another agent of the site): its results are its own
                os.close(lock)
                continue
            if new:  # its agent died before renaming it, so before making its folder: nothing to send
                _remove(lock_path)  # unlinked while held: see _drop_results_dir
                os.close(lock)
                continue
            if not _owner_gone(folder.name, lock, silence_limit, now):
                os.close(lock)  # the lock was seen free on this node only: its agent may live
                self._skipped.add(lock_path)
                continue
            sequence, sessions = 0, set()
            # Its sessions are ended (releasing their jobs now) only where its death is certain: on
            # this host and kernel, its pid gone or reused (_owner_gone, _died_here). Another host's
            # agent is taken for dead from a silent lock file: it may live, cut off, and still hold its
            # jobs; its sessions expire.
            boot, noted = _lock_record(lock)
            certain = _is_local_owner(folder.name) and _died_here(lock, boot, now)
            dead_sessions = noted if certain else []
            try:
                paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
            except OSError as exc:  # left for the next agent; never a reason to hold this one's cycles
                self.logger.warning("cannot read the hook results of a stopped agent in %s: %s", folder, exc)
                os.close(lock)
                continue
            for path in paths:
                match = _RESULTS_NAME.match(path.name)
                if match is None:  # not a results file of a session: nothing to send it under
                    self.logger.warning("%s: not a hook results file; ignored", path)
                    continue
                session_id = int(match.group(1))
                # The completed hooks' updates (a start line has no "id"; a torn last line is skipped).
                for record in _new_lines(path, _HookTask(None)):
                    mark = record.pop(WORKDIR_KEY, None)
                    if mark == WORKDIR_NO_ROOM:
                        continue  # given back, not FAILED (_take_no_room): released with the dead session
                    if record.pop(SAVED_KEY, None):
                        continue  # the hook saved its job's state itself: the server has it
                    if type(record.get("id")) is int:
                        update = api_json({**record, SESSION_KEY: session_id})
                        updater = updater or self._replay_updater()
                        sequence = updater.put_update(update, stamp_session=False)
                        sessions.add(session_id)
                if certain and session_id not in dead_sessions:
                    dead_sessions.append(session_id)
            if sequence and updater is not None:
                self.logger.info("sending the results of hooks that completed under a stopped agent (%s, session %s)",
                                 folder.name, ", ".join(map(str, sorted(sessions))))
                updater.send_soon()
                # Its sessions ended only once these are sent (_retire): ended first, the server
                # would refuse them (the session no longer holds their jobs) and their hooks run again.
                self._recovering.append((sequence, folder, lock_path, lock, dead_sessions))
            else:
                self._to_end.append((folder.name, dead_sessions))
                _drop_results_dir(folder, lock_path, lock)

    def _end_dead_sessions(self) -> None:
        """End the sessions of dead agents of this host (``DELETE /sessions/{id}``, one request per
        session; ``_to_end``), their recorded results sent: the server releases their jobs at once,
        as the sessions' expiry would have later (the same release: ``release_session_jobs``). Not
        before the site's spool is empty: a dead agent's updater may have spooled results under its
        session (an outage it gave up on), which the spool replay sends and the server would refuse
        once the session is gone (their hooks would run again). Empty means: no spool file, claimed
        ones included (``*.jsonl.claimed-...``: the spool replay of this very cycle renames the
        files it queues, and a dead agent's stale claim waits to be taken back), and nothing pending
        in the updater (the replayed updates are sent by its thread, after this call returns); a
        replayed file is deleted only once the updater has sent it, so the two together leave no gap.
        (No public "busy" of the SpoolReplayer is needed: its queued files are those claims.) Not
        found: expired already. Any other failure leaves the session to its expiry (the fallback),
        nothing lost."""
        if not self._to_end:
            return
        if self.updater is not None and self.updater.pending:
            return
        try:
            if any(self.spool_path.glob("*.jsonl*")):
                return
        except OSError:
            return
        ending, self._to_end = self._to_end, []
        for folder, session_ids in ending:
            self._end_sessions_of(folder, session_ids)

    def _end_sessions_of(self, folder: str, session_ids: list[int]) -> None:
        for session_id in session_ids:
            try:
                self.client.delete(f"/sessions/{session_id}", retry_count=END_DEAD_SESSION_RETRY_COUNT)
            except Exception as exc:
                if http_status(exc) != 404:
                    self.logger.warning("could not end session %s of the stopped agent %s (%s): its jobs are "
                                        "released when it expires", session_id, folder, excerpt(str(exc), 200))
                continue
            self.logger.info("ended session %s of the stopped agent %s (its process is gone): its jobs are released "
                             "now, not at the session's expiry", session_id, folder)

    def _replay_updater(self) -> BulkStatusUpdater:
        """The updater of a dead agent's results (:meth:`_recover_results`): each goes under the
        session its file names, never this module's. No spool, and a short give-up at stop: what
        it could not send stays in the dead agent's folder, which the next agent sends."""
        if self.replay_updater is None:
            self.replay_updater = _ReplayUpdater(
                self.client, max_wait_sec=0.05, close_timeout=5.0, name="processing-replay",
                on_refused=self._fail_refused_result,
            )
        return self.replay_updater

    def in_flight(self) -> int:
        """Jobs handed to the hook workers (in both pools), still without a result."""
        return sum(len(jobs) for jobs in self.pending.values())

    def waiting(self) -> int:
        """Hook jobs queued for a worker (not yet handed to a pool)."""
        return sum(len(jobs) for jobs in self.queued.values()) + len(self.alone_queue)

    def _feed(self) -> None:
        """Hand queued hook jobs to the workers: the next job to be run alone when none runs, and
        chunks (``WORKER_CHUNK`` jobs of one app) to the shared pool while it has fewer than
        ``max_tasks``, the apps taking turns, a chunk each. A job leaves its queue once its task is
        submitted: a submit that raises (an app record that cannot be fetched) leaves it there."""
        if self.alone_queue and self.isolated is None:
            job = self.alone_queue[0]
            self.isolated = self._submit(self.apps.info(job["app_id"]), [job], alone=True)
            self.alone_queue.popleft()
        while self.queued and sum(1 for f in self.pending if f is not self.isolated) < self.max_tasks:
            app_id = next(iter(self.queued))
            queue = self.queued[app_id]
            chunk = [queue[i] for i in range(min(WORKER_CHUNK, len(queue)))]
            self._submit(self.apps.info(app_id), chunk)
            for _ in chunk:
                queue.popleft()
            del self.queued[app_id]
            if queue:
                self.queued[app_id] = queue  # its next chunk after the other apps' next ones

    def _feed_safely(self) -> Optional[Exception]:
        try:
            self._feed()
        except Exception as exc:
            return exc
        return None

    def _feed_while_waiting(self, seconds: float) -> float:
        """With hook jobs queued, the cycle's sleep is spent feeding them to the workers as tasks
        end (results sent as they come): a chunk of fast hooks takes milliseconds, and waiting for
        the next cycle left the workers idle. Returns the seconds left to sleep."""
        deadline = time.monotonic() + seconds
        while (self.queued or self.alone_queue) and self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._task_done.wait(left):
                break
            self._task_done.clear()  # before the harvest: a task ending after it sets it again
            harvested = self._harvest()
            if harvested:
                self._send(harvested)
            self._retire()
            self._feed()
        return max(0.0, deadline - time.monotonic())

    # -- cycle -------------------------------------------------------------------------------------
    def run_cycle(self) -> Optional[float]:
        self._updater()
        self._touch_lock()  # also the toucher thread's job; here too in case that thread died
        assert self.spool is not None
        if self.spool.poll():
            self.logger.info("sending job updates that launchers spooled in %s", self.spool_path)
        if not self._recovered:
            # Before the first acquire: see _recover_results for why the order matters little.
            self._recover_results()
            self._recovered = True
        self._recheck_skipped()
        harvested = self._harvest()
        if harvested:
            self._send(harvested)
        self._retry_no_room()
        self._retire()
        # Workers freed since the last cycle. A feed that fails (an app record that cannot be
        # fetched, a pool that cannot start) holds back no other job: raised once the cycle is done.
        feed_error = self._feed_safely()
        hook_jobs = self.in_flight() + self.waiting()
        held = hook_jobs + len(self.backlog) + len(self.no_room)
        room = self.prefetch_depth - held
        if room <= 0 and (hook_jobs or self.no_room):
            # Hook jobs waiting for the workers (slow hooks, hung ones) take all of prefetch_depth:
            # the jobs behind them (in the server's order) whose app keeps the default hook need no
            # worker, and are not held back by them; a bounded number a cycle, up to max_held. So
            # with jobs held for want of room: the RUN_DONEs behind them (their JOB_FINISHED, the
            # file cleaner that frees room) would wait for the disk they may free.
            # The jobs held for want of room are left out of that bound: they would fill it (each
            # overflow acquire leased more jobs to prepare) and stop the RUN_DONEs behind them again.
            room = min(HOOK_OVERFLOW_ACQUIRE, self.max_held - (held - len(self.no_room)))
        room = min(room, MAX_JOBS_PER_SESSION_ACQUIRE)
        acquired: list[dict] = []
        waited = 0.0
        if room > 0:
            # With nothing to lease, the server holds the answer until jobs reach our states (a
            # launcher's RUN_DONE, a new job) or this long: the wait replaces this cycle's sleep.
            # Only as long as the results of running hooks can wait, and no longer than a cycle;
            # not at all while hook jobs wait for a worker: the cycle's sleep feeds them (_feed_while_waiting).
            queued = self.queued or self.alone_queue
            wait = None if self.backlog or queued else min(self.period, HOOKS_POLL_SEC) if self.pending else self.period
            if self.no_room and wait is not None:  # not past the retry of the jobs given back for want of room
                wait = min(wait, max(0.0, self._no_room_retry_at - time.monotonic()))
            began = time.monotonic()
            # While jobs wait for room, no more jobs to prepare (STAGED_IN: each needs a workdir on
            # the full disk) are leased: the RUN_DONE, RUN_ERROR, RUN_TIMEOUT ones need none.
            acquired = self._acquire(room, wait, states=NO_WORKDIR_STATES if self.no_room else None)
            waited = time.monotonic() - began
            self.backlog.extend(acquired)
        if self.backlog:
            jobs, self.backlog = self.backlog, []
            try:
                self.apps.prefetch(job["app_id"] for job in jobs)
            except Exception:
                self.backlog = jobs
                raise
            handed: set[int] = set()
            try:
                updates = self._dispatch(jobs, handed)
            except Exception:
                # Our session holds these jobs: one dropped here would wait for the agent's restart
                # (an API outage while an app loads). The ones not queued for a hook worker go back
                # and are dispatched again (default hooks can run twice).
                self.backlog = [job for job in jobs if job["id"] not in handed] + self.backlog
                raise
            if updates:
                self._send(updates)
            feed_error = self._feed_safely() or feed_error
        self._tick()
        self.logger.debug("cycle: harvested %d results, room for %d, acquired %d %s, %d jobs in hook workers, "
                          "%d queued for them", len(harvested), max(room, 0), len(acquired),
                          _count_states(acquired) if acquired else "", self.in_flight(), self.waiting())
        now = time.monotonic()
        if acquired:
            self._last_arrival = now
        if feed_error is not None:
            raise feed_error  # the agent logs it (and backs off in an API outage); the jobs stay queued
        if room > 0 and len(acquired) >= room:
            return 0.0  # more work is likely waiting
        delay = self._delay(now)
        # The time the acquire waited counts as sleep (a server that does not wait answers at once,
        # and the module then sleeps as it always did).
        sleep = max(0.0, (self.period if delay is None else delay) - waited) if waited else delay
        if self.no_room:  # woken to try the jobs given back for want of room
            due = max(0.0, self._no_room_retry_at - time.monotonic())
            sleep = min(self.period if sleep is None else sleep, due)
        if self.queued or self.alone_queue:
            return self._feed_while_waiting(self.period if sleep is None else sleep)
        return sleep

    def _delay(self, now: float) -> Optional[float]:
        """How long to sleep after a cycle that did not fill its room (None: ``period``)."""
        if self._last_arrival is not None and now - self._last_arrival < FOLLOW_UP_WINDOW_SEC:
            # Jobs are arriving (a launcher is finishing them; a cycle between two of its batches
            # finds none): a job's JOB_FINISHED follows its RUN_DONE within ~FOLLOW_UP_SEC, where
            # one empty cycle used to put the module back on its period (1 s) until the next
            # RUN_DONE. What it costs: one acquire request per cycle while jobs flow.
            return min(self.period, FOLLOW_UP_SEC)
        if self.pending or self.queued or self.alone_queue:
            return min(self.period, HOOKS_POLL_SEC)  # hooks in flight: collect their results soon
        return None

    def _dispatch(self, jobs: list[dict], handed: set[int]) -> list[dict]:
        """Default hooks now (returned as updates), user hooks queued for the workers (their ids
        added to ``handed`` as they go; :meth:`_feed` hands them to a pool, and their results come
        through :meth:`_harvest`). Apps are prefetched. The RUN_TIMEOUT jobs that keep the default
        handle_timeout get their launcher's reason in the message (:meth:`_timeout_reasons`)."""
        updates: list[dict] = []
        custom: dict[int, list[dict]] = {}
        made: list[int] = []  # given back for want of room, their workdirs made now
        reasons = self._timeout_reasons(jobs)
        for job in jobs:
            state = JobState(job["state"])
            if state not in HOOK_FOR_STATE:
                self.logger.warning("job %s: acquired in state %s, which has no hook; left as it is", job["id"], state)
                continue
            problem = workdir_problem(job.get("workdir"))
            if problem is not None:  # the API refuses these; never run a hook outside data/ regardless
                updates.append(
                    {
                        "id": job["id"],
                        "state": JobState.failed.value,
                        "state_timestamp": now_iso(),
                        "state_data": {"message": f"workdir {problem}"},
                    }
                )
                continue
            info = self.apps.info(job["app_id"])
            if info.cls is None:
                updates.append(
                    {
                        "id": job["id"],
                        "state": JobState.failed.value,
                        "state_timestamp": now_iso(),
                        "state_data": {"message": "An exception occurred while loading the app", "error": info.error or ""},
                    }
                )
            elif HOOK_FOR_STATE[state] in info.hooks:
                custom.setdefault(job["app_id"], []).append(job)
            else:
                try:
                    updates.append(default_update(job, info.python_app, self.data_path, self.tail_num_lines,
                                                  timeout_reason=reasons.get(job["id"])))
                except Exception as exc:
                    if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:  # the disk's fault: given back
                        self._hold_no_room(job, f"cannot prepare workdir {job['workdir']!r}: {type(exc).__name__}: {exc}")
                        continue
                    self.logger.exception("job %s: default %s failed", job["id"], HOOK_FOR_STATE[state])
                    updates.append(
                        {
                            "id": job["id"],
                            "state": JobState.failed.value,
                            "state_timestamp": now_iso(),
                            "state_data": {"message": f"An exception occurred in {HOOK_FOR_STATE[state]}", "error": str(exc)},
                        }
                    )
                else:
                    if state == JobState.staged_in and job["id"] in self._no_room_ids:
                        made.append(job["id"])
        if made:
            self._room_again(made)
        for app_id, app_jobs in custom.items():
            for job in app_jobs:
                if job["id"] in self.alone:
                    self.alone_queue.append(job)  # one at a time, in the isolation pool
                else:
                    self.queued.setdefault(app_id, deque()).append(job)
                handed.add(job["id"])
                self._hook_jobs[job["id"]] = job
        return updates

    def _timeout_reasons(self, jobs: list[dict]) -> dict[int, str]:
        """The launcher's reason (``reason``, or the server's ``message`` for an expired session) of
        the newest RUN_TIMEOUT event of each job of ``jobs`` in RUN_TIMEOUT whose app keeps the
        default handle_timeout, for its RESTART_READY message. A few GETs per batch, never one per
        job. Any failure: one warning and no reasons (the message has its default); the jobs are
        never held for it."""
        ids: list[int] = []
        for job in jobs:
            if job["state"] != JobState.run_timeout.value or workdir_problem(job.get("workdir")) is not None:
                continue
            info = self.apps.info(job["app_id"])  # prefetched: no request
            if info.cls is not None and HOOK_FOR_STATE[JobState.run_timeout] not in info.hooks:
                ids.append(job["id"])
        reasons: dict[int, str] = {}
        try:
            for start in range(0, len(ids), TIMEOUT_REASON_IDS_PER_GET):
                chunk = ids[start:start + TIMEOUT_REASON_IDS_PER_GET]
                missing = set(chunk)
                limit = 2 * len(chunk)
                for page in range(TIMEOUT_REASON_PAGES):
                    answer = self.client.get(
                        "/events/",
                        params={"job_id": ",".join(map(str, chunk)), "to_state": JobState.run_timeout.value,
                                "ordering": "-timestamp", "limit": limit, "offset": page * limit},
                        retry_count=TIMEOUT_REASON_RETRY_COUNT,
                    )
                    results = answer["results"]
                    for event in results:
                        if event["job_id"] in missing:
                            missing.discard(event["job_id"])
                            data = event.get("data")
                            reason = (data.get("reason") or data.get("message")) if isinstance(data, dict) else None
                            if reason:
                                reasons[event["job_id"]] = str(reason)
                    if not missing or len(results) < limit:
                        break
        except Exception as exc:
            self.logger.warning("the launcher's reasons of %d RUN_TIMEOUT jobs could not be read (%s); their "
                                "RESTART_READY message goes without them", len(ids), exc)
            return {}
        return reasons

    def close(self) -> None:
        began = time.monotonic()
        self._stopping = True  # the jobs given back from here on are released, not tried again
        pools = [pool for pool in (self.pool, self.isolation_pool) if pool is not None]
        # Taken now: shutdown(wait=False) forgets a pool's processes (Python 3.11 sets ``_processes``
        # to None), and the hung hooks' workers, never ended, ran on beside the next agent's run of
        # the same hooks, and held the interpreter's exit (its concurrent.futures exit hook joins them).
        workers = [process for pool in pools for process in _processes(pool)]
        if self.pending:
            cf.wait(list(self.pending), timeout=HOOKS_STOP_WAIT_SEC)
        # Chunks not started yet never start: their jobs are released with the session (their hooks
        # have not run, so the next agent runs them once).
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        running = [f for f in self.pending if not f.done()]
        if running:
            cf.wait(running, timeout=max(0.0, began + HOOKS_STOP_LIMIT_SEC - time.monotonic()))
        unfinished = [f for f in self.pending if not f.done()]
        if unfinished:
            self.logger.warning("stopping: hooks of jobs %s still run after %.0f s; ended (they run again "
                                "under the next agent)", [j["id"] for f in unfinished for j in self.pending[f]],
                                time.monotonic() - began)
            survivors = _end_processes(workers)
            if survivors:
                self.logger.error("stopping: hook workers %s could not be ended", [p.pid for p in survivors])
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)  # prompt now: no hook runs any more
        self.pool = self.isolation_pool = None
        # The results of the hooks that finished, even those that finished during the shutdown (they
        # used to be thrown away, and the hook ran again under the next agent), also those of an
        # ended chunk whose hooks completed before the one that hung. The other jobs of the
        # cancelled and ended chunks get nothing: they are released below.
        updates: list[dict] = []
        for future in list(self.pending):
            if future.cancelled() or (future in unfinished and (not future.done() or future.exception() is not None)):
                jobs = self.pending.pop(future)
                results_file = self.results_files.pop(future, None)
                self.tasks.pop(future, None)
                updates.extend(self._take_no_room(list(read_results(results_file, jobs).values())))
        updates += self._harvest()
        # Jobs of a dead worker to be run again alone, and the hook jobs still queued for a worker
        # (their hooks never started): released with the session below, run by the next agent.
        waiting = self.waiting() + len(self.backlog)
        if waiting:
            self.logger.info("stopping: %d jobs whose hooks had not started are released", waiting)
        if self.no_room:
            # Held for want of room: released with the session too, tried by the next agent.
            self.logger.info("stopping: %d jobs held for want of room in %s are released", len(self.no_room), self.data_path)
        self.backlog = []
        self.no_room = []
        self.queued = {}
        self.alone_queue = deque()
        if updates:
            self._send(updates)
        # The results are sent before the session is released: a job released first could be taken
        # by another processing session and its hook run again.
        if self.updater is not None:
            self.updater.close()  # sends what is queued (retrying for up to 30 s); spools the rest
            if self.spool is not None:
                self.spool.release()  # the replayed files: deleted, or given back to the next agent
            if self.updater.dropped_count:
                # Mostly refusals, each logged when it came: a job a user moved while its hook ran
                # (no longer held by our session), or a value the server does not take. ``dropped``
                # keeps only the most recent ones (MAX_DROPPED_KEPT): ``dropped_count`` counts them all.
                self.logger.warning("%d job updates were not applied (refused by the server, or never sent); the "
                                    "most recent: %s", self.updater.dropped_count, self.updater.dropped[-3:])
            self.updater = None
        # Every result read from the results files is sent now, or in the site's spool (which the
        # next agent sends): the files can go. (The results of a hook still running when its worker
        # was ended are not in them: its job is released below and its hook runs again.)
        self._stop_toucher()
        if self._results_dir is not None:
            lock_path = _lock_of(self._results_dir) if self._results_lock is not None else None
            _drop_results_dir(self._results_dir, lock_path, self._results_lock)
        self._results_dir = self._results_lock = None
        self._results_dir_made = False
        self._noted_sessions = set()
        self._spent_files, self._retiring = [], deque()
        kept = False
        if self.replay_updater is not None:
            self.replay_updater.close()
            kept = self.replay_updater.gave_up
            self.replay_updater = None
        for _, folder, lock_path, lock, dead_sessions in self._recovering:
            if kept:  # not all sent (the API is gone): the next agent sends them
                os.close(lock)
            else:
                self._to_end.append((folder.name, dead_sessions))
                _drop_results_dir(folder, lock_path, lock)
        self._end_dead_sessions()  # else left to expire
        self._to_end = []
        if kept and self._recovering:
            self.logger.warning("stopping: the results of a stopped agent in %s could not all be sent; the next "
                                "agent sends them", ", ".join(str(entry[1]) for entry in self._recovering))
        self._recovering = []
        self._skipped = set()
        if self.lease is not None:
            self.lease.close()
            self.lease = None


def _refusal_reason(error: BaseException) -> str:
    """The server's validation errors as ``field: message; ...`` (``detail`` is a list of
    ``{"loc": ["body", <item>, field...], "msg": ...}``), else the error's text."""
    detail = getattr(error, "detail", None)
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        parts = []
        for entry in detail:
            loc = [str(part) for part in entry.get("loc", []) if part != "body" and not isinstance(part, int)]
            parts.append(f"{'.'.join(loc) or 'update'}: {entry.get('msg', '')}")
        return "; ".join(parts)
    return str(detail or error)


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:  # never written (no hook ran), or already gone
            pass


def _lock_of(results_dir: Path) -> Path:
    """The lock file of an agent's results folder (beside it: a host name may hold dots)."""
    return results_dir.parent / f"{results_dir.name}{_LOCK_SUFFIX}"


class _UncheckedReplay(Exception):
    """A dead agent's results that would go without their session (see ``_ReplayUpdater``): a
    refusal (409) of them all, as the server refuses a result of a job no longer held."""

    status_code = 409

    def __init__(self, ids: list[Any]) -> None:
        super().__init__("a stopped agent's hook result is not sent: the server is older than job leases and "
                         "would apply it without checking that the job is still held for it (its hook runs again)")
        self.refused_ids = ids


class _ReplayUpdater(BulkStatusUpdater):
    """The updater of a dead agent's results (see ``ProcessingModule._recover_results``): they are
    applied only under their session's check. Once the server turns out older than leases (the
    updater then sends without ``session_id``), they are refused here: applied unchecked, a result
    could overwrite the next run of its job. Dropped (one ERROR line per batch): their hooks run
    again. The rest is the updater's own PATCH (its Idempotency-Key, one try per call at stop)."""

    def _patch(self, chunk: list[dict[str, Any]], key: Optional[str] = None) -> None:
        if not self.sends_session or any(SESSION_KEY not in update for update in chunk):
            raise _UncheckedReplay([update.get("id") for update in chunk])
        super()._patch(chunk, key)

    def _log_refused(self, refused: Any, total: int) -> None:
        """Results the server refused because the dead session no longer holds their jobs (409) or
        the jobs are gone (404) are expected, one INFO line for them: a dead agent's folder holds
        the results it had sent already from the chunks still running at its death (a file is
        deleted once its whole chunk is sent), and they are refused, as designed. Logged as an
        ERROR ("server refused updates: 36 of the 39"), a kill -9 and a prompt restart read as a
        failure though every result was applied once. Only a refusal whose reason says so is
        expected (:func:`_moved_on`): another 409 (a move the server does not allow) or a 404 that
        names no job (a proxy's) keeps its ERROR; both lines give the server's reasons."""
        moved_on, other = [], []
        for item in refused:
            (moved_on if _moved_on(item[0], item[1]) else other).append(item)
        if moved_on:
            ids = [u.get("id") for u, _ in moved_on]
            shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            reasons = list(dict.fromkeys(excerpt(str(error), _REASON_CHARS) for _, error in moved_on))
            text = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else "")
            _logger.info("%s: %d of the %d results of a stopped agent not applied: their jobs are no longer held by its "
                         "session or are gone (results it had sent already; or the session expired first, and those "
                         "hooks run again) (jobs %s): %s", self.name, len(moved_on), total, shown, text)
        super()._log_refused(other, total)


#: The most characters of each reason the replay's INFO line gives (as the ERROR line's).
_REASON_CHARS = 500
#: The server's words for a result refused because its session no longer holds the job
#: (``jobs_logic.update_jobs``: "job 5 is no longer held by session 9 (now: ...)"), for a job that
#: no longer exists ("Job not found: 5, 6"), and for the other refusals of one job
#: ("job 5: RUN_DONE -> PREPROCESSED is not allowed").
_NOT_HELD = re.compile(r"\bjob (\d+) is no longer held by session\b")
_JOB_NAMED = re.compile(r"\bjob (\d+)\b")
_JOBS_NOT_FOUND = re.compile(r"\bJob not found: ([\d, ]+)")


def _moved_on(update: dict, error: BaseException) -> bool:
    """Whether the server refused ``update`` because its job is no longer held by the update's
    session (409) or no longer exists (404), as its reason says. A 409 naming the job with another
    reason, or a 404 that names no job (a reverse proxy's "no route"), is not. A refusal of many
    jobs names the first few: a job it does not name counts as moved on when every job it names
    was (the refused ids it lists beside, ``refused_ids``, name them all)."""
    if isinstance(error, _UncheckedReplay):
        return False
    job_id, status, text = update.get("id"), http_status(error), str(error)
    if status == 409:
        held = {int(i) for i in _NOT_HELD.findall(text)}
        named = {int(i) for i in _JOB_NAMED.findall(text)}
        if job_id in named:
            return job_id in held and not re.search(rf"\bjob {job_id}:", text)
        refused_ids = getattr(error, "refused_ids", None)
        return bool(held) and named == held and (refused_ids is None or job_id in refused_ids)
    if status == 404:
        missing = _JOBS_NOT_FOUND.search(text)
        if missing is None:
            return False
        refused_ids = getattr(error, "refused_ids", None)
        if refused_ids:
            return job_id in refused_ids
        return str(job_id) in {part.strip() for part in missing.group(1).split(",")}
    return False


def _owner_of(name: str) -> tuple[Optional[str], Optional[int], float]:
    """(host, pid, creation time in seconds) from a results folder's name
    (``<host>-<pid>-<ns>``, the host may hold dashes); (None, None, 0.0) for another name."""
    host, _, rest = name.rpartition("-")
    host, _, pid = host.rpartition("-")
    if host and pid.isdecimal() and rest.isdecimal():
        return host, int(pid), int(rest) / 1e9
    return None, None, 0.0


def _is_local_owner(name: str) -> bool:
    return _owner_of(name)[0] == socket.gethostname()


def _lock_record(lock: int) -> tuple[Optional[str], list[int]]:
    """(the boot id, the processing session ids) a results folder's lock file names (``lock``: its
    fd; see ``ProcessingModule._note_session``). The whole file: a session is noted last, and the
    newest one holds the jobs. A torn last line (the agent died writing it) is skipped, and so is a
    line of another kind (see _SESSION_LINE)."""
    chunks = []
    try:
        offset = 0
        while True:
            chunk = os.pread(lock, 1 << 16, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError:
        return None, []
    boot: Optional[str] = None
    sessions: list[int] = []
    # Only whole lines: a torn "12" of "123" would name another agent's session.
    for line in b"".join(chunks).decode("ascii", "replace").split("\n")[:-1]:
        kind, _, value = line.partition(" ")
        if kind == _BOOT_LINE and value and boot is None:
            boot = value
        elif kind == _SESSION_LINE and value.isdecimal():
            sessions.append(int(value))
    return boot, list(dict.fromkeys(sessions))


def _died_here(lock: int, boot: Optional[str], now: Optional[float]) -> bool:
    """Whether the agent of a folder named for this host, whose pid is gone (_owner_gone), ran on
    this very kernel, so that its death is certain: another node may have the same host name (an
    unconfigured "localhost", containers given one name) where flock is seen on one node only, and
    the pid says nothing there. By the boot id its lock file names; a lock file of an older version
    names none: then its lock must have been silent (a live agent touches it every LOCK_TOUCH_SEC)
    for 3 x LOCK_TOUCH_SEC, by ``now`` (see _owner_gone)."""
    if boot is not None:
        return boot == boot_id()
    try:
        touched = os.fstat(lock).st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - touched > 3 * LOCK_TOUCH_SEC


def _owner_gone(name: str, lock: int, silence_limit: Optional[float], now: Optional[float] = None) -> bool:
    """Whether the agent of the results folder ``name``, whose lock ``lock`` (an fd) this agent
    could take, is dead. The lock alone is not enough where it is seen on its node only (Lustre
    ``localflock``, NFS ``local_lock=flock``, a file system that ignores ``flock``): a live agent
    would have its folder replayed and deleted under it (its workers then record nothing). So
    also: on this host, its pid no longer runs, or runs a process started after the folder was
    made (the pid reused); on another host (whose processes cannot be seen from here), its lock
    file has not been touched (every LOCK_TOUCH_SEC while it lives) for ``silence_limit`` seconds,
    the limit after which ``balsam site start`` takes such an agent for dead. ``now``: by the file
    system's clock (the mtime of a lock file this agent just touched), not this host's, which may
    be skewed; the local clock where None."""
    host, pid, made = _owner_of(name)
    if host == socket.gethostname() and pid is not None:
        started = process_start_time(pid, running=True)
        return started is None or started > made + START_TIME_TOLERANCE_SEC
    try:
        touched = os.fstat(lock).st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - touched > (silence_limit or 0.0)



def _drop_results_dir(folder: Path, lock_path: Optional[Path], lock: Optional[int]) -> None:
    """Delete a results folder, then its lock file, then let go of the lock: unlinked while still
    held, no other agent can open it and take the lock of a folder that is gone. No lock file: a
    folder in /tmp (see ``_make_results_dir``)."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        if lock_path is not None:
            lock_path.unlink(missing_ok=True)
    except OSError:
        pass
    if lock is not None:
        try:
            os.close(lock)
        except OSError:
            pass


def _kill_workers(pool: cf.ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """SIGKILL a broken pool's worker processes and wait for them (they cannot finish a hook after)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        try:
            process.kill()
        except Exception:  # already gone
            pass
    for process in processes:
        try:
            process.join(timeout)
        except Exception:
            pass


def _processes(pool: Optional[cf.ProcessPoolExecutor]) -> list[Any]:
    """A pool's worker processes (none once the pool has been shut down)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _end_processes(processes: list[Any], grace: float = WORKER_END_GRACE_SEC) -> list[Any]:
    """SIGTERM the worker ``processes`` (the hooks they run), SIGKILL those still there after
    ``grace`` seconds (a hook may ignore SIGTERM), and wait up to ``grace`` again for them to be
    gone; returns those still alive then."""
    for process in processes:
        try:
            process.terminate()
        except Exception:  # already gone
            pass
    for stage in ("kill", None):
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        alive = [process for process in processes if _is_alive(process)]
        if not alive or stage is None:
            return alive
        for process in alive:
            try:
                process.kill()
            except Exception:
                pass
    return []


def _is_alive(process: Any) -> bool:
    try:
        return bool(process.is_alive())
    except Exception:  # closed, or not our child any more
        return False


def _kill_worker(pool: Optional[cf.ProcessPoolExecutor], pid: Optional[int]) -> None:
    """SIGKILL the worker ``pid`` of ``pool`` (a hook that timed out): only a pid that is one of the
    pool's processes, never another process that reused it. The pool then breaks (as for any
    worker death) and ends its other workers."""
    for process in _processes(pool):
        if process.pid == pid:
            try:
                process.kill()
            except Exception:  # already gone: the pool breaks all the same
                pass


def _new_lines(path: Path, task: _HookTask) -> list[dict]:
    """The records appended to a task's results file since ``task.offset``: whole lines only. The
    worker may be appending a line as this reads (its one ``write`` can be seen in part): a line
    without its newline yet is left for the next read."""
    try:
        with open(path, "rb") as f:
            f.seek(task.offset)
            data = f.read()
    except OSError:  # not written yet (no hook has started)
        return []
    whole = data.rfind(b"\n") + 1
    task.offset += whole
    records = []
    for line in data[:whole].splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn line of a worker killed as it wrote it: that hook has no result
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _started_ids(path: Optional[Path]) -> Optional[set[int]]:
    """The ids of the jobs whose hooks a task's worker started (its results file's start lines),
    None without a results file (then any of its jobs may have been running)."""
    if path is None:
        return None
    started: set[int] = set()
    for record in _new_lines(path, _HookTask(None)):
        if "id" not in record and type(record.get("start")) is int:
            started.add(record["start"])
    return started


def _failed(job: dict, message: str) -> dict:
    return {"id": job["id"], "state": JobState.failed.value, "state_timestamp": now_iso(),
            "state_data": {"message": message}}
