"""Small helpers shared by user scripts and tools (libEnsemble's BalsamExecutor imports this).

``config_root_logger(level)`` sets the level of the ``balsam`` loggers and gives them one
console handler; the level defaults to ``$BALSAM_LOG_LEVEL`` (else WARNING).
``log_file_handler(path, log_settings)`` is the log file handler of the site agent and launchers.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import gc
import logging
import logging.handlers
import math
import os
import re
import signal
import threading
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, TypeVar, Union, overload

# Process identity lives in its own light module (the local scheduler's queue command, run every
# sync_period, imports it without this module's logging set-up); these names stay importable here.
from .process_identity import START_TIME_TOLERANCE_SEC, process_start_time, same_process, terminate_processes  # noqa: E402,F401

LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(process)d | %(levelname)s | %(name)s:%(lineno)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_NAME = "balsam-console"


def _level(level: Union[str, int, None]) -> int:
    if level is None:
        level = os.environ.get("BALSAM_LOG_LEVEL", "WARNING")
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return value


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large body becomes Python objects (a page of
    jobs in the client, a bulk create in the server).

    Each container made counts towards the next collection, and a collection walks every tracked
    object, the many just made included: parsing a 10,000-job page and wrapping it in Job objects
    triggered enough collections to double the time; a 5,000-job create in the server, whose heap
    is larger, met a full collection (50-90 ms) every few requests. Nothing made there is a cycle
    to collect. The collector is re-enabled on exit by the call that disabled it (threads that
    overlap leave it to the first one: it is never left disabled)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


#: Whether :func:`pause_gc_for_start_up` turned the collector off (only it may turn it back on).
_start_up_pause = {"on": False}


def pause_gc_for_start_up() -> None:
    """Turn the cyclic garbage collector off while a process imports its modules and reads its
    settings (``python -m balsam.launcher`` calls it first); :func:`resume_gc_after_start_up` turns
    it back on.

    A launcher's start-up is CPU spent importing (~0.2-0.3 s to its first job on a 2-CPU VM), and
    the collector ran ~15 collections during it (~15 ms, about 5 %), each walking the modules,
    classes and functions just made: objects that live as long as the process and hold no garbage.
    Does nothing when the collector is already off (someone else's choice)."""
    if gc.isenabled():
        gc.disable()
        _start_up_pause["on"] = True


def resume_gc_after_start_up() -> None:
    """Turn the collector back on if :func:`pause_gc_for_start_up` turned it off, first freezing
    the objects made so far (``gc.freeze``): later collections, the full ones of a launcher that
    runs for hours included, no longer walk the start-up's modules and classes. Idempotent."""
    if _start_up_pause["on"]:
        _start_up_pause["on"] = False
        gc.freeze()
        gc.enable()


#: Warnings given once per process (:func:`first_warning`), by key: the launcher's about a job's
#: environment, threads per core or launch params, which it gives for the first job of an app they
#: apply to and says apply to every such job (one per job was ~10^4 lines on a campaign). Bounded:
#: cleared when full (a repeated warning costs a line; an unbounded set, memory).
_warned: set[tuple] = set()
_WARNED_MOST = 1024


def first_warning(key: tuple) -> bool:
    """Whether the warning ``key`` is not given yet in this process (and now counts as given).
    Called only where a warning applies: nothing is added to a job that needs none."""
    if key in _warned:
        return False
    if len(_warned) >= _WARNED_MOST:
        _warned.clear()
    _warned.add(key)
    return True


class EnvNumberError(ValueError):
    """A numeric environment variable that is not a number Balsam takes (one line: name and value)."""


#: The longest text :func:`plain_decimal` reads: a setting is a few digits (an epoch time with
#: microseconds is 17 characters); 4,300 digits made int() raise its own ValueError, and 309 with a
#: point gave float() inf.
MAX_DECIMAL_CHARS = 64

#: The longest time in seconds a setting may give (ten years): the server adds a lifetime to now
#: (a key's expiry) or takes it from now (the session sweep's cutoff), and datetime overflows past
#: ~2,000 years back or ~8,000 ahead (an OverflowError in every such request); ten years is well
#: inside, and longer than anybody means.
MAX_SETTING_SEC = 10 * 365 * 24 * 3600

#: ``BALSAM_SESSION_EXPIRE_SEC``, which the server (its expiry of a launcher's Session) and the
#: launcher (how long it assumes its Session outlives a heartbeat) both read: one rule,
#: :func:`session_expire_from_env`.
SESSION_EXPIRE_ENV = "BALSAM_SESSION_EXPIRE_SEC"
#: Its shortest value: a shorter one expires a Session between two requests of a live launcher.
MIN_SESSION_EXPIRE_SEC = 0.1

#: What a bad number does: ``"raise"`` an :class:`EnvNumberError`, ``"warn"`` once and the default.
OnBad = Literal["warn", "raise"]
_ON_BAD = ("warn", "raise")

Number = TypeVar("Number", int, float)


#: The errors of a full or over-quota file system (EDQUOT where the platform has it): the site's
#: fault, not the job's, waited out where they are met (docs/reliability.md, "When the disk is full").
NO_ROOM_ERRNOS: frozenset[int] = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def plain_decimal(text: str, *, fraction: bool = False) -> "int | float | None":
    """``text`` (spaces around it ignored) as a plain decimal number, else None: ASCII digits, and
    with ``fraction`` one point among them (``30``, ``0.5``, ``.5``, ``5.``), at most
    :data:`MAX_DECIMAL_CHARS` characters. ``int()`` and ``float()`` also take ``1_000``, ``+5``,
    ``-5``, ``1e3``, ``nan``, ``inf`` and other scripts' digits (``'٣'``): spellings nobody means
    for a setting, or that made a setting nonsense (a heartbeat every 0.1 s, a margin of nan);
    none of them passes here."""
    text = text.strip()
    if len(text) > MAX_DECIMAL_CHARS:
        return None
    parts = text.split(".") if fraction else [text]
    if len(parts) > 2 or not any(parts) or not all(p == "" or (p.isascii() and p.isdecimal()) for p in parts):
        return None
    if not fraction:
        return int(text)
    value = float(text)
    return value if math.isfinite(value) else None


def plain_decimal_text(value: float) -> str:
    """``value`` (finite, not negative) as the fixed-point digits that :func:`plain_decimal` reads
    back to the same float (``0.00001``, ``10000000000000000``, ``30``), for a number Balsam writes
    into a child's environment: ``repr()`` wrote ``1e-05`` and ``1e+16``, which no reader takes,
    and ``%.6f`` rounds. ValueError for a value that has no such text (negative, nan or inf, or
    longer than :data:`MAX_DECIMAL_CHARS`: no setting is)."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} has no plain decimal text (a finite number from 0)")
    text = repr(value + 0.0)  # + 0.0: -0.0 is 0.0
    if "e" in text:  # repr()'s shortest digits that read back to value, with the point moved
        mantissa, exponent = text.split("e")
        whole, _, fraction = mantissa.partition(".")
        digits, point = whole + fraction, len(whole) + int(exponent)
        if point <= 0:
            text = "0." + "0" * -point + digits
        elif point >= len(digits):
            text = digits + "0" * (point - len(digits))
        else:
            text = f"{digits[:point]}.{digits[point:]}"
    text = text.removesuffix(".0")
    if len(text) > MAX_DECIMAL_CHARS:
        raise ValueError(f"{value!r} is longer than {MAX_DECIMAL_CHARS} digits in plain decimal text")
    return text


def _plain(number: "int | float") -> str:
    """A number as a user would type it back (``315360000``, ``0.5``: not ``3.1536e+08``)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def number_problem(where: str, raw: Any, *, fraction: bool, minimum: "int | float",
                   maximum: "int | float | None" = None, also: Optional[str] = None,
                   maximum_text: Optional[str] = None) -> str:
    """The one line that says ``raw`` (given as ``where``) is not a number a setting takes:
    ``<where>='<raw>' is not a number from <minimum> [to <maximum>] (<spelling>[, or <also>])``;
    ``maximum_text`` says what the maximum is where its number means nothing to a reader (a start
    time's: ``from 0, at most <maximum_text>``, not an epoch)."""
    if maximum_text is not None:
        bounds = f"from {_plain(minimum)}, at most {maximum_text}"
    else:
        bounds = f"from {_plain(minimum)}" + (f" to {_plain(maximum)}" if maximum is not None else "")
    kind = "digits with an optional decimal point, e.g. 30 or 0.5" if fraction else "digits only, e.g. 30"
    # A value thousands of digits long is quoted in part: the line stays one readable line.
    shown = repr(raw) if not isinstance(raw, str) or len(raw) <= MAX_DECIMAL_CHARS else \
        f"{raw[:MAX_DECIMAL_CHARS]!r}... ({len(raw)} characters)"
    return f"{where}={shown} is not a number {bounds} ({kind}{', or ' + also if also else ''})"


#: The environment warnings given in this process: variable name -> the value last warned about.
#: Bounded by the number of variables Balsam reads (unlike :func:`first_warning`'s set, which is
#: cleared when full, so a long launcher repeated them), and a changed value is warned about anew.
_env_warned: dict[str, str] = {}


def warn_env_once(name: str, raw: str, line: str, warn: Optional[Callable[[str], Any]] = None) -> None:
    """Give ``line`` about ``name=raw`` (``warn(line)``, else the ``balsam`` logger), once per
    process while the variable keeps that value."""
    if _env_warned.get(name) == raw:
        return
    _env_warned[name] = raw
    (warn or logging.getLogger("balsam").warning)(line)


@overload
def env_number(name: str, default: Number, *, fraction: bool = ..., minimum: "int | float" = ...,
               maximum: "int | float | None" = ..., on_bad: OnBad = ..., words: "Mapping[str, Number] | None" = ...,
               environ: "Mapping[str, str] | None" = ..., warn: "Callable[[str], Any] | None" = ...,
               instead: Optional[str] = ..., maximum_text: Optional[str] = ...) -> Number: ...


@overload
def env_number(name: str, default: None, *, fraction: Literal[False] = ..., minimum: "int | float" = ...,
               maximum: "int | float | None" = ..., on_bad: OnBad = ..., words: "Mapping[str, int] | None" = ...,
               environ: "Mapping[str, str] | None" = ..., warn: "Callable[[str], Any] | None" = ...,
               instead: Optional[str] = ..., maximum_text: Optional[str] = ...) -> Optional[int]: ...


@overload
def env_number(name: str, default: None, *, fraction: Literal[True], minimum: "int | float" = ...,
               maximum: "int | float | None" = ..., on_bad: OnBad = ..., words: "Mapping[str, float] | None" = ...,
               environ: "Mapping[str, str] | None" = ..., warn: "Callable[[str], Any] | None" = ...,
               instead: Optional[str] = ..., maximum_text: Optional[str] = ...) -> Optional[float]: ...


def env_number(name: str, default: "int | float | None", *, fraction: bool = False, minimum: "int | float" = 0,
               maximum: "int | float | None" = None, on_bad: OnBad = "warn", words: "Mapping[str, Any] | None" = None,
               environ: "Mapping[str, str] | None" = None, warn: "Callable[[str], Any] | None" = None,
               instead: Optional[str] = None, maximum_text: Optional[str] = None) -> Any:
    """The environment variable ``name`` (in ``environ``, else ``os.environ``) as a plain decimal
    number (:func:`plain_decimal`) from ``minimum`` to ``maximum``, a float with ``fraction``, else
    an int; ``words``: spellings with a meaning of their own (``{"-1": -1}``: no limit); ``default``
    when it is unset or blank.

    A value that is not one: with ``on_bad="raise"`` an :class:`EnvNumberError` (for what a command
    reads at its start: it stops with one line naming the variable and the value); with ``"warn"``
    the same line, once per process and value (:func:`warn_env_once`), and the default (for what a
    long-running agent, launcher or server reads: it keeps running on the default). The warning
    ends ``: using the default <default>``, or ``: <instead>`` where given: what happens instead
    (needed where the default is None, which is no value to name). ``maximum_text``: see
    :func:`number_problem`."""
    if on_bad not in _ON_BAD:
        raise TypeError(f"env_number: on_bad={on_bad!r} (expected 'warn' or 'raise')")
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return default
    if words and raw.strip().lower() in words:
        return words[raw.strip().lower()]
    value = plain_decimal(raw, fraction=fraction)
    if value is not None and value >= minimum and (maximum is None or value <= maximum):
        return value
    problem = number_problem(f"environment variable {name}", raw, fraction=fraction, minimum=minimum, maximum=maximum,
                             also=" or ".join(words) if words else None, maximum_text=maximum_text)
    if on_bad == "raise":
        raise EnvNumberError(problem)
    if instead is None:  # None is no default to name: the variable is then read as unset
        instead = "taken as unset" if default is None else f"using the default {_plain(default)}"
    warn_env_once(name, raw, f"{problem}: {instead}", warn)
    return default


def session_expire_from_env(default: "float | None", *, on_bad: OnBad,
                            warn: "Callable[[str], Any] | None" = None,
                            instead: Optional[str] = None) -> "float | None":
    """``$BALSAM_SESSION_EXPIRE_SEC``: seconds (a fraction allowed) from
    :data:`MIN_SESSION_EXPIRE_SEC` to :data:`MAX_SETTING_SEC`, the same rule for the server that
    expires Sessions and the launchers that heartbeat them (``instead``: see :func:`env_number`)."""
    return env_number(SESSION_EXPIRE_ENV, default, fraction=True, minimum=MIN_SESSION_EXPIRE_SEC,
                      maximum=MAX_SETTING_SEC, on_bad=on_bad, warn=warn, instead=instead)


#: The BatchJob a launcher runs in (the job template exports it).
BATCH_JOB_ID_ENV = "BALSAM_BATCH_JOB_ID"


def batch_job_id_from_env(environ: "Mapping[str, str]") -> Optional[int]:
    """``$BALSAM_BATCH_JOB_ID`` in ``environ`` as a BatchJob id (plain digits), else None: another
    value (``-5``, ``1_000``: int() took them and picked some BatchJob) is warned about once and
    ignored, and the launcher looks its BatchJob up by the scheduler's id. One rule for the
    launcher's start, its early Session and :func:`balsam.launcher.service_calls.find_batch_job_id`."""
    return env_number(BATCH_JOB_ID_ENV, None, environ=environ, warn=logging.getLogger("balsam.launcher").warning,
                      instead="looking the BatchJob up by the scheduler's id")


def to_tuple(value: Any) -> tuple:
    """``tuple(value)``, as an attrs converter (``attrs.field(converter=to_tuple)``): a Python function
    rather than ``tuple`` itself, since attrs reads each converter's signature when the class is
    made, and a builtin's is parsed from its text signature (the tokenizer's patterns compiled on
    first use: ~2 ms of the start-up of every process that defines such a class: launcher, agent,
    CLI). The one converter of the kind (balsam.platform, balsam.scheduler)."""
    return tuple(value)


def config_root_logger(level: Union[str, int, None] = None, format: str = LOG_FORMAT) -> logging.Logger:
    """Log ``balsam.*`` messages at ``level`` and above to stderr; returns the ``balsam`` logger.

    Calling it again only changes the level (no duplicate handlers).
    """
    logger = logging.getLogger("balsam")
    logger.setLevel(_level(level))
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(format, datefmt=DATE_FORMAT))
    return logger


