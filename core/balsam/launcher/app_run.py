"""Turning an acquired Job into a process: command line, environment, job.out, CPU affinity.

:class:`JobPreparer` loads the job's ApplicationDefinition (cached by app id, read again when older
than :data:`APP_REFRESH_SEC`: :meth:`JobPreparer.refresh_apps`) and asks it for the command line
(``get_arg_str()``; ``run()`` apps get the client's python runner line), the environment
(``get_environ_vars()``) and the shell preamble. A job whose app cannot load or whose command line
cannot be built raises :class:`JobBuildError` with the reason; the job modes mark it FAILED.

:class:`AppProcess` starts one command in the job's workdir (exec'd directly when it is a plain
command line, else under ``/bin/bash -c``) with stdout and stderr in ``job.out``, in its own process
group (so a timeout ends the whole tree), optionally pinned to CPU ids.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs

from ..models import job_workdir
from ..site.apps import is_python_app, overridden_hooks
from ..util import JOB_OUTPUT_NAME, create_job_output, tail_file
from . import spawner
from .job_mode import env_float
from .node_manager import Demand
from .server_secrets import SERVER_SECRET_VARIABLES
from .stale_run import end_stale_run, end_stale_runs

logger = logging.getLogger(__name__)


class JobBuildError(Exception):
    """The job cannot be turned into a command (app fails to load, missing parameter...)."""


class WorkdirUnavailable(JobBuildError):
    """The job's workdir or job.out cannot be made for a reason of the site's file system, not of
    the job (read-only, full, over quota, failing): the job is given back unstarted, not FAILED
    (see :class:`SiteFaults`)."""

    def __init__(self, message: str, path: str, error: OSError) -> None:
        super().__init__(message)
        self.path = path
        self.errno = error.errno


#: errnos of a workdir that cannot be made which say the file system is at fault, not the job.
SITE_FAULT_ERRNOS = frozenset(e for e in (errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO,
                                          # a parallel file system's hiccup, and the launcher out of descriptors
                                          errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ESHUTDOWN,
                                          errno.EMFILE, errno.ENFILE)
                              if e is not None)
#: Faults of the kind above in a row after which a launcher stops acquiring jobs.
SITE_FAULTS_TO_STOP = 3


class SiteFaults:
    """Counts the jobs given back in a row because the site's file system failed their workdir.

    A read-only or full ``data/`` (a Lustre hiccup, a quota) fails every job alike: failing each
    one emptied the queue as fast as the launcher could acquire. Each such job is given back
    unstarted instead (it stays leased, untouched, and the Session's release at the launcher's
    end makes it runnable again); after :data:`SITE_FAULTS_TO_STOP` in a row :attr:`tripped` is
    set, the launcher stops acquiring (one ERROR says why) and ends when idle. A job whose workdir
    was made resets the count. Used by one thread (the acquiring one); the loop reads
    :attr:`tripped` (a bool store)."""

    def __init__(self, limit: int = SITE_FAULTS_TO_STOP) -> None:
        self.limit = limit
        self.streak = 0
        self.tripped = False
        self.given_back: list[int] = []

    def ok(self) -> None:
        self.streak = 0

    def fault(self, job_id: int, exc: WorkdirUnavailable) -> None:
        self.given_back.append(int(job_id))
        self.streak += 1
        if self.tripped:
            return
        if self.streak == 1:
            logger.warning("job %s given back unstarted: %s", job_id, exc)
        if self.streak >= self.limit:
            self.tripped = True
            logger.error("the site's file system fails job workdirs (%s at %s, errno %s, %d jobs in a row): no more "
                         "jobs are acquired; the %d given back return to the queue when this launcher's Session "
                         "ends", os.strerror(exc.errno) if exc.errno else "error", exc.path, exc.errno,
                         self.streak, len(self.given_back))

    def reason(self) -> str:
        return "the site's file system failed job workdirs: not acquiring"


@attrs.define
class PreparedJob:
    job: Any
    id: int
    workdir: Path
    cmdline: str
    env: dict[str, str]
    preamble: str = ""
    demand: Demand = attrs.Factory(Demand)
    launch_params: dict[str, str] = attrs.Factory(dict)
    #: The app keeps the default ``postprocess`` (and is not a ``run()`` app, whose return value the
    #: processing module reads from job.out): the launcher reports a successful exit as RUN_DONE and
    #: POSTPROCESSED in one call (launcher setting ``default_postprocess_in_launcher``).
    postprocess_on_exit: bool = False

    @property
    def footprint(self) -> float:
        return self.demand.footprint

    @property
    def occupied_nodes(self) -> float:
        return self.demand.occupied_nodes


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


#: Seconds a launcher trusts its copy of an app before it reads the App record again: a user who
#: re-syncs a changed app (same name, same id: new command template, run() body, preamble...) gets
#: it in the jobs a running launcher prepares from then on within this time, not after the launcher
#: ends. Jobs prepared before (waiting for a node, or leased ahead) keep the copy they were built
#: with. 10 s: about the time a user takes to submit after a re-sync, while a launcher (which
#: acquires every few seconds anyway) sends at most one extra GET per 10 s, for the apps of the batch
#: at hand only. ``$BALSAM_LAUNCHER_APP_REFRESH_SEC`` overrides it (0: every batch).
APP_REFRESH_SEC = 10.0
APP_REFRESH_ENV = "BALSAM_LAUNCHER_APP_REFRESH_SEC"


#: Retries of the re-read: the batch at hand waits for it, and a server that does not answer keeps
#: the copies loaded earlier (the client's default retries back off for minutes).
APP_REFRESH_RETRY_COUNT = 1


def fetch_app_records(app_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The App records of ``app_ids`` (those that exist) in one request (GET /apps/?id=..: one page
    holds them all, a batch's apps)."""
    from balsam.api import ApplicationDefinition

    client = ApplicationDefinition._models().App._get_client()
    ids = [int(a) for a in app_ids]
    page = client.get("/apps/", params={"id": ids, "limit": len(ids)}, retry_count=APP_REFRESH_RETRY_COUNT)
    return list(page["results"])


def load_app_record(record: Any) -> Any:
    """The class of an App record, loaded from it (never from the client's cache by id)."""
    from balsam.api import ApplicationDefinition

    return ApplicationDefinition.reload(record)


class JobPreparer:
    """Builds :class:`PreparedJob` records from API jobs (apps loaded once per app id, re-read in
    bulk when older than ``app_refresh_sec``: :meth:`refresh_apps`)."""

    def __init__(self, data_path: Path, load_app: Optional[Callable[[int], Any]] = None, *,
                 default_postprocess: bool = False,
                 fetch_apps: Optional[Callable[[Sequence[int]], Sequence[Any]]] = None,
                 load_record: Optional[Callable[[Any], Any]] = None,
                 app_refresh_sec: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.data_path = Path(data_path)
        self._load_app_fn = load_app
        # A caller's own load_app owns its apps: they are re-read only with its own fetch_apps.
        self._fetch_apps = fetch_apps or (fetch_app_records if load_app is None else None)
        self._load_record = load_record or load_app_record
        self.app_refresh_sec = (env_float(APP_REFRESH_ENV, APP_REFRESH_SEC) if app_refresh_sec is None
                                else max(0.0, float(app_refresh_sec)))
        self.clock = clock
        #: When the app records prefetched at the launcher's start (ApplicationDefinition.prefetch_site)
        #: were read, at the latest: apps first loaded later than app_refresh_sec after are read afresh.
        self._created = self.clock()
        #: app id -> when its record was last read (loaded, or found unchanged or failing)
        self._app_read: dict[int, float] = {}
        #: app id -> the serialized class it was loaded from (a record that differs is reloaded)
        self._app_payload: dict[int, Optional[str]] = {}
        #: The last re-read failed (said once per outage).
        self._refresh_failing = False
        #: Bulk re-reads sent (one per refresh_apps that found a stale app).
        self.app_refreshes = 0
        #: Postprocess here the jobs of apps that keep the default hook (see PreparedJob).
        self.default_postprocess = default_postprocess
        self._apps: dict[int, Any] = {}
        #: app id -> whether its jobs are postprocessed on exit (decided once, with the app load)
        self._postprocess_on_exit: dict[int, bool] = {}
        self._app_errors: dict[int, str] = {}
        self._lock = threading.Lock()
        #: Jobs whose earlier run :meth:`end_stale_runs` checked with their batch (prepare skips it once).
        self._checked: set[int] = set()
        #: Job id -> (its ``workdir`` value, the path job_workdir made of it) for the batch
        #: :meth:`end_stale_runs` checked: prepare takes the path from here instead of making it
        #: again (a second Path parse per job otherwise, 2 us), if the value is still the same.
        self._workdirs: dict[int, tuple[Any, Path]] = {}

    def _load_app(self, app_id: int) -> Any:
        app_cls = self._apps.get(app_id)  # the usual case, without the lock (a dict read is atomic)
        if app_cls is not None:
            return app_cls
        with self._lock:
            if app_id in self._apps:
                return self._apps[app_id]
            if app_id in self._app_errors:
                raise JobBuildError(self._app_errors[app_id])
            try:
                if self._load_app_fn is not None:
                    app_cls = self._load_app_fn(app_id)
                else:
                    from balsam.api import ApplicationDefinition

                    app_cls = ApplicationDefinition.load_by_id(app_id)
            except Exception as exc:
                reason = f"An exception occurred while loading the app (id {app_id}): {_one_line(exc)}"
                self._app_errors[app_id] = reason
                self._app_read.setdefault(app_id, self.clock())
                raise JobBuildError(reason) from exc
            now = self.clock()
            # A first load may come from the records prefetched at the launcher's start: as old as this.
            first_read = self._created if now - self._created <= self.app_refresh_sec else now
            self._set_app(app_id, app_cls, self._app_read.get(app_id, first_read))
            return app_cls

    def _set_app(self, app_id: int, app_cls: Any, read_at: float) -> None:
        """Caller holds the lock."""
        self._app_read[app_id] = read_at
        self._app_payload[app_id] = getattr(app_cls, "_serialized_class", None)
        self._app_errors.pop(app_id, None)
        self._postprocess_on_exit[app_id] = self.default_postprocess and _keeps_default_postprocess(app_cls)
        self._apps[app_id] = app_cls  # last: the lock-free read in _load_app must find both

    def refresh_apps(self, jobs: Sequence[Any]) -> None:
        """Before preparing an acquired batch (both modes, via :meth:`end_stale_runs`): the apps of
        its jobs whose copy here is older than ``app_refresh_sec`` are read again, all in ONE request
        (GET /apps/?id=...), and reloaded only where the record's serialized class changed (a user
        re-synced the app under the same id: its jobs must run the new code). An app seen for the
        first time once the launcher's prefetched records are that old is read in the same request.
        Nothing is sent while every copy is fresh: no request per job. An app deleted meanwhile (its
        jobs are deleted with it) is dropped. When the server cannot be reached the copies are kept
        (one warning per outage) and tried again ``app_refresh_sec`` later."""
        if self._fetch_apps is None:
            return
        now = self.clock()
        limit = self.app_refresh_sec
        wanted = set()
        for job in jobs:
            try:
                wanted.add(int(job.app_id))
            except (AttributeError, TypeError, ValueError):
                continue  # prepare reports it
        prefetch_stale = now - self._created > limit
        stale = sorted(a for a in wanted
                       if (now - self._app_read[a] > limit if a in self._app_read else prefetch_stale))
        if not stale:
            return
        self.app_refreshes += 1
        try:
            records = {int(r.id if not isinstance(r, dict) else r["id"]): r for r in self._fetch_apps(stale)}
        except Exception as exc:
            with self._lock:
                for app_id in stale:
                    if app_id in self._app_read:
                        self._app_read[app_id] = now  # tried again after the limit, not per batch
            if not self._refresh_failing:
                logger.warning("could not re-read apps %s (the copies loaded earlier are used): %s", stale,
                               _one_line(exc))
            self._refresh_failing = True
            return
        if self._refresh_failing:
            logger.info("apps re-read again")
        self._refresh_failing = False
        with self._lock:
            for app_id in stale:
                record = records.get(app_id)
                if record is None:
                    if app_id in self._app_read:
                        self._apps.pop(app_id, None)
                        self._app_payload.pop(app_id, None)
                        self._app_errors[app_id] = (f"app {app_id} no longer exists (deleted since this launcher "
                                                    f"loaded it)")
                        self._app_read[app_id] = now
                    continue  # never loaded here: prepare loads it by id (and says why it fails)
                payload = record["serialized_class"] if isinstance(record, dict) else record.serialized_class
                if app_id in self._apps and payload == self._app_payload.get(app_id):
                    self._app_read[app_id] = now
                    continue
                try:
                    app_cls = self._load_record(record)
                except Exception as exc:
                    self._apps.pop(app_id, None)
                    self._app_errors[app_id] = (f"An exception occurred while loading the app (id {app_id}): "
                                                f"{_one_line(exc)}")
                    self._app_read[app_id] = now
                    continue
                if app_id in self._app_payload:
                    logger.info("app %s (id %s) changed: its jobs prepared from now on run the new version",
                                getattr(app_cls, "__name__", "?"), app_id)
                self._set_app(app_id, app_cls, now)

    def prepare(self, job: Any) -> PreparedJob:
        # Runs for every job a launcher starts (thousands a second in serial mode): each model
        # field is read once, and the environment is not walked again when the app's
        # get_environ_vars is the default one (it returns strings only).
        job_id = job.id
        app_id = job.app_id
        app_cls = self._load_app(app_id)
        try:
            app = app_cls(job)
        except Exception as exc:
            raise JobBuildError(f"An exception occurred while loading the app or parameters: {_one_line(exc)}") from exc
        try:
            cmdline = app.get_arg_str()
            env = app.get_environ_vars()
            # The default get_environ_vars adds the app's environment_variables to this process's
            # environment (which cannot hold a NUL): only those are looked at for one below.
            own_vars = getattr(app, "environment_variables", None) or {}
            if getattr(app_cls, "get_environ_vars", None) is not _default_get_environ_vars():
                env = own_vars = {str(k): str(v) for k, v in env.items()}
            preamble_value = app.shell_preamble()
        except Exception as exc:
            raise JobBuildError(f"An exception occurred while constructing the job command line: {_one_line(exc)}") from exc
        if isinstance(preamble_value, (list, tuple)):
            preamble = " && ".join(str(p) for p in preamble_value if str(p).strip())
        else:
            preamble = str(preamble_value or "")
        launch_params = getattr(job, "launch_params", None)
        # exec takes C strings: a NUL ends an argument or a variable there, and posix_spawn refuses
        # it (ValueError) in the process that starts every job. C-level scans; the reason only on
        # the error path.
        if "\x00" in cmdline or "\x00" in preamble or (own_vars and _has_nul(own_vars)) or (
                launch_params and _has_nul(launch_params)):
            raise JobBuildError(_nul_reason(job, cmdline, preamble, own_vars, launch_params or {}))
        # Nor can exec pass one variable over MAX_ARG_BYTES: the job failed at its start with
        # "[Errno 7] Argument list too long: '/usr/bin/true'" (mpi mode: '.../mpiexec'), which named
        # the program, not the variable. A length per variable, as the NUL scan.
        if own_vars and any((len(str(k)) + len(str(v)) + 2) * 4 > MAX_ARG_BYTES for k, v in own_vars.items()):
            oversized = _oversized_variables(own_vars)
            if oversized:
                raise JobBuildError(_oversized_reason(oversized))
        _drop_server_secrets(env, getattr(app, "environment_variables", None) or {})
        env.setdefault("BALSAM_JOB_ID", str(job_id))
        raw_workdir = job.workdir
        made = self._workdirs.pop(job_id, None) if self._workdirs else None
        if made is not None and made[0] == raw_workdir:
            workdir = made[1]
        else:
            try:
                workdir = job_workdir(self.data_path, raw_workdir)
            except ValueError as exc:
                raise JobBuildError(str(exc)) from None
        try:
            # Done here (both modes prepare in their acquire threads) to keep the spawn loop short.
            # The preprocess made both ahead: this is one open of an existing file, unless the job
            # skipped it or its workdir was removed since.
            create_job_output(workdir)
        except OSError as exc:
            message = f"cannot create the job's workdir {workdir}: {exc}"
            if self._site_fault(exc):
                raise WorkdirUnavailable(message, exc.filename or str(workdir), exc) from exc
            raise JobBuildError(message) from exc
        if self._checked and int(job_id) in self._checked:
            self._checked.discard(int(job_id))  # its batch was checked (end_stale_runs)
        else:
            try:
                # An earlier run still alive on this host with nobody to end it (its launcher and
                # spawner killed) is ended first (balsam.launcher.stale_run). The job's first run:
                # one getxattr.
                end_stale_run(job_id, workdir)
            except Exception as exc:  # never a reason not to run the job
                logger.warning("job %s: its earlier run could not be checked: %s", job_id, _one_line(exc))
        demand = Demand.of(job)
        # Always exported, as Balsam 0.7 did: an unset OMP_NUM_THREADS lets OpenMP take every core.
        env.setdefault("OMP_NUM_THREADS", str(demand.threads_per_rank))
        return PreparedJob(
            job=job,
            id=int(job_id),
            workdir=workdir,
            cmdline=cmdline,
            env=env,
            preamble=preamble,
            demand=demand,
            launch_params={str(k): str(v) for k, v in launch_params.items()} if launch_params else {},
            postprocess_on_exit=self._postprocess_on_exit.get(app_id, False),
        )


    def end_stale_runs(self, jobs: Sequence[Any]) -> None:
        """Before preparing an acquired batch (same thread): end the stale runs of all its jobs
        together (:func:`balsam.launcher.stale_run.end_stale_runs`: SIGTERM to every one, one
        grace for them all), so that a batch holding k runs that trap SIGTERM waits one grace,
        not k. :meth:`prepare` then skips the check of these jobs (once each). The batch's apps are
        re-read first when their copies are old (:meth:`refresh_apps`): both modes call this with
        every acquired batch before preparing it."""
        self.refresh_apps(jobs)
        items = []
        workdirs: dict[int, tuple[Any, Path]] = {}
        for job in jobs:
            try:
                job_id, raw_workdir = int(job.id), job.workdir
                workdir = job_workdir(self.data_path, raw_workdir)
            except Exception:
                continue  # prepare reports it
            items.append((job_id, workdir))
            workdirs[job_id] = (raw_workdir, workdir)
        self._workdirs = workdirs  # replaces the last batch's, as _checked below
        self._checked = set()
        if not items:
            return
        try:
            end_stale_runs(items)
        except Exception as exc:  # never a reason not to run the jobs: prepare checks each again
            logger.warning("the earlier runs of %d jobs could not be checked: %s", len(items), _one_line(exc))
            return
        # Replaces the last batch's: a job of it never prepared (given back) is checked again.
        self._checked = {job_id for job_id, _ in items}

    def _site_fault(self, exc: OSError) -> bool:
        """Whether a workdir that cannot be made is the file system's fault rather than the job's:
        read-only, full, over quota, I/O error; or permission denied on the data directory itself
        (not on a directory of the job's choosing)."""
        if exc.errno in SITE_FAULT_ERRNOS:
            return True
        return exc.errno == errno.EACCES and not os.access(self.data_path, os.W_OK | os.X_OK)


def _drop_server_secrets(env: dict[str, str], declared: Mapping[Any, Any]) -> None:
    """Remove the server's secrets (:data:`balsam.launcher.server_secrets.SERVER_SECRET_VARIABLES`)
    that ``env`` got from this process's environment; one the app sets itself (its
    ``environment_variables``, or its own ``get_environ_vars()`` with another value) stays. Apps
    print and copy their environment (``env`` in a job script, MPI debug output, provenance
    records): every job had them. A launcher removes them from its own environment as it starts
    (:func:`balsam.launcher.entry.run_launcher`), so this finds none there; it stays for a
    launcher's pools started otherwise (a library caller, a test). Three lookups a job."""
    for name in SERVER_SECRET_VARIABLES:
        value = env.get(name)
        if value is not None and name not in declared and value == os.environ.get(name):
            del env[name]


def _has_nul(mapping: Mapping[Any, Any]) -> bool:
    return any("\x00" in str(k) or "\x00" in str(v) for k, v in mapping.items())


def _oversized_variables(variables: Mapping[Any, Any]) -> list[tuple[str, int]]:
    """The variables whose ``NAME=value`` (with its terminating NUL) is over :data:`MAX_ARG_BYTES`,
    Linux's cap on one string exec passes (MAX_ARG_STRLEN), with their sizes in bytes."""
    oversized = []
    for key, value in variables.items():
        size = len(f"{key}={value}".encode("utf-8", "surrogateescape")) + 1
        if size > MAX_ARG_BYTES:
            oversized.append((str(key), size - 1))
    return oversized


def _oversized_reason(oversized: Sequence[tuple[str, int]]) -> str:
    names = ", ".join(f"{name!r} ({size:,} bytes)" for name, size in oversized)
    what = f"environment variable {names} is" if len(oversized) == 1 else f"environment variables {names} are"
    return (f"{what} too long: Linux passes at most {MAX_ARG_BYTES - 1:,} bytes in one variable (NAME=value; "
            "MAX_ARG_STRLEN), so no program can be started with it")


def _nul_reason(job: Any, cmdline: str, preamble: str, variables: Mapping[Any, Any], launch_params: Mapping[Any, Any]) -> str:
    """Which of the job's values holds a NUL byte (no program can be given one)."""
    what = []
    if "\x00" in cmdline:
        try:
            params = job.get_parameters()
        except Exception:
            params = {}
        names = sorted(str(k) for k, v in params.items() if "\x00" in str(v))
        what.append(f"parameter {', '.join(map(repr, names))}" if names else "its command line")
    if "\x00" in preamble:
        what.append("the app's shell_preamble")
    what += [f"environment variable {str(k)!r}" for k, v in variables.items() if "\x00" in str(k) or "\x00" in str(v)]
    what += [f"launch parameter {str(k)!r}" for k, v in launch_params.items() if "\x00" in str(k) or "\x00" in str(v)]
    return f"{'; '.join(what)} holds a NUL byte, which no program can be given (exec ends a C string there)"


def _keeps_default_postprocess(app_cls: Any) -> bool:
    """Whether the processing module would give this app's RUN_DONE jobs the default postprocess
    (POSTPROCESSED, nothing else): the same test it applies (:func:`balsam.site.apps.overridden_hooks`)."""
    try:
        return isinstance(app_cls, type) and "postprocess" not in overridden_hooks(app_cls) and not is_python_app(app_cls)
    except Exception:  # an app class that cannot be inspected is left to the processing module
        logger.warning("app %r: cannot tell whether it overrides postprocess; its jobs go through the processing module",
                       app_cls, exc_info=True)
        return False


@functools.lru_cache(maxsize=1)
def _default_get_environ_vars() -> Any:
    """``ApplicationDefinition.get_environ_vars`` itself (imported on first use: the API models are
    loaded after the launcher's first request, to shorten its start-up)."""
    from .._api.app import ApplicationDefinition

    return ApplicationDefinition.get_environ_vars


#: The environment variable that names (space separated) the variables the platform set for a job
#: with a shell preamble (its GPU visibility: ``Platform.job_environment``): the job's shell line sets
#: them again, to the values they had when it started, after the preamble and before the app (or
#: the MPI launcher). Set by :func:`balsam.launcher.runner.launch_environment`.
PLATFORM_VARIABLES = "BALSAM_PLATFORM_VARIABLES"

#: Before the preamble: the values of the variables named in $BALSAM_PLATFORM_VARIABLES (set ones only).
_SAVE_PLATFORM_VARIABLES = (
    f'__balsam_keep=(); for __balsam_n in ${{{PLATFORM_VARIABLES}-}}; do if [ -n "${{!__balsam_n+x}}" ]; '
    'then __balsam_keep+=("$__balsam_n=${!__balsam_n}"); fi; done'
)
#: After it: set again (``${a[@]+...}``: an empty array under a preamble's ``set -u`` is no error in bash < 4.4).
_RESTORE_PLATFORM_VARIABLES = 'for __balsam_kv in ${__balsam_keep[@]+"${__balsam_keep[@]}"}; do export "$__balsam_kv"; done'


#: Before the preamble: an ``exit`` in it (not in a subshell of it, such as the ``(exit $rc)`` idiom
#: of setup scripts) says in job.out that the preamble ended the job. Without it, ``exit 3`` left an
#: empty job.out and an event with exit status 3 and no error: nothing told the preamble from the
#: app. A bash function, not an EXIT trap: a trap keeps bash from exec'ing the app (bash -c execs
#: its last command), and a signal that kills the app then reads 128+N instead of -N. The message's
#: ``echo`` may fail (stderr closed, ``2>/dev/full``): ``|| :``, or under ``set -e`` the job ended
#: with the echo's status 1 instead of the preamble's.
_EXIT_FUNCTION = ('exit() { local __balsam_st=$?; if [ "${BASH_SUBSHELL:-0}" = 0 ]; then echo "balsam: the shell '
                  'preamble called exit ${1-$__balsam_st}: the app was not started" >&2 || :; fi; '
                  'builtin exit "${1-$__balsam_st}"; }')
#: The same message in bash's POSIX mode (``POSIXLY_CORRECT`` in the job's environment, which bash
#: reads at start-up, or the launcher's): there a function may not be named after a special builtin
#: (defining it was fatal, "`exit': is a special builtin", status 2, and no job with a preamble
#: ran), and ``exit`` finds the builtin before any function. An EXIT trap instead (subshells do
#: not inherit it), removed after the preamble (:data:`_DROP_EXIT_TRAP`) so that bash still execs
#: the app. A trap cannot tell an ``exit`` from a ``set -e`` stop (``$BASH_COMMAND`` names the
#: ``source`` line of a multi-line preamble, the failing command under an ERR trap): its line says
#: what is true of both, with the status.
_EXIT_TRAP = ('__balsam_st=$?; echo "balsam: the shell preamble ended the job (exit status $__balsam_st): the app '
              'was not started" >&2 || :')
_PREAMBLE_EXIT = (f"if shopt -qo posix; then __balsam_exit_trap=1; trap {shlex.quote(_EXIT_TRAP)} EXIT; "
                  f"else {_EXIT_FUNCTION}; fi")
#: After the preamble, in POSIX mode: the trap above goes, unless the preamble set its own EXIT
#: trap (kept: it is the user's). ``trap -p`` prints it quoted as here (the body has no ').
_DROP_EXIT_TRAP = ('if [ -n "${__balsam_exit_trap-}" ] && [ "$(trap -p EXIT)" = '
                   f"{shlex.quote(f'trap -- {shlex.quote(_EXIT_TRAP)} EXIT')} ]; then trap - EXIT; fi")
#: After it: the ``exit`` above goes, and a failing last command ends the job with one line saying so
#: (a ``module load`` of a missing module printed its banner and nothing else).
_PREAMBLE_FAILED = (f'__balsam_rc=$?; unset -f exit; {_DROP_EXIT_TRAP}; if [ $__balsam_rc -ne 0 ]; then echo '
                    '"balsam: the shell preamble failed (exit status $__balsam_rc): the app was not started" >&2 || :; '
                    'exit $__balsam_rc; fi')


def shell_line(cmdline: str, preamble: str, workdir: Path) -> str:
    """The bash line that runs ``cmdline`` after the preamble.

    A one-line preamble runs as written, on its own line; a multi-line one is written to
    ``<workdir>/.balsam_preamble.sh`` and sourced (so ``module load`` and exports reach the app).
    Either way a preamble whose last command fails, or that stops itself (``set -e``, an ERR trap,
    ``exit``), skips the app and the job ends RUN_ERROR with the preamble's status. A failing last
    command and an ``exit`` say so in job.out, one line each (:data:`_PREAMBLE_FAILED`,
    :data:`_PREAMBLE_EXIT`); a ``set -e`` stop leaves what the failing command printed (in bash's
    POSIX mode one line for both: :data:`_EXIT_TRAP`).

    The variables the platform set for the job's GPU visibility (named in
    :data:`PLATFORM_VARIABLES`) are set again after the preamble, as they were before it: a
    ``module load`` or ``export ZE_FLAT_DEVICE_HIERARCHY=...`` there no longer changes which GPUs
    the app, or the ranks ``mpiexec --envall`` starts, see (packed jobs shared GPUs so).
    """
    stripped = preamble.strip()
    if not stripped:
        return cmdline
    if "\n" in stripped:
        script = Path(workdir) / ".balsam_preamble.sh"
        script.write_text(preamble if preamble.endswith("\n") else preamble + "\n")
        first = f"source {shlex.quote(str(script))}"
    else:
        first = stripped
    # Not ``f"{preamble} && {cmdline}"``: a docstring-style preamble (its trailing newline) or one
    # ending in ';' was a bash syntax error, and one ending in a ``# comment`` commented out the
    # app, which then exited 0 without running. On a line of its own (the newline ends any
    # comment) and outside any ``&&`` list, where bash ignores ``set -e`` and ERR traps, the
    # preamble stops the shell as it would in a script; its last status decides the rest.
    return f"{_SAVE_PLATFORM_VARIABLES}; {_PREAMBLE_EXIT}\n{first}\n{_PREAMBLE_FAILED}; {_RESTORE_PLATFORM_VARIABLES}; {cmdline}"


_SPAWN_FAILED = 12345


_records: "Optional[tuple[int, spawner.RunRecords]]" = None


def _run_records() -> "spawner.RunRecords":
    """The writer of this process's run records (made again in a forked child: its owner is the child)."""
    global _records
    if _records is None or _records[0] != os.getpid():
        _records = (os.getpid(), spawner.RunRecords())
    return _records[1]


class AppProcess:
    """One running command: spawned in its own session, output to ``job.out``."""

    def __init__(
        self,
        job_id: int,
        shell_cmd: str,
        workdir: Path,
        env: Mapping[str, str],
        cpu_ids: Sequence[int] = (),
        outfile: Optional[Path] = None,
        *,
        sigpipe_ignored: bool = False,
    ) -> None:
        self.job_id = job_id
        self.workdir = Path(workdir)
        self.outfile = outfile or self.workdir / JOB_OUTPUT_NAME
        self.start_time = time.time()
        self.returncode: Optional[int] = None
        self.spawn_error = ""
        self.spawn_errno: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._term_sent_at: Optional[float] = None
        try:
            # O_TRUNC on the job.out the preparer created: re-opening is much cheaper than creating.
            fd = os.open(self.outfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                started = spawner.node_clock()
                self._proc = _spawn_with_affinity(
                    shell_cmd, cwd=str(self.workdir), stdout=fd, env=env, cpu_ids=cpu_ids,
                    sigpipe_ignored=sigpipe_ignored, job_id=job_id,
                )
                # The run's record, as the spawner writes it (balsam.launcher.stale_run); removed
                # when the run is reaped (_forget_record).
                _run_records().write(fd, str(self.workdir), self._proc.pid, started, job_id, path=str(self.outfile))
            finally:
                os.close(fd)
        except OSError as exc:
            # Keep the launcher going: the job ends RUN_ERROR with the reason in its tail (a workdir
            # removed since the job was prepared lands here too).
            self.spawn_error = f"could not start the job: {exc}"
            self.spawn_errno = exc.errno
            self.returncode = _SPAWN_FAILED
            try:
                with open(self.outfile, "ab") as out:
                    out.write((self.spawn_error + "\n").encode())
            except OSError:
                pass

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    #: Set when a :class:`~balsam.launcher.runner.ChildReaper` reaps this process (never poll it then).
    reaped_externally = False
    #: Set by the reaper: the process group still had members when the leader was reaped.
    group_left = False
    _forgotten = False

    def mark_exited(self, returncode: int) -> None:
        """Record the exit status collected by a reaper thread."""
        self.returncode = returncode
        if self._proc is not None:
            self._proc.returncode = returncode  # keeps Popen from waiting on a pid already reaped
            self._forget_record()

    def _forget_record(self) -> None:
        """The run was reaped: its record goes (:meth:`balsam.launcher.spawner.RunRecords.forget`)."""
        records = _records[1] if _records is not None and _records[0] == os.getpid() else None
        if records is not None and self._proc is not None and records.written and not self._forgotten:
            self._forgotten = True  # once: the pid may be a later run's by a second wait()
            records.forget(self._proc.pid)

    def poll(self) -> Optional[int]:
        if self.returncode is not None or self._proc is None or self.reaped_externally:
            return self.returncode
        self.returncode = self._proc.poll()
        if self.returncode is not None:
            self._forget_record()
        return self.returncode

    def _signal_group(self, sig: int) -> None:
        if self._proc is None or self.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        self._term_sent_at = time.monotonic()
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if self._proc is None:
            return self.returncode
        if self.reaped_externally:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.returncode is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.005)
            return self.returncode
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._forget_record()
        return self.returncode

    def tail(self, num_lines: int) -> str:
        return tail_file(self.outfile, num_lines)


_affinity_supported = hasattr(os, "sched_setaffinity")


_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_base_env: Optional[dict[str, str]] = None


def inherited_environment() -> dict[str, str]:
    """This process's environment as children inherit it (snapshot taken at the first spawn)."""
    global _base_env
    if _base_env is None:
        _base_env = dict(os.environ)
    return _base_env


#: Characters that make a command line need a shell (expansions, operators, redirections, globs...).
_SHELL_SYNTAX = frozenset("$`*?[]~;&|<>(){}!#\\\n\r\t")
#: Shell builtins: they only exist inside a shell, or their external twin behaves differently
#: (``echo -e``, ``kill %1``...). ``true`` and ``false`` behave the same either way.
_SHELL_ONLY = frozenset(
    "alias bg bind break builtin caller cd command compgen complete continue declare dirs disown echo enable eval "
    "exec exit export fc fg getopts hash help history jobs kill let local logout mapfile popd printf pushd "
    "pwd read readarray readonly return set shift shopt source suspend test times trap type typeset ulimit "
    "umask unalias unset wait . : [".split()
)


@functools.lru_cache(maxsize=1024)
def _which(name: str, path: str) -> Optional[str]:
    return shutil.which(name, path=path)


def direct_argv(cmdline: str, env: Mapping[str, str]) -> Optional[list[str]]:
    """The argv to exec ``cmdline`` without a shell, or None when it needs bash.

    A plain ``program arg 'quoted arg'`` line splits the same with :func:`shlex.split` as bash
    would split it; exec'ing it directly skips a bash start-up (~0.5 ms) for every task, which is
    a third of the cost of a short serial task. Anything with shell syntax, a shell builtin or a
    program not on ``PATH`` goes through bash as before (so errors read the same in job.out).
    """
    if not cmdline or not _SHELL_SYNTAX.isdisjoint(cmdline):
        return None
    if "'" in cmdline or '"' in cmdline:
        try:
            words = shlex.split(cmdline)
        except ValueError:
            return None
    else:
        # Without quotes (and without the tabs, newlines, backslashes and '#' excluded above) the
        # shell splits on spaces alone: the same words as shlex.split, at a tenth of its cost.
        words = [w for w in cmdline.split(" ") if w]
    if not words or "=" in words[0] or words[0] in _SHELL_ONLY:
        return None
    if "/" in words[0] and not os.path.isabs(words[0]):
        return None  # relative to the job's workdir: let bash find it (and word any error) there
    if "/" in words[0]:
        program = words[0] if os.access(words[0], os.X_OK) else None
    else:  # found on PATH, executable (shutil.which checks it), cached: no system call per task
        program = _which(words[0], env.get("PATH", os.defpath))
    if program is None:
        return None
    return [program, *words[1:]]


#: Linux's cap on one exec argument (MAX_ARG_STRLEN, 32 pages); bash -c takes the line as one.
MAX_ARG_BYTES = 131_072
#: How the script of a shell line too long for one argument is named (in the job's workdir, with
#: a unique ``<job id>.<pid>.<ns>.<n>.sh`` after it), run as ``/bin/bash FILE``.
LONG_LINE_SCRIPT = spawner.COMMAND_SCRIPT_PREFIX
_script_seq = itertools.count()
#: This host's name in a script's name (dots out: the name's fields are dot-separated), so that the
#: sweep of dead launchers' scripts (:func:`_sweep_dead_scripts`) never takes the script of a live
#: launcher on another node sharing the workdir (its pid means nothing here).
_HOST_TAG = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def shell_argv(shell_cmd: str, workdir: str, env_prefix_text: str = "", job_id: Optional[int] = None) -> list[str]:
    """``/bin/bash -c <line>``; a line over :data:`MAX_ARG_BYTES` (a run() job's 128,000-character
    chunks under a shell preamble) is written to
    ``<workdir>/.balsam_command.<job id>.<host>.<pid>.<ns>.<n>.sh`` and run as ``/bin/bash <file>``
    instead: exec refused it ("Argument list too long") and the job never ran. One name per start, so
    jobs (or two runs of one job) sharing a workdir never run each other's line; mode 0600, since the
    line may carry the job's environment (``export K=V``). The script's first command removes it (bash
    keeps reading the open file), so once bash runs it, a launcher killed later leaves nothing. One
    that never runs is removed by whoever drops it (:func:`balsam.launcher.spawner.remove_command_script`;
    the launcher when its spawner dies first). A launcher killed (SIGKILL) between writing it and bash
    starting leaves it (or its ``.part``): the next long-line start of that job on this host removes
    those of the job's launchers no longer alive (:func:`_sweep_dead_scripts`)."""
    line = f"{env_prefix_text} {shell_cmd}" if env_prefix_text else shell_cmd
    if len(line) * 4 < MAX_ARG_BYTES or len(line.encode("utf-8", "surrogateescape")) < MAX_ARG_BYTES:
        return ["/bin/bash", "-c", line]
    try:
        script = _write_command_script(workdir, line, job_id)
    except OSError:  # the start then fails with the kernel's reason, in job.out as any other
        return ["/bin/bash", "-c", line]
    return [spawner.SHELL, script]


def _write_command_script(workdir: str, line: str, job_id: Optional[int]) -> str:
    workdir = os.path.abspath(workdir)
    tag = f"{job_id}.{_HOST_TAG}." if job_id is not None else f"{_HOST_TAG}."
    if job_id is not None:
        _sweep_dead_scripts(workdir, f"{LONG_LINE_SCRIPT}{tag}")
    name = f"{LONG_LINE_SCRIPT}{tag}{os.getpid()}.{time.time_ns()}.{next(_script_seq)}.sh"
    script = os.path.join(workdir, name)
    partial = script + ".part"
    # PATH set for rm alone: the job's own PATH (exported on the next line) may lack /bin.
    text = 'PATH=/usr/bin:/bin:$PATH rm -f -- "$0"\n' + line + "\n"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
            out.write(text)
        os.replace(partial, script)  # never seen half written under its name
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    return script


def _sweep_dead_scripts(workdir: str, head: str) -> None:
    """Remove ``<workdir>/<head><pid>.*`` scripts (and ``.part`` files) whose launcher (``pid``, on
    this host) is gone: a launcher SIGKILLed between writing one and bash starting left it. A live
    pid (or one reused since) keeps its file. One listdir, only for a long-line start."""
    try:
        names = os.listdir(workdir)
    except OSError:
        return
    own = os.getpid()
    for name in names:
        if not name.startswith(head):
            continue
        pid_text = name[len(head):].split(".", 1)[0]
        if not pid_text.isdecimal() or int(pid_text) == own or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(workdir, name))
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # PermissionError: another user's process, alive
        return True
    return True


def env_prefix(env: Mapping[str, str]) -> Optional[str]:
    """``export K=V ...; unset ...;`` turning the inherited environment into ``env``, or None when
    a variable name is not a shell identifier (then the whole environment is passed instead).

    Handing the child the inherited environment plus a few exports avoids encoding ~100 variables
    for every one of thousands of spawns.
    """
    base = inherited_environment()
    changed = [(k, v) for k, v in env.items() if base.get(k) != v]
    removed = [k for k in base if k not in env]
    if any(not _SHELL_NAME.match(k) for k, _ in changed) or any(not _SHELL_NAME.match(k) for k in removed):
        return None
    parts = []
    if changed:
        parts.append("export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in changed) + ";")
    if removed:
        parts.append("unset " + " ".join(removed) + ";")
    return " ".join(parts)


def _spawn_with_affinity(shell_cmd: str, *, cwd: str, stdout: Any, env: Mapping[str, str], cpu_ids: Sequence[int],
                         sigpipe_ignored: bool = False, job_id: Optional[int] = None) -> subprocess.Popen:
    """Popen in a new session, with the child pinned to ``cpu_ids`` from its first instruction.
    ``sigpipe_ignored``: the child keeps this interpreter's ignored SIGPIPE (and SIGXFSZ: Popen
    restores both or neither) instead of the default (MPI launchers: see
    :func:`balsam.launcher.runner.local_pool`).

    The calling thread is pinned around the spawn, so the child inherits the mask before it can
    start children of its own: pinning the child afterwards (``taskset -p`` style) misses any
    process it forked in between. Measured here, the pin/unpin pair costs under 0.05 ms a spawn,
    less than setting the affinity of the new process after the fact.
    """
    direct = direct_argv(shell_cmd, env)
    if direct is not None:
        argv, child_env = direct, env  # the modes pass str -> str mappings (launch_environment)
    else:
        argv, child_env = _through_shell(shell_cmd, cwd, env, job_id)
    own_mask = None
    if cpu_ids and _affinity_supported:
        own_mask = _thread_mask()
        try:
            os.sched_setaffinity(0, cpu_ids)  # this thread only; the child inherits it
        except OSError as exc:  # CPUs outside our cpuset: run unpinned rather than not at all
            logger.debug("cpu affinity %s not applied: %s", list(cpu_ids), exc)
            own_mask = None
    try:
        try:
            return _popen(argv, cwd, stdout, child_env, sigpipe_ignored)
        except OSError as exc:
            if direct is None or exc.errno != errno.ENOEXEC:
                raise
            # An executable script without a '#!' line: the kernel refuses to exec it, where bash
            # (what the line would have gone through without the direct exec) runs it as a shell
            # script. Only this error path pays for the second spawn (still pinned: inside the try).
            argv, child_env = _through_shell(shell_cmd, cwd, env, job_id)
            return _popen(argv, cwd, stdout, child_env, sigpipe_ignored)
    except BaseException:
        spawner.remove_command_script(argv)  # bash never ran it (it removes it itself when it runs)
        raise
    finally:
        if own_mask is not None:
            os.sched_setaffinity(0, own_mask)


def _through_shell(shell_cmd: str, cwd: str, env: Mapping[str, str],
                   job_id: Optional[int] = None) -> tuple[list[str], Optional[Mapping[str, str]]]:
    """``(argv, env for Popen)`` running ``/bin/bash -c <line>`` (:func:`shell_argv`) with ``env``:
    the inherited environment plus an ``export`` prefix when it can be written as one (None: inherit it)."""
    prefix = env_prefix(env)
    if prefix is None:
        return shell_argv(shell_cmd, cwd, job_id=job_id), env
    return shell_argv(shell_cmd, cwd, prefix, job_id=job_id), None


def _popen(argv: list[str], cwd: str, stdout: Any, env: Optional[Mapping[str, str]], sigpipe_ignored: bool) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        stdin=_devnull(),
        env=env,
        start_new_session=True,
        close_fds=True,
        restore_signals=not sigpipe_ignored,
    )


_masks = threading.local()


def _thread_mask() -> set[int]:
    """The calling thread's own CPU mask, read once per thread (only the pinning above changes it,
    and it puts it back): one system call less per spawn."""
    mask = getattr(_masks, "mask", None)
    if mask is None:
        mask = _masks.mask = os.sched_getaffinity(0)
    return mask


_devnull_fd: Optional[int] = None


def _devnull() -> int:
    """One read-only ``/dev/null`` descriptor for every task's stdin (``subprocess.DEVNULL`` opens
    and closes it on each spawn). Close-on-exec, so only the ``dup2`` to fd 0 reaches a child."""
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd
