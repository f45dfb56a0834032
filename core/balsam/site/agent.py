"""The site agent: ``python -m balsam.site`` (started by ``balsam site start``).

It loads the site (``SiteConfig``), builds one instance of every agent module whose settings.yml
section is enabled (entry-point group ``balsam.agent_modules``), and runs each module's
``run_cycle()`` on its period in a thread of its own:

- an exception in a module is logged and the module runs again next period: the agent carries on;
  the same error again (same module, exception type and message) is logged in full the first time
  only, then once every ``REPEATED_ERROR_LOG_SEC`` (5 min) with the number of repeats meanwhile,
  and one line says when the module's cycles succeed again (a persistent failure at a 1 s period
  wrote ~86,000 tracebacks a day);
- errors that mean "the API is unreachable" (connection refused, timeouts, 5xx) are retried with an
  exponential backoff (1 s doubling up to 60 s) instead of every period, logged at each try while
  the wait grows, then once per ``REPEATED_ERROR_LOG_SEC`` (the client's retry warnings left out);
- each plugin's ``balsam_agent_started`` / ``balsam_agent_stopping`` hook is called on its own (one
  that raises is one line, the others still run); hook plugins that failed to load and agent
  module names two distributions claim are named in the log at the start;
- an edit of settings.yml while the agent runs is logged once (it applies at the next start);
- the agent stops with one error line when the server no longer has its site (deleted with
  ``balsam site rm``, a reset database): every module would otherwise log HTTP 404 every cycle;
- SIGTERM / SIGINT / SIGHUP (a closed terminal or ssh session of a foreground agent) stop the agent cleanly: the ``balsam_agent_stopping`` hook, the modules' ``close()``,
  then the pid file is removed;
- the pid file ``balsam-service.pid`` (hostname, pid and the process start time, so a later process
  that reuses the pid is never mistaken for the agent) exists while the agent runs, and the agent
  holds an exclusive flock on ``.balsam-service.lock`` (two agents started at once: one runs);
- a module cycle that runs far past its period (hung) is logged once with its thread's stack;
- child processes still running when the agent stops (a scheduler command that hangs) are ended;
- logs go to ``log/agent_<YYYY-mm-dd_HHMMSS>.log`` in the site.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from ..config.settings import load_settings
from ..config.site_config import SITE_MARKER
from ..launcher.server_secrets import drop_server_secrets
from ..plugins.discovery import HOOK_KIND
from ..plugins.manager import get_plugin_manager
from ..plugins.report import CONFLICT, FAILED
from ..scheduler import reset_ignored_sigchld
from ..serialization import show
from ..util import (START_TIME_TOLERANCE_SEC, EnvNumberError, env_number, log_file_handler, same_process, terminate_processes,
                    try_exclusive_flock)
from .service_client import is_api_outage, load_site_client
from .module import AgentModule

logger = logging.getLogger("balsam.site.agent")

PID_FILE_NAME = "balsam-service.pid"
MAX_BACKOFF_SEC = 60.0
#: Without a refresh credential: stop this long before the login token expires.
TOKEN_EXPIRY_MARGIN_SEC = 120.0
#: How often the agent re-reads the login file for its deadline (a fresh `balsam login` moves it).
LOGIN_CHECK_SEC = 30.0
#: How often the agent looks whether settings.yml was changed since it started (it applies the file
#: only at its start: an edit otherwise did nothing, with nothing in the log to say so).
SETTINGS_CHECK_SEC = 30.0
#: How often the agent checks that the server still has its site record (at once after any HTTP 404).
SITE_CHECK_SEC = 60.0
#: How often the agent checks that its site directory is still where it started (one stat).
SITE_DIR_CHECK_SEC = 1.0
#: A module cycle running longer than max(HUNG_CYCLE_PERIODS x its period, HUNG_CYCLE_MIN_SEC) is
#: reported once (ERROR with the thread's stack): a wait with no timeout (an NFS stat, a socket)
#: otherwise stops the module's work silently while its thread stays alive.
HUNG_CYCLE_PERIODS = 10.0
HUNG_CYCLE_MIN_SEC = 300.0
#: How often the agent logs its "agent alive" line (cycles, errors, hung modules).
ALIVE_NOTE_SEC = 600.0
#: A module cycle failing again with an error it failed with since it last succeeded (same exception
#: type and message) is logged in full once, then at most once per this many seconds, with a count.
REPEATED_ERROR_LOG_SEC = 300.0
#: The longest wait between two cycles of a module (a year; settings.yml refuses longer periods).
MAX_CYCLE_DELAY_SEC = 365 * 86400.0
#: How long the agent's stop waits for the module cycles in progress (a status poll, a submit) to
#: end before it ends the commands still running; ``$BALSAM_AGENT_STOP_WAIT_SEC`` sets another
#: (0 to MAX_STOP_WAIT_SEC): a site whose scheduler commands never take that long can stop sooner
#: when one hangs, one whose submits are slow can wait longer for them.
DEFAULT_STOP_WAIT_SEC = 15.0
MAX_STOP_WAIT_SEC = 3600.0
STOP_WAIT_ENV = "BALSAM_AGENT_STOP_WAIT_SEC"
#: The pid file's line recording the agent's stop wait (``stop_wait_sec=<seconds>``), for `balsam
#: site stop`/`sync`'s timeout (:func:`agent_stop_timeout`) and for `sync`'s restart, which keeps it.
STOP_WAIT_FIELD = "stop_wait_sec="
#: The pid file's line naming the site directory its agent serves (``site_dir_inode=<inode>``, the
#: last line): a copy of the directory made while the agent ran (``cp -a``, ``rsync -a``) holds the
#: same pid file, naming the original's live agent, and was taken for a directory whose agent runs
#: (`site start` said "already running", `site stop` in the copy stopped the original's agent,
#: `site sync` in the copy moved the site there). The inode only: the same directory mounted
#: elsewhere (another login node, an NFS automount mounted again) has another st_dev, not another
#: inode. A pid file without it (an older agent's) is read as before.
SITE_DIR_FIELD = "site_dir_inode="
#: `balsam site stop`'s shortest default timeout (its timeout before the stop wait was settable).
MIN_STOP_TIMEOUT_SEC = 45.0
#: What a stop takes after its wait for the cycles in progress and its stopping hook: the modules'
#: close() (the processing module sends the results it holds; it takes longer while hooks still
#: run, which `balsam site stop -t`/`--force` is for) and the leftover children's end (3 s grace).
#: Not a bound: each of kill_descendants and the sweep of the commands' groups (up to
#: site_ops.SWEEP_ROUNDS rounds) waits out the grace twice (SIGTERM, then SIGKILL) where a process
#: ignores SIGTERM: 24 s at worst, which the hook's allowance covers only when its hook was quick.
STOP_CLOSE_SEC = 10.0

#: Refusals of a request that are no settings error: the credential (401, 403), the site record
#: gone (404, seen by the site check), a timeout, a conflict or a rate limit (408, 409, 429: a
#: later try may pass).
_NOT_SETTINGS_ERRORS = frozenset({401, 403, 404, 408, 409, 429})


def _settings_refused(exc: BaseException) -> bool:
    """True when the server refused a settings push for its values (any other 4xx answer)."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in _NOT_SETTINGS_ERRORS


#: The REST client's logger: one WARNING per retried request ("GET /jobs/: ...; retrying in 0.5 s").
CLIENT_LOGGER = "balsam.client.rest"


class _ClientRetryFilter(logging.Filter):
    """Leaves out the client's retry warnings logged on the thread of a module in an API outage
    (two per try, next to the agent's own line on the outage, which is rate-limited), and on the
    agent's own thread (its site check) while any module is in one."""

    def __init__(self, agent: "Agent") -> None:
        super().__init__()
        self.agent = agent

    def filter(self, record: logging.LogRecord) -> bool:
        in_outage = self.agent._in_outage
        if not in_outage or not hasattr(record, "attempt"):
            return True
        thread = record.threadName or ""
        if thread.startswith("agent-") and thread[len("agent-"):] in in_outage:
            return False
        return thread != self.agent._wait_thread_name


class AgentError(RuntimeError):
    """The agent cannot start (message is one line for the user)."""


def stop_wait_sec() -> float:
    """The stop's wait for cycles in progress: ``$BALSAM_AGENT_STOP_WAIT_SEC``, else 15 s. A value
    that is no number of seconds from 0 to MAX_STOP_WAIT_SEC is an AgentError: the agent refuses to
    start rather than stop, perhaps months later, with a wait nobody meant."""
    try:
        return env_number(STOP_WAIT_ENV, DEFAULT_STOP_WAIT_SEC, fraction=True, maximum=MAX_STOP_WAIT_SEC, on_bad="raise")
    except EnvNumberError as exc:
        raise AgentError(str(exc)) from None


class _Repeats:
    """One error's repeats (see :class:`_RepeatedErrors`)."""

    __slots__ = ("count", "unlogged", "logged_at", "since")

    def __init__(self, now: float) -> None:
        self.count = 1  # failures with it since the module last succeeded
        self.unlogged = 0  # since it was last logged
        self.logged_at = now
        self.since = now


class _RepeatedErrors:
    """The failures of one module's cycles, for :meth:`Agent._module_loop`: says whether an error
    is logged in full (new since the module last succeeded), summed up (the same again, once per
    ``REPEATED_ERROR_LOG_SEC``) or not at all, and when the module recovers. Errors are told apart
    by exception type and message; the most recent ``MAX_KEPT`` distinct ones are remembered (two
    errors that alternate are each summed up, not logged in full each time)."""

    MAX_KEPT = 16

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.errors: dict[tuple[str, str], _Repeats] = {}
        self.failures = 0  # in a row, whatever the error
        self.since = 0.0  # when the first of them happened

    def failed(self, exc: BaseException) -> Optional[str]:
        """None: log ``exc`` in full (a new error); "": log nothing; else the summary line's text."""
        now = self.clock()
        if not self.failures:
            self.since = now
        self.failures += 1
        key = (type(exc).__name__, str(exc))
        repeats = self.errors.pop(key, None)
        if repeats is None:
            self.errors[key] = _Repeats(now)
            while len(self.errors) > self.MAX_KEPT:
                del self.errors[next(iter(self.errors))]  # the one seen least recently
            return None
        self.errors[key] = repeats  # the most recently seen last
        repeats.count += 1
        repeats.unlogged += 1
        if now - repeats.logged_at < REPEATED_ERROR_LOG_SEC:
            return ""
        note = (f"repeated {repeats.unlogged} times in the last {(now - repeats.logged_at) / 60:.0f} min "
                f"({repeats.count} times since {(now - repeats.since) / 60:.0f} min ago)")
        repeats.unlogged, repeats.logged_at = 0, now
        return note

    def succeeded(self) -> Optional[str]:
        """The recovery line's text after failures (None: there were none)."""
        if not self.failures:
            return None
        kinds = len(self.errors)
        note = (f"{self.failures} failure{'s' if self.failures != 1 else ''} in a row over "
                f"{(self.clock() - self.since) / 60:.0f} min"
                + (f" ({kinds} different errors)" if kinds > 1 else ""))
        self.errors.clear()
        self.failures = 0
        return note


# -- pid file -------------------------------------------------------------------------------------


def pid_file_path(site_path: Path) -> Path:
    return Path(site_path) / PID_FILE_NAME


def site_dir_identity(site_path: Path) -> Optional[int]:
    """The site directory's inode (:data:`SITE_DIR_FIELD`), None when it cannot be read."""
    try:
        return os.stat(site_path).st_ino
    except OSError:
        return None


def _pid_file_of_another_directory(site_path: Path, fields: list[str]) -> bool:
    for field in fields[3:]:
        if field.startswith(SITE_DIR_FIELD):
            here = site_dir_identity(site_path)
            try:
                return here is not None and int(field[len(SITE_DIR_FIELD):]) != here
            except ValueError:
                return False
    return False


def pid_file_of_another_directory(site_path: Path) -> bool:
    """Whether the site's pid file names an agent of another directory: it was copied with this one
    (``cp -a``, ``rsync -a`` while that agent ran). :func:`read_pid_record` reads no record then."""
    try:
        return _pid_file_of_another_directory(site_path, pid_file_path(site_path).read_text().split())
    except OSError:
        return False


def read_pid_record(site_path: Path) -> Optional[tuple[str, int, Optional[float]]]:
    """(hostname, pid, process start time) from the site's pid file, or None when there is none.

    The start time (seconds since the epoch, as psutil reports it) tells the agent apart from a
    later process that got the same pid; files written by older versions have none (None). A pid
    file that names an agent of another directory (:func:`pid_file_of_another_directory`: copied
    with this one) is none: its agent serves the original, whatever its pid, host and start time.
    """
    path = pid_file_path(site_path)
    try:
        lines = path.read_text().split()
        start_time = float(lines[2]) if len(lines) > 2 else None
        record = lines[0], int(lines[1]), start_time
    except (OSError, IndexError, ValueError):
        return None
    return None if _pid_file_of_another_directory(site_path, lines) else record


def settings_digest(text: Optional[bytes]) -> Optional[str]:
    """The fingerprint of settings.yml's text (None: unreadable) that the pid file records: what
    the agent started with, which `balsam site status` compares with the file as it is now."""
    return None if text is None else "sha256:" + hashlib.sha256(text).hexdigest()


def settings_changed_since_start(site_path: Path, settings_path: Path) -> Optional[bool]:
    """Whether settings.yml differs now from the text the agent recorded in its pid file at start,
    the agent's own test (:meth:`Agent.check_settings_file`): its content, not its mtime (a
    `touch`, an edit undone: unchanged); now unreadable: changed. None when the pid file records
    no text (an agent of an older version, or one that could not read the file at start)."""
    try:
        fields = pid_file_path(site_path).read_text().split()
    except OSError:
        return None
    started = next((field for field in fields[3:] if field.startswith("sha256:")), None)
    if started is None:
        return None
    try:
        now = settings_path.read_bytes()
    except OSError:
        return True
    return settings_digest(now) != started


def recorded_stop_wait(site_path: Path) -> Optional[float]:
    """The stop wait the running agent recorded in its pid file (:data:`STOP_WAIT_FIELD`); None
    when the file records none (no agent, one of an older version, or one just starting)."""
    try:
        fields = pid_file_path(site_path).read_text().split()
    except OSError:
        return None
    for field in fields[3:]:
        if field.startswith(STOP_WAIT_FIELD):
            try:
                value = float(field[len(STOP_WAIT_FIELD):])
            except ValueError:
                return None
            return value if 0 <= value <= MAX_STOP_WAIT_SEC else None
    return None


def stop_timeout(stop_wait: Optional[float]) -> float:
    """How long `balsam site stop` (and `sync`'s restart) waits for an agent whose stop wait is
    ``stop_wait`` (None: unknown, the default assumed) to exit: that wait for its cycles in
    progress, its stopping hook's limit and its modules' close (:data:`STOP_CLOSE_SEC`), at least
    :data:`MIN_STOP_TIMEOUT_SEC`. A fixed 45 s gave up on an agent with a longer stop wait, and
    `sync` then left it stopped, never restarted."""
    wait = DEFAULT_STOP_WAIT_SEC if stop_wait is None else stop_wait
    return max(MIN_STOP_TIMEOUT_SEC, wait + AGENT_HOOK_TIMEOUT_SEC + STOP_CLOSE_SEC)


def agent_stop_timeout(site_path: Path) -> float:
    """:func:`stop_timeout` of the stop wait the site's agent recorded in its pid file."""
    return stop_timeout(recorded_stop_wait(site_path))


def read_pid_file(site_path: Path) -> Optional[tuple[str, int]]:
    """(hostname, pid) from the site's pid file, or None when there is none (or it is unreadable)."""
    record = read_pid_record(site_path)
    return (record[0], record[1]) if record is not None else None


def pid_alive(pid: int, start_time: Optional[float] = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``start_time`` is given, is the process that
    started then (not a later one that reused the pid): :func:`balsam.util.same_process`."""
    return same_process(pid, start_time)


def _is_agent_process(pid: int) -> bool:
    """For pid files without a start time: does ``pid`` at least run the site agent?"""
    try:
        import psutil

        return "balsam.site" in " ".join(psutil.Process(pid).cmdline())
    except Exception:
        return False


def recorded_agent_alive(record: tuple[str, int, Optional[float]]) -> bool:
    """The pid file's agent still runs on this host (same pid *and* start time)."""
    _host, pid, start_time = record
    if start_time is None:
        return pid_alive(pid) and _is_agent_process(pid)
    return pid_alive(pid, start_time)


def agent_running(site_path: Path) -> Optional[tuple[str, int]]:
    """(hostname, pid) of the agent recorded in the pid file if it is alive (or on another host)."""
    record = read_pid_record(site_path)
    if record is None:
        return None
    host, pid, _start = record
    if host != socket.gethostname():
        return host, pid  # cannot check another host's processes: trust the file
    return (host, pid) if recorded_agent_alive(record) else None


#: Held (``fcntl.flock``, exclusive) by the agent for its whole life: two agents started at the same
#: moment both found no live pid file and both ran (the pid file alone is check-then-write). flock
#: locks are shared across hosts on NFS v4 and on Lustre/GPFS mounted with flock support; where the
#: file system refuses flock (ENOLCK/ENOSYS, e.g. Lustre with ``noflock``) the agent logs a warning
#: and relies on the pid file alone.
LOCK_FILE_NAME = ".balsam-service.lock"
#: site dir -> the open lock file descriptor this process holds (a second Agent.run in one process,
#: e.g. in tests, reuses it: a second flock on a new descriptor would refuse our own lock).
_held_locks: dict[str, int] = {}


def lock_file_path(site_path: Path) -> Path:
    return Path(site_path) / LOCK_FILE_NAME


def acquire_agent_lock(site_path: Path) -> Optional[int]:
    """Take the site's agent lock for this process's life; AgentError if another process holds it.
    Returns the descriptor (None where the file system has no flock)."""
    key = str(Path(site_path).absolute())
    if key in _held_locks:
        return _held_locks[key]
    path = lock_file_path(site_path)
    try:
        fd = try_exclusive_flock(path)
    except OSError as exc:
        logger.warning("cannot lock %s (%s): relying on the pid file alone to keep a second agent out", path, exc)
        return None
    if fd is None:
        raise AgentError(f"another site agent holds {path} (starting or running, perhaps on another host)")
    _held_locks[key] = fd
    return fd


def release_agent_lock(site_path: Path) -> None:
    fd = _held_locks.pop(str(Path(site_path).absolute()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def write_pid_file(site_path: Path, before_write: Optional[Callable[[], None]] = None) -> Path:
    """Take the agent lock, check that no agent runs, call ``before_write``, write the pid file.
    The lock stays held until :func:`remove_pid_file` (or the process's exit); what ``before_write``
    raises releases it and is raised."""
    import psutil

    path = pid_file_path(site_path)
    acquire_agent_lock(site_path)
    try:
        running = agent_running(site_path)
        if running is not None and running[1] != os.getpid():
            host, pid = running
            if host != socket.gethostname():
                raise AgentError(f"the pid file {path} names a site agent on {host} [pid {pid}]: stop it there; if that "
                                 "host is gone, `balsam site start --force` drops the file once the site looks dead")
            raise AgentError(f"the site agent is already running on {host} [pid {pid}] (pid file {path})")
        if before_write is not None:
            before_write()
        if path.exists():
            what = "the pid file of another directory's agent, copied with this one," \
                if pid_file_of_another_directory(site_path) else "stale pid file"
            logger.warning("replacing %s %s (%s)", what, path, path.read_text().split())
        # A temp name of this process's own: a shared one was replaced from under a concurrent start
        # (FileNotFoundError in os.replace).
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        identity = site_dir_identity(site_path)
        where = f"{SITE_DIR_FIELD}{identity}\n" if identity is not None else ""
        _replace_with_text(tmp, path,
                           f"{socket.gethostname()}\n{os.getpid()}\n{psutil.Process().create_time():.3f}\n{where}")
    except BaseException:
        release_agent_lock(site_path)
        raise
    return path


def record_started_settings(site_path: Path, settings_text: Optional[bytes],
                            stop_wait_sec: Optional[float] = None) -> None:
    """Add to this agent's pid file the digest of settings.yml as it started with it (a fourth
    line, which older readers ignore), for `balsam site status` (:func:`settings_changed_since_start`),
    and its stop wait (:data:`STOP_WAIT_FIELD`), for `balsam site stop`/`sync`
    (:func:`agent_stop_timeout`). Replaced whole (a temp file, then a rename): a reader never
    finds half a file."""
    digest = settings_digest(settings_text)
    path = pid_file_path(site_path)
    lines = path.read_text().split()
    if lines[:2] != [socket.gethostname(), str(os.getpid())]:
        return  # not our pid file
    # No digest when settings.yml was unreadable at start (status then goes by its mtime).
    added = ([digest] if digest is not None else []) + \
        ([f"{STOP_WAIT_FIELD}{stop_wait_sec!r}"] if stop_wait_sec is not None else [])
    if not added:
        return
    # The site directory's line stays the last one.
    kept = [line for line in lines[3:] if line.startswith(SITE_DIR_FIELD)]
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    _replace_with_text(tmp, path, "".join(f"{line}\n" for line in lines[:3] + added + kept))


def _replace_with_text(tmp: Path, path: Path, text: str) -> None:
    """Write ``text`` to ``tmp``, then rename it to ``path``. On a full or over-quota disk the
    error names ``path`` and ``tmp`` is removed (an empty one was left at every start)."""
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def kill_descendants(grace_sec: float = 3.0) -> list[int]:
    """SIGTERM this process's remaining child processes (a scheduler command hung past the stop, a
    pool's server process...), SIGKILL those still there after ``grace_sec``; returns their pids.
    Batch jobs of the local scheduler run in sessions of their own and are not children."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return terminate_processes(children, grace_sec)


def remove_pid_file(site_path: Path) -> None:
    found = read_pid_file(site_path)
    if found is not None and found == (socket.gethostname(), os.getpid()):
        pid_file_path(site_path).unlink(missing_ok=True)
    release_agent_lock(site_path)  # after the unlink: the next agent finds no pid file of ours


# -- settings access -------------------------------------------------------------------------------


def settings_section(settings: Any, name: str) -> Any:
    """The loaded settings section ``name`` (None when disabled or absent)."""
    sections = getattr(settings, "sections", None)
    if isinstance(sections, dict) and name in sections:
        return sections[name]
    return getattr(settings, name, None)


def setup_logging(site_config: Any, *, stream: bool = False) -> Path:
    log_settings = site_config.settings.logging
    level, fmt, datefmt = log_settings.level.upper(), log_settings.format, log_settings.datefmt
    log_dir = Path(getattr(site_config, "log_path", Path(site_config.site_path) / "log"))
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"agent_{dt.datetime.now():%Y-%m-%d_%H%M%S}.log"
    handler = log_file_handler(path, log_settings)
    # On the root logger, so third-party agent modules logging under their own names land here too.
    root = logging.getLogger()
    root.setLevel(getattr(logging, level, logging.INFO))
    root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "stevedore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if stream:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(fmt, datefmt))
        root.addHandler(console)
    return path


def _raised_at(exc: BaseException) -> str:
    """``file.py:LINE`` of the frame that raised ``exc`` ("" without a traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


#: The longest the agent waits for one plugin's balsam_agent_started / balsam_agent_stopping hook.
#: One that hung (a network mount, a lock) kept the agent from ever starting its modules, or from
#: stopping: `balsam site stop` gave up after 45 s, with nothing in the log.
AGENT_HOOK_TIMEOUT_SEC = 20.0


def _call_bounded(name: str, plugin: str, call: Callable[[], Any]) -> None:
    """Run one hook call in a thread of its own and wait for it at most ``AGENT_HOOK_TIMEOUT_SEC``;
    a failure or a hang is one ERROR line naming the plugin (a hung call's thread is left running).

    A worker thread, not the agent's main thread, by choice: only a thread can bound every hang,
    a network file system's uninterruptible I/O included (a timer signal on the main thread would
    not), and a hung hook silently froze the agent. The cost, documented in the hookspecs and
    docs/plugins/hooks.md: a hook cannot do what only the main thread may (``signal.signal``: do it
    when the plugin module is imported), and the started and stopping hooks run in different
    threads (state kept in thread-locals is not shared between them: keep it on the plugin)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except Exception as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"agent-hook-{plugin}", daemon=True)
    thread.start()
    thread.join(AGENT_HOOK_TIMEOUT_SEC)
    if thread.is_alive():
        logger.error("plugin %s: its %s hook has not returned after %.0f s (hung?): the agent goes on without "
                     "waiting for it", plugin, name, AGENT_HOOK_TIMEOUT_SEC)
    elif failure:
        exc = failure[0]
        hint = ""
        if isinstance(exc, ValueError) and "main thread" in str(exc):
            # signal.signal() and the like: say why, or the plugin's author sees a call that worked
            # when tried from a script fail in the agent with no reason given
            hint = (f" (agent hooks run in a worker thread, here {thread.name!r}, not the main thread: "
                    "install signal handlers when the plugin module is imported)")
        logger.error("plugin %s: its %s hook failed (ignored; the agent carries on): %s: %s%s%s", plugin, name,
                     type(exc).__name__, exc, _raised_at(exc), hint)


def call_agent_hook(name: str, **kwargs: Any) -> None:
    """Call every plugin's implementation of the agent hook ``name`` (``balsam_agent_started``,
    ``balsam_agent_stopping``), each on its own: pluggy stops at the first implementation that
    raises, so one broken plugin kept every plugin called after it from seeing the agent start (or
    stop: resources held for ever). A failure, or a call not returned within
    ``AGENT_HOOK_TIMEOUT_SEC``, is one ERROR line naming the plugin; the agent carries on."""
    try:
        caller = getattr(get_plugin_manager().hook, name)
        implementations = caller.get_hookimpls()
    except Exception as exc:  # the plugins could not be loaded: the agent runs on without the hook
        logger.error("cannot call the %s hooks (ignored): %s: %s", name, type(exc).__name__, exc)
        return
    if any(impl.hookwrapper or impl.wrapper for impl in implementations):
        # A wrapper must wrap the others: only pluggy's own call can do that.
        _call_bounded(name, ", ".join(impl.plugin_name for impl in implementations), lambda: caller(**kwargs))
        return
    for impl in reversed(implementations):  # pluggy's order: the last registered first
        arguments = {arg: kwargs[arg] for arg in impl.argnames}
        _call_bounded(name, impl.plugin_name, lambda impl=impl, arguments=arguments: impl.function(**arguments))


# -- the agent ------------------------------------------------------------------------------------


class Agent:
    """Runs the enabled agent modules of one site until stopped."""

    def __init__(self, site_config: Any, client: Any = None, modules: Optional[list[AgentModule]] = None,
                 *, end_children: bool = False) -> None:
        #: How long :meth:`shutdown` waits for the cycles in progress (read first: a bad value
        #: refuses the start before anything else is done).
        self.stop_wait_sec = stop_wait_sec()
        self.site_config = site_config
        #: The agent is its own process (``python -m balsam.site``): end its leftover children at shutdown.
        self.end_children = end_children
        self.site_path = Path(site_config.site_path)
        self.client = client if client is not None else self._make_client()
        self.modules: list[AgentModule] = modules if modules is not None else []
        self._modules_given = modules is not None
        self.stop_event = threading.Event()
        self.stop_reason = "signal"
        #: The last SIGTERM/SIGINT/SIGHUP received (set by the signal handler, which takes no lock).
        self.signal_received: Optional[int] = None
        self._signal_pipe: Optional[tuple[int, int]] = None
        #: The handlers run() replaced, put back when it returns.
        self._previous_handlers: dict[int, Any] = {}
        self._signal_thread: Optional[threading.Thread] = None
        self.threads: list[threading.Thread] = []
        self._dead_threads: set[str] = set()
        self.cycles: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        #: Set when the server refused the agent's credential for good (revoked, or expired with no
        #: newer login on disk).
        self.credential_refused: Optional[str] = None
        #: A module cycle got HTTP 404: check the site record at the next look rather than in a minute.
        self._site_check_due = False
        self._forget_listener: Callable[[], None] = lambda: None
        #: module name -> monotonic start of the cycle in progress (absent between cycles).
        self._cycle_started: dict[str, float] = {}
        #: module name -> the start of the cycle already reported as hung (reported once per cycle).
        self._hung_reported: dict[str, float] = {}
        #: settings.yml still to be copied to the site record (the server was down at start-up).
        self.settings_push_pending = False
        self._cycles_at_push = -1
        #: Modules whose cycles fail for an API outage (in backoff): the client's own retry warnings
        #: on their threads are left out of the log (:class:`_ClientRetryFilter`).
        self._in_outage: set[str] = set()
        self._retry_filter = _ClientRetryFilter(self)
        #: The thread running :meth:`wait` (its site check's requests), once it runs.
        self._wait_thread_name: Optional[str] = None
        #: settings.yml's (mtime, size, inode) as last seen (None: unreadable): taken here, before
        #: build_modules() reads the file if main() has not, so that no edit goes unreported.
        self._settings_stamp = self._settings_file_stamp()
        #: settings.yml's text as the agent started with it (an edit undone, a `touch`: no change).
        self._settings_text = self._settings_file_text()
        #: Times the repeats of a module's error (monotonic seconds); tests put a clock of their own.
        self.clock: Callable[[], float] = time.monotonic
        #: The site marker's inode at the start (None or -1: none there or unknown, nothing to check).
        self._site_marker_id = self._site_marker_identity()
        self._site_moved_seen = False
        #: The site record as the last site check read it (:meth:`check_site_taken`).
        self._site_record: Optional[dict] = None
        #: Whether a site record read since the start named this directory (its start's claim, then
        #: its settings push): one that never did (the API down at the start) was not taken from it.
        self._site_record_ours = False

    def _make_client(self) -> Any:
        client = load_site_client(self.site_config)
        # The agent does its own backoff: keep the client's blocking retries short so that a
        # SIGTERM is served promptly even during an API outage.
        if hasattr(client, "retry_count"):
            client.retry_count = min(int(client.retry_count), 2)
        if hasattr(client, "backoff_max"):
            client.backoff_max = min(float(client.backoff_max), 4.0)
        return client

    # -- building --------------------------------------------------------------------------------
    def build_modules(self) -> list[AgentModule]:
        pm = get_plugin_manager()
        settings = self.site_config.settings
        modules: list[AgentModule] = []
        drivers = pm.list_drivers("agent_module")
        # Names a second distribution also claims: which one a section runs follows the order of the
        # metadata scan, and only `balsam plugins ls` showed the other.
        losers: dict[str, list[Any]] = {}
        for record in pm.records(resolve=False):
            if record.kind == "agent_module" and record.status == CONFLICT:
                losers.setdefault(record.name, []).append(record)
        for name in sorted(drivers):
            section = settings_section(settings, name)
            if section is None:
                logger.info("agent module %s: disabled (no `%s:` section in settings.yml)", name, name)
                continue
            if name in losers:
                winner = drivers[name]
                others = "; ".join(f"{r.distribution or r.source} ({r.target})" for r in losers[name])
                logger.warning("agent module %s: the `%s:` section runs %s's (%s); also installed under that name, "
                               "not used: %s (uninstall one; `balsam plugins ls`)", name, name,
                               winner.distribution or winner.source, winner.target, others)
            try:
                cls = pm.load_driver("agent_module", name)
                module = cls(self.site_config, section, self.client)
            except Exception as exc:
                logger.error("agent module %s: cannot start: %s", name, exc, exc_info=True)
                continue
            if not getattr(module, "section", ""):
                module.section = name  # type: ignore[misc]
            modules.append(module)
        return modules

    # -- running ---------------------------------------------------------------------------------
    def _module_loop(self, module: AgentModule) -> None:
        name = module.name
        backoff = 0.0
        outage_tries, outage_since, outage_logged_at = 0, 0.0, 0.0
        repeated = _RepeatedErrors(self.clock)
        bad_delay_warned: set[str] = set()
        while not self.stop_event.is_set():
            delay: Optional[float]
            self._cycle_started[name] = time.monotonic()
            try:
                delay = module.run_cycle()
                self.cycles[name] = self.cycles.get(name, 0) + 1
                if backoff:
                    logger.info("%s: API reachable again after %d failed tr%s over %.0f min", name, outage_tries,
                                "y" if outage_tries == 1 else "ies", (self.clock() - outage_since) / 60)
                    self._in_outage.discard(name)
                backoff, outage_tries = 0.0, 0
                recovered = repeated.succeeded()
                if recovered is not None:
                    logger.info("%s: cycle succeeded again after %s", name, recovered)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a plugin or driver calling sys.exit must not end the module
                self.errors[name] = self.errors.get(name, 0) + 1
                if isinstance(exc, Exception) and is_api_outage(exc):
                    ramping = backoff < MAX_BACKOFF_SEC
                    backoff = min(MAX_BACKOFF_SEC, max(1.0, backoff * 2))
                    now = self.clock()
                    outage_tries += 1
                    if outage_tries == 1:
                        outage_since = now
                        self._in_outage.add(name)
                    # Each try while the wait grows (1, 2, 4 ... 60 s), then once per
                    # REPEATED_ERROR_LOG_SEC: a server down for a day wrote a line a minute per module.
                    if ramping or now - outage_logged_at >= REPEATED_ERROR_LOG_SEC:
                        outage_logged_at = now
                        still = "" if ramping else (f"; still unavailable after {outage_tries} tries over "
                                                    f"{(now - outage_since) / 60:.0f} min")
                        logger.warning("%s: API unavailable (%s); next try in %.0f s%s", name, exc, backoff, still)
                    delay = backoff
                else:
                    if getattr(exc, "status_code", None) == 404:
                        self._site_check_due = True
                    # In full the first time; the same error again is summed up every few minutes.
                    note = repeated.failed(exc)
                    what = "failed" if isinstance(exc, Exception) else f"raised {type(exc).__name__}"
                    if note is None:
                        logger.error("%s: cycle %s (the agent carries on): %s", name, what, exc, exc_info=True)
                    elif note:
                        logger.error("%s: cycle %s again (the agent carries on): %s: %s; %s", name, what,
                                     type(exc).__name__, exc, note)
                    delay = None
            finally:
                self._cycle_started.pop(name, None)
            returned = delay
            try:
                delay = float(module.period if delay is None else delay)
            except Exception:
                # A cycle returning what is no number (a dict, a word): the comparisons below raised
                # outside the cycle's own handler and ended the module's thread for good.
                delay = math.nan
            if returned is None:
                # A period of 0 or less (a settings dict that skipped the loader's checks, a plugin's
                # computed one) cycles without pause, as a NaN does; a cycle may still return 0 itself
                # ("more work waiting").
                bad_period = delay <= 0
            else:
                bad_period = False
            if bad_period or not math.isfinite(delay) or delay > MAX_CYCLE_DELAY_SEC:
                # A NaN wait returns at once (a busy loop); one past the platform's time_t raises
                # OverflowError and ends the module's thread. A plugin module could compute either.
                usable = MAX_CYCLE_DELAY_SEC if delay > MAX_CYCLE_DELAY_SEC else float(AgentModule.default_period)
                if name not in bad_delay_warned:
                    bad_delay_warned.add(name)
                    what = "a period of more than 0" if bad_period else "a finite number of seconds"
                    logger.warning("%s: cannot wait %s s before the next cycle (not %s up to %.0f); waiting "
                                   "%.0f s instead", name, show(delay if returned is None else returned), what,
                                   MAX_CYCLE_DELAY_SEC, usable)
                delay = usable
            logger.debug("%s: cycle %d done; next in %.2f s", name, self.cycles.get(name, 0), delay)
            if delay > 0:
                self.stop_event.wait(delay)

    def _install_signal_handlers(self) -> None:
        # The handler runs on the main thread between two bytecodes, possibly while that thread
        # holds stop_event's Condition lock (inside stop_event.wait() in wait()) or the logging
        # module's lock: stop_event.set() or a log call there waits for ever on a lock its own
        # thread holds (`balsam site stop` then gave up after 45 s). So it takes no lock: it
        # records the signal and writes one byte to a pipe; a helper thread logs and stops.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # a burst of signals must never block the handler
        self._signal_pipe = (read_fd, write_fd)

        def handler(signum: int, _frame: Any) -> None:
            self.signal_received = signum
            try:
                os.write(write_fd, b"\0")
            except OSError:  # pipe full (a byte already waits) or closed: the stop is on its way
                pass

        self._signal_thread = threading.Thread(target=self._serve_signals, args=(read_fd,), name="agent-signals",
                                               daemon=True)
        self._signal_thread.start()
        # SIGHUP: a foreground agent's terminal or ssh session closing; without a handler it killed
        # the agent with no shutdown (log buffer lost, modules not closed, pid file left).
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _remove_signal_handlers(self) -> None:
        """Put back the handlers run() replaced, then close the pipe (its thread sees the end and
        returns): an embedding program, or a test running several agents in one process, keeps no
        thread or descriptors per run."""
        # Handlers first: a signal after the close must not reach a handler writing to a descriptor
        # number the process may already have reused for another file.
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        if self._signal_pipe is not None:
            read_fd, write_fd = self._signal_pipe
            self._signal_pipe = None
            os.close(write_fd)  # the reader's os.read() returns b"": it closes read_fd and ends
        if self._signal_thread is not None:
            self._signal_thread.join(5)
            self._signal_thread = None

    def _serve_signals(self, read_fd: int) -> None:
        """The signal handler's other half (a thread of its own, free to take locks): log the
        signal and stop the agent."""
        while True:
            try:
                if not os.read(read_fd, 1):
                    os.close(read_fd)
                    return
            except OSError as exc:
                # Ours to close, but for EBADF: closed already, and its number may be another
                # file's by now.
                if exc.errno != errno.EBADF:
                    with contextlib.suppress(OSError):
                        os.close(read_fd)
                return
            signum = self.signal_received
            name = signal.Signals(signum).name if signum is not None else "a signal"
            logger.info("received %s: stopping", name)
            self.request_stop("signal")

    def request_stop(self, reason: str = "signal") -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    def _token_deadline(self) -> Optional[float]:
        """When the stored login stops working: never with a refresh credential (the client renews
        its access tokens), else shortly before the access token expires. Read from the login file
        each time, so that a fresh `balsam login` moves it (the original computed it once)."""
        try:
            from ..client.settings import ClientSettings

            stored = ClientSettings.load(getattr(self.client, "settings_path", None))
        except Exception:
            return None
        expiry = stored.token_expiry
        if stored.refresh_token or not expiry:
            return None
        if isinstance(expiry, str):
            from ..serialization import parse_datetime

            expiry = parse_datetime(expiry)
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return time.time() + (expiry - dt.datetime.now(dt.timezone.utc)).total_seconds() - TOKEN_EXPIRY_MARGIN_SEC

    def start(self) -> None:
        """Build the modules (unless given), call the started hook and start one thread per module."""
        self._log_settings_warnings()
        if not self._modules_given:
            self.modules = self.build_modules()
            if not self.modules:
                # It would run on, doing nothing, with nothing in its log to say so.
                logger.warning("no agent module is enabled: the agent will do nothing (enable a section such as "
                               "scheduler:, processing: or transfers: in settings.yml)")
        names = ", ".join(m.describe() for m in self.modules) or "none"
        logger.info("site %s at %s: modules %s", getattr(self.site_config, "site_id", "?"), self.site_path, names)
        self._log_broken_hook_plugins()
        logging.getLogger(CLIENT_LOGGER).addFilter(self._retry_filter)
        call_agent_hook("balsam_agent_started", site_config=self.site_config, modules=list(self.modules))
        from ..client import on_credential_refused

        self._forget_listener = on_credential_refused(self._on_credential_refused)
        for module in self.modules:
            thread = threading.Thread(target=self._module_loop, args=(module,), name=f"agent-{module.name}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _log_settings_warnings(self) -> None:
        """settings.yml's warnings about what this agent runs, once, at its start: those about
        ``logging`` (``retention_days`` with the scheduler module off) and about each enabled
        agent module's section (``Settings.agent_warnings``). One place for all of them: modules
        that logged their own said some (elastic_queue, queue_maintainer) and not others
        (transfers.retry_backoff_max_sec below retry_backoff_sec reached only check-settings)."""
        try:
            settings = getattr(self.site_config, "settings", None)
        except Exception:  # unreadable now: the start already read it, and its own check reports this
            return
        agent_warnings = getattr(settings, "agent_warnings", None)
        for line in agent_warnings() if callable(agent_warnings) else ():
            logger.warning("%s", line)

    def _log_broken_hook_plugins(self) -> None:
        """One WARNING per installed hook plugin that could not be loaded (an import error, a name
        taken): its hooks do not run in this agent (nor in what it renders: the job template's
        context), which only `balsam plugins ls` showed."""
        try:
            records = get_plugin_manager().records(resolve=False)
        except Exception as exc:
            logger.error("cannot list the installed plugins: %s: %s", type(exc).__name__, exc)
            return
        for record in records:
            if record.kind == HOOK_KIND and record.status in (FAILED, CONFLICT):
                where = f"{record.distribution} {record.version}".strip() or record.source
                logger.warning("plugin %s (%s, %s): not loaded (%s): %s; its hooks do not run in this agent "
                               "(`balsam plugins ls`)", record.name, where, record.target, record.status, record.error)

    def _settings_file(self) -> Path:
        return Path(getattr(self.site_config, "settings_path", self.site_path / "settings.yml"))

    def _settings_file_stamp(self) -> Optional[tuple[int, int, int]]:
        try:
            stat = os.stat(self._settings_file())
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _settings_file_text(self) -> Optional[bytes]:
        try:
            return self._settings_file().read_bytes()
        except OSError:
            return None

    def check_settings_file(self) -> Optional[str]:
        """Log (and return) one WARNING when settings.yml changed since it was last looked at and
        differs from the text the agent started with: the running agent keeps the settings it
        started with, and a file that no longer loads would stop its next start (after a reboot,
        weeks later). Each change is reported once; the file is read only when its stamp moved."""
        stamp = self._settings_file_stamp()
        if stamp == self._settings_stamp:
            return None
        self._settings_stamp = stamp
        text = self._settings_file_text()
        if text is not None and text == self._settings_text:
            return None  # touched, or an edit undone: what the agent runs with
        path = self._settings_file()
        if text is None:
            state = "it cannot be read now: the agent would not start again"
        else:
            try:
                load_settings(path, log_warnings=False)
                state = "`balsam site sync` checks it, pushes it to the site record and restarts the agent"
            except Exception as exc:
                state = f"as it is now the agent would not start again: {exc} (`balsam site check-settings`)"
        message = (f"{path} changed since the agent started; the running agent keeps the settings it started "
                   f"with; {state}")
        logger.warning("%s", message)
        return message

    def _site_marker_identity(self) -> Optional[int]:
        """The site marker's inode; None when it is not there; ``-1`` when the file system did not
        answer (EIO, ESTALE, a timeout: not taken for a move). The inode only: an NFS automount
        mounted again gets another st_dev for the same directory."""
        try:
            return os.stat(self.site_path / SITE_MARKER).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return -1

    def check_site_directory(self) -> Optional[str]:
        """The reason to stop (logged, ERROR) when the site directory is no longer at the path the
        agent started with: moved (`mv`) or removed while it ran, or another directory put in its
        place. Every path the agent and its modules use is absolute under it: the processing
        module made the old path's directories again for each job it preprocessed (workdirs no
        launcher of the moved site reads) and the other modules failed every cycle on the missing
        site marker, with nothing in the log to say why."""
        if self._site_marker_id in (None, -1):
            return None
        now = self._site_marker_identity()
        if now in (self._site_marker_id, -1):
            self._site_moved_seen = False
            return None
        if not self._site_moved_seen:
            # Seen twice in a row (a second apart) before the agent stops on it.
            self._site_moved_seen = True
            return None
        what = "moved or removed" if now is None else "replaced by another directory"
        message = (f"the site directory {self.site_path} was {what} while the agent ran: stopping (its paths are "
                   f"absolute under it); move it back, stop the agent and move it with `balsam site mv` (which also "
                   f"updates the site's path in the API), or start the agent where it is now (`balsam site start PATH`)")
        logger.error("%s", message)
        return message

    def _record_names_this_directory(self, record: Any) -> bool:
        """Whether the site record ``record`` (a server's answer) names this agent's directory; noted."""
        from .site_ops import recorded_elsewhere  # site_ops imports this module

        if not isinstance(record, dict) or not record.get("path") or recorded_elsewhere(self.site_path, record):
            return False
        self._site_record_ours = True
        return True

    def _on_credential_refused(self, error: Any) -> None:
        if getattr(error, "url", "").startswith(str(getattr(self.client, "api_root", "\0"))):
            self.credential_refused = str(getattr(error, "detail", error))

    def site_deleted(self) -> bool:
        """True when the server answers 404 for this agent's site record. Any other outcome (the
        record is there, the API is unreachable, another error) is False: only a definite answer
        stops the agent."""
        site_id = getattr(self.site_config, "site_id", None)
        if site_id is None or not hasattr(self.client, "get"):
            return False
        try:
            if hasattr(self.client, "put"):
                # An empty update refreshes the record's last_refresh: the sign of life `balsam site
                # start/stop --force` reads for a pid file of another host, with or without a scheduler
                # module (which refreshes it every sync_period).
                record = self.client.put(f"/sites/{site_id}", json={})
            else:
                record = self.client.get(f"/sites/{site_id}")
        except Exception as exc:
            return getattr(exc, "status_code", None) == 404
        self._site_record = record if isinstance(record, dict) else None
        return False

    def check_site_taken(self) -> Optional[str]:
        """The reason to stop (logged, ERROR) when the site record, as :meth:`site_deleted` last read
        it, names another directory of this site: an agent was started there with `balsam site start
        --force` while this one looked dead (another host's agent silent for minutes: its login node
        cut off, not gone). Both ran on, each staging files and running the site's jobs in its own
        data/, and this one never knew. Only once a record read since the start named this directory
        (a copy's agent started while the API was down never claimed the record: nothing was taken)."""
        from .site_ops import recorded_elsewhere, site_id_in  # site_ops imports this module

        record, self._site_record = self._site_record, None
        if record is None or self._record_names_this_directory(record):
            return None
        other = recorded_elsewhere(self.site_path, record)
        site_id = getattr(self.site_config, "site_id", None)
        if not self._site_record_ours or other is None or site_id is None or site_id_in(other) != site_id:
            return None
        message = (f"site {site_id}'s record now names {other}, another directory of this site (an agent started "
                   f"there with `balsam site start --force` while this one looked dead?): stopping, as two agents "
                   f"of one site would each run its jobs in their own data/; to run the site in {self.site_path} "
                   f"again, stop the agent of {other}, then `balsam site start {self.site_path}`")
        logger.error("%s", message)
        return message

    def wait(self, timeout: Optional[float] = None) -> None:
        self._wait_thread_name = threading.current_thread().name
        deadline_token = self._token_deadline()
        checked = site_checked = settings_checked = site_dir_checked = time.monotonic()
        deadline = None if timeout is None else time.monotonic() + timeout
        last_note = time.monotonic()
        while not self.stop_event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if time.monotonic() - checked >= LOGIN_CHECK_SEC:
                deadline_token, checked = self._token_deadline(), time.monotonic()
            if time.monotonic() - settings_checked >= SETTINGS_CHECK_SEC:
                settings_checked = time.monotonic()
                self.check_settings_file()
            if deadline_token is not None and time.time() >= deadline_token:
                deadline_token = self._token_deadline()  # one last look: a new login since?
                if deadline_token is not None and time.time() >= deadline_token:
                    logger.warning("the login token expires soon and there is no refresh credential: stopping "
                                   "(run `balsam login`, then `balsam site start`)")
                    self.request_stop("token-expiry")
                    break
            if time.monotonic() - site_dir_checked >= SITE_DIR_CHECK_SEC:
                site_dir_checked = time.monotonic()
                if self.check_site_directory() is not None:
                    self.request_stop("site-moved")
                    break
            if self.credential_refused:
                logger.error("the server refused the agent's credential (%s): stopping (run `balsam login`, then "
                             "`balsam site start`)", self.credential_refused)
                self.request_stop("credential-refused")
                break
            if self._site_check_due or time.monotonic() - site_checked >= SITE_CHECK_SEC:
                self._site_check_due, site_checked = False, time.monotonic()
                if self.site_deleted():
                    logger.error("site %s (%s) is no longer on the server %s (deleted, or the server's database was "
                                 "reset?): stopping; create a new site with `balsam site init NEW_DIR`",
                                 self.site_config.site_id, self.site_path, getattr(self.client, "api_root", ""))
                    self.request_stop("site-deleted")
                    break
                if self.check_site_taken() is not None:
                    self.request_stop("site-taken")
                    break
            self.stop_event.wait(1.0)
            self._check_threads()
            self._retry_settings_push()
            if time.monotonic() - last_note > ALIVE_NOTE_SEC:
                last_note = time.monotonic()
                hung = self.hung_modules()
                logger.info("agent alive: cycles %s, errors %s%s", self.cycles, self.errors,
                            ", hung: " + ", ".join(f"{n} (cycle running for {s:.0f} s)" for n, (s, _) in hung.items())
                            if hung else "")

    def push_settings(self) -> bool:
        """Copy settings.yml's limits to the site record; on failure, retried after the next
        successful module cycle (a server down at start-up left the record stale until a restart)."""
        from .site_ops import push_site_settings

        try:
            self._record_names_this_directory(push_site_settings(self.client, self.site_config))
        except Exception as exc:
            if _settings_refused(exc):
                # The server refused the values themselves (a 422 naming the key): sending them again
                # cannot succeed, and "retried once the API answers" misled into waiting for it.
                logger.error("settings.yml error: the server refused its values for the site record (%s); the agent "
                             "runs on with the site record's previous settings: fix settings.yml (`balsam site "
                             "check-settings`), then run `balsam site sync`", exc)
                self.settings_push_pending = False
                return False
            if not self.settings_push_pending:
                logger.warning("could not push settings.yml to the API site record (retried once the API "
                               "answers): %s", exc)
            self.settings_push_pending = True
            self._cycles_at_push = sum(self.cycles.values())
            return False
        if self.settings_push_pending:
            logger.info("pushed settings.yml to the API site record")
        self.settings_push_pending = False
        return True

    def _retry_settings_push(self) -> None:
        if self.settings_push_pending and sum(self.cycles.values()) > self._cycles_at_push:
            self.push_settings()

    def hang_threshold(self, module: AgentModule) -> float:
        return max(HUNG_CYCLE_PERIODS * float(module.period), HUNG_CYCLE_MIN_SEC)

    def hung_modules(self) -> dict[str, tuple[float, float]]:
        """Module name -> (seconds its cycle in progress has run, its hang threshold), for cycles
        past their threshold."""
        now = time.monotonic()
        hung = {}
        for module in self.modules:
            started = self._cycle_started.get(module.name)
            limit = self.hang_threshold(module)
            if started is not None and now - started > limit:
                hung[module.name] = (now - started, limit)
        return hung

    def _check_threads(self) -> None:
        """Log once each module thread that ended while the agent runs (its work is no longer done),
        and once per cycle each module whose cycle hangs (with the thread's stack)."""
        if self.stop_event.is_set():
            return
        for thread in self.threads:
            if not thread.is_alive() and thread.name not in self._dead_threads:
                self._dead_threads.add(thread.name)
                logger.error("%s: the module's thread died; the agent runs on without it (restart the agent)",
                             thread.name)
        hung = self.hung_modules()
        if not hung:
            return
        frames = sys._current_frames()
        threads = {t.name: t for t in self.threads}
        for name, (seconds, limit) in hung.items():
            started = self._cycle_started.get(name)
            if started is None or self._hung_reported.get(name) == started:
                continue
            self._hung_reported[name] = started
            thread = threads.get(f"agent-{name}")
            frame = frames.get(thread.ident) if thread is not None and thread.ident is not None else None
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(stack unavailable)\n"
            logger.error("%s: a cycle has run for %.0f s (over %.0f s): the module looks hung and does no other "
                         "work meanwhile (restart the agent if it stays so); its thread is at:\n%s",
                         name, seconds, limit, stack.rstrip())

    def shutdown(self, reason: Optional[str] = None, join_timeout: Optional[float] = None) -> None:
        """Stop: the stopping hook, then up to ``join_timeout`` (default :attr:`stop_wait_sec`) for
        the module threads' cycles in progress, then each module's close() and the children left."""
        self.request_stop(reason or self.stop_reason)
        reason = self.stop_reason
        logger.info("stopping (%s)", reason)
        call_agent_hook("balsam_agent_stopping", site_config=self.site_config, reason=reason)
        deadline = time.monotonic() + (self.stop_wait_sec if join_timeout is None else join_timeout)
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s did not finish its cycle in time", thread.name)
        self._forget_listener()
        logging.getLogger(CLIENT_LOGGER).removeFilter(self._retry_filter)
        for module in self.modules:
            try:
                module.close()
            except Exception:
                logger.exception("%s: close() failed", module.name)
        killed = self._end_children() if self.end_children else []
        if killed:
            logger.warning("ended %d leftover child process(es) (e.g. a hung scheduler command): %s", len(killed), killed)
        logger.info("agent stopped")

    def _end_children(self) -> list[int]:
        """End the remaining child processes and what the scheduler commands among them left in
        their process groups (a hung command's child that left it: reparented, no descendant). The
        groups are read first: once a command is ended, its group is no one's descendant."""
        from .site_ops import agent_command_groups, end_own_command_groups

        commands = agent_command_groups(os.getpid())
        killed = kill_descendants()
        return killed + [pid for pid in end_own_command_groups(commands) if pid not in killed]

    def run(self, before_start: Optional[Callable[[], None]] = None) -> int:
        """Main entry: signals, pid file, modules until SIGTERM; returns the exit code.
        ``before_start`` runs once the lock is held and no other agent of this directory runs, before
        the pid file is written (`balsam site start` waits for it); what it raises ends the run."""
        # The handlers before the pid file: `balsam site stop` (or a test) signals the pid it reads
        # there at once, and a signal before them met the default action (SIGTERM ended the agent
        # with no shutdown, its pid file left; SIGHUP under nohup was ignored, the agent ran on).
        self._install_signal_handlers()
        try:
            if before_start is None:
                write_pid_file(self.site_path)
            else:
                write_pid_file(self.site_path, before_write=before_start)
        except BaseException:
            self._remove_signal_handlers()
            raise
        try:
            record_started_settings(self.site_path, self._settings_text, self.stop_wait_sec)
        except OSError as exc:
            # `balsam site status` then goes by settings.yml's mtime; `site stop` assumes the default
            # stop wait (its -t still sets its timeout), `site sync` restarts with its own environment's.
            logger.warning("cannot record settings.yml's digest and the stop wait in the pid file %s: %s",
                           pid_file_path(self.site_path), exc)
        try:
            self.start()
            self.wait()
            self.shutdown()
        except BaseException:
            logger.exception("the agent failed")
            self.shutdown("error")
            raise
        finally:
            # The pid file first: a SIGTERM between the two still reaches our handler (a stop
            # already under way), not the default one, which would end the process and leave
            # the pid file behind.
            remove_pid_file(self.site_path)
            self._remove_signal_handlers()
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m balsam.site", description="Run the Balsam site agent")
    parser.add_argument("site_path", nargs="?", help="site directory (default: $BALSAM_SITE_PATH or the cwd's site)")
    parser.add_argument("--log-to-stderr", action="store_true", help="also log to stderr")
    parser.add_argument("--force", action="store_true",
                        help="take the site for this directory even where the site record's directory (another copy "
                             "of the site) holds the pid file of an agent on another host that looks dead")
    args = parser.parse_args(argv)
    # Before any command runs: a SIGCHLD ignored by what started the agent (inherited across exec)
    # makes the kernel discard every scheduler command's exit status.
    reset_ignored_sigchld()
    from ..config import SiteConfig

    try:
        site_config = SiteConfig(args.site_path)
        site_config.settings  # read and check settings.yml now: a bad file is one line, not a traceback
    except Exception as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    os.environ["BALSAM_SITE_PATH"] = str(site_config.site_path)
    # Before any module starts: the batch jobs it submits (sbatch --export=ALL, qsub -V), their
    # launchers and the processing hooks, which run here, never hold them (balsam.launcher.server_secrets).
    removed = drop_server_secrets()
    log_path = setup_logging(site_config, stream=args.log_to_stderr)
    logger.info("balsam site agent starting (pid %d on %s), log %s", os.getpid(), socket.gethostname(), log_path)
    if removed:
        logger.info("the server's secrets %s are not kept in the agent's environment, nor in what it starts",
                    ", ".join(removed))
    try:
        agent = Agent(site_config, end_children=True)
        from .site_ops import SiteError, claim_site_path  # site_ops imports this module

        def claim_and_push() -> None:
            # Once the lock is held and no agent of this directory runs: a start refused by them
            # (an agent of this directory runs, perhaps on another login node that mounts it
            # elsewhere) changed the site record's path first. Before the pid file, which
            # `balsam site start` waits for: it says "Started" only for an agent past its claim.
            # The claim before the push: the push refreshes the site record, whose last refresh
            # tells whether another host's agent lives.
            try:
                moved = claim_site_path(agent.client, Path(site_config.site_path), force=args.force)
            except SiteError as exc:
                raise AgentError(str(exc)) from None
            if moved:
                logger.warning("%s", moved)
            agent.push_settings()

        return agent.run(before_start=claim_and_push)
    except AgentError as exc:
        logger.error("%s", exc)
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