def config_file_logging(filename: Union[str, os.PathLike], level: Union[str, int, None] = None,
                        format: str = LOG_FORMAT) -> logging.Handler:
    """Also write ``balsam.*`` messages to ``filename``; returns the handler."""
    logger = logging.getLogger("balsam")
    handler = logging.FileHandler(filename)
    handler.setFormatter(logging.Formatter(format, datefmt=DATE_FORMAT))
    handler.setLevel(_level(level))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > handler.level:
        logger.setLevel(handler.level)
    return handler


class PeriodicMemoryHandler(logging.handlers.MemoryHandler):
    """Holds up to ``capacity`` records in memory and writes them to ``target`` when full, at once
    for a WARNING or worse, every ``flush_period`` seconds (a daemon thread) and when closed
    (``logging.shutdown`` at a normal exit closes it before its target)."""

    def __init__(self, target: logging.Handler, capacity: int, flush_period: float) -> None:
        super().__init__(capacity, flushLevel=logging.WARNING, target=target, flushOnClose=True)
        self._closing = threading.Event()
        self._timer = threading.Thread(target=self._flush_periodically, args=(float(flush_period),),
                                       name="balsam-log-flush", daemon=True)
        self._timer.start()

    def _flush_periodically(self, period: float) -> None:
        while not self._closing.wait(period):
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        # Render the message and traceback now, on a copy (other handlers see the record as
        # logged): the arguments may change, and the traceback holds frames alive, until the flush.
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            if not record.exc_text:
                formatter = (self.target.formatter if self.target is not None else None) or logging.Formatter()
                record.exc_text = formatter.formatException(record.exc_info)
            record.exc_info = None
        super().emit(record)

    def close(self) -> None:
        self._closing.set()
        target = self.target
        super().close()  # flushes, then lets go of the target
        if target is not None:
            target.close()


def log_file_handler(path: Union[str, os.PathLike], log_settings: Any) -> logging.Handler:
    """The handler of a site process's log file (agent, launcher, serial-mode ranks), as settings.yml
    ``logging:`` says: ``format``/``datefmt``, and buffering of ``buffer_num_records`` records
    flushed at least every ``flush_period`` seconds (either at most 1, resp. 0: unbuffered)."""
    # backslashreplace: a record holding text that is not valid UTF-8 (surrogate escapes of a job's
    # non-UTF-8 arguments) raised UnicodeEncodeError in emit, and the line was lost.
    file_handler = logging.FileHandler(path, errors="backslashreplace")
    file_handler.setFormatter(logging.Formatter(log_settings.format, log_settings.datefmt))
    capacity, period = int(log_settings.buffer_num_records), float(log_settings.flush_period)
    if capacity <= 1 or period <= 0:
        return file_handler
    return PeriodicMemoryHandler(file_handler, capacity, period)


def threads_cpu_seconds() -> list[tuple[str, int, float]]:
    """CPU seconds (user + system) of this process's live Python threads, added up by thread name:
    ``[(name, threads, seconds)]``, busiest first; ``[]`` without ``/proc`` (not Linux).

    A launcher reads it once, as it stops, so that its log says which of its threads (the main
    loop, the prefetcher, the spawner readers, the status updater...) its CPU went to: on a node
    where balsam's own work per job bounds the throughput, that is where to look first."""
    tick = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, list[Any]] = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
            seconds = (int(fields[11]) + int(fields[12])) / tick  # utime and stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile, or no /proc here
        entry = by_name.setdefault(thread.name, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    return sorted(((name, n, sec) for name, (n, sec) in by_name.items()), key=lambda row: (-row[2], row[0]))


def format_threads_cpu(rows: list[tuple[str, int, float]]) -> str:
    """``MainThread 0.67 s, prefetch 0.22 s, spawner-reader x2 0.13 s`` (or "not read")."""
    if not rows:
        return "not read"
    return ", ".join(f"{name}{f' x{n}' if n > 1 else ''} {sec:.2f} s" for name, n, sec in rows)


#: A job's output file in its workdir (the task's stdout and stderr).
JOB_OUTPUT_NAME = "job.out"


def create_job_output(workdir: "str | os.PathLike[str]") -> None:
    """Make sure ``workdir/job.out`` exists (created empty if new, left as it is if there), making
    the workdir too if it is missing.

    Called twice on a job's way: by the processing module's preprocess on the agent's node, ahead
    of the allocation, and by the launcher as it prepares the job, where the usual case is then one
    ``open`` of an existing file. Creating a file is a metadata operation: a round trip to the
    metadata server on a parallel file system, and 0.03-0.7 ms of kernel CPU on this VM's ext4
    (up to ten times the usual for minutes after many files were deleted). In the allocation it
    came out of the launcher's CPU per job; made ahead, it costs the allocation nothing.
    """
    path = os.path.join(workdir, JOB_OUTPUT_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.close(fd)


#: Characters of one line of an error tail kept (the rest is counted): a job may print one 64 KB line.
MAX_TAIL_LINE_CHARS = 1024


def clip(text: str, limit: int = 1024) -> str:
    """``text``, or its first ``limit`` characters and ``... (N more characters)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def tail_file(path: "str | os.PathLike", num_lines: int, max_bytes: int = 64 * 1024) -> str:
    """The last ``num_lines`` lines of a file ('' if missing), each clipped to
    :data:`MAX_TAIL_LINE_CHARS`; reads at most ``max_bytes`` from its end."""
    if num_lines <= 0:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()[-num_lines:]
    if len(data) > MAX_TAIL_LINE_CHARS:  # else no line can be longer
        lines = [clip(line, MAX_TAIL_LINE_CHARS) for line in lines]
    # The tail goes into a RUN_ERROR's state_data: without api_text, a NUL in the job's last lines
    # (binary output) made the server refuse the update, and the job stayed RUNNING.
    return api_text("\n".join(lines))


def api_text(text: str) -> str:
    """``text`` with what the API refuses replaced by U+FFFD: NUL (PostgreSQL text cannot store it,
    so the server answers 422, :func:`balsam.server.http.reject_nul`) and lone surrogates (not
    UTF-8: a request body holding one cannot be encoded, nor parsed by the server). The launchers
    put job output and error messages into ``state_data`` through this, so that a job's final state
    is never refused for its text. Every other character (other control characters included) is
    accepted as it is. Costs a scan of ``text`` when there is nothing to replace."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (surrogate escapes of undecodable bytes, say)
            text = _SURROGATE.sub("\ufffd", text)
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


class SigHandler:
    """An event set by SIGINT/SIGTERM, for loops that should stop cleanly (``while not sig.is_set()``)."""

    def __init__(self, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.exit = threading.Event()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[Any]) -> None:
        self.exit.set()

    def is_set(self) -> bool:
        return self.exit.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.exit.wait(timeout)

    def set(self) -> None:
        self.exit.set()

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def try_exclusive_flock(path: "str | os.PathLike[str]") -> Optional[int]:
    """Open ``path`` (0600) and take its exclusive flock without waiting: the descriptor (held until
    closed, and by the children that inherit it), or None when another process holds the lock. Any
    other failure (a file system without flock) is the OSError, for the caller to judge."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd
