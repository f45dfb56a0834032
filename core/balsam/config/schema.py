"""The schema of the core settings.yml sections: one attrs class per section, every field with a
default and a help text.

The help text (``metadata["help"]``) becomes the comment above the key in
``balsam site sample-settings``. Core sections are ``logging``, ``filter_tags`` and ``launcher``;
every other section belongs to an agent module and its schema is the module's ``options_schema``,
declared next to the module (e.g. ``balsam.site.modules.scheduler.SchedulerSettings``), exactly as
a third-party module declares its own (see :mod:`balsam.config.sections`).

Field types are plain Python annotations (``int``, ``str``, ``Optional[bool]``,
``dict[str, AllowedQueue]`` ...); the loader checks values against them and reports the YAML line.
An optional ``validate(self)`` method returns ``{field: problem}`` for checks across fields.
"""

import logging
import time
from typing import Any, Optional

import attrs

# The API's record of a queue's limits is also the settings.yml schema of one allowed queue.
from balsam.models import AllowedQueue
from balsam.serialization import show

__all__ = ["AllowedQueue", "LauncherSettings", "LoggingSettings", "setting"]



def setting(default: Any = attrs.NOTHING, help: str = "", *, factory: Any = None) -> Any:
    """An attrs field with a help text (``factory`` for mutable defaults)."""
    if factory is not None:
        return attrs.field(factory=factory, metadata={"help": help})
    return attrs.field(default=default, metadata={"help": help})


#: The most log records ``logging.buffer_num_records`` may hold in memory: each process that logs to a
#: file (the agent, each launcher, each serial-mode rank) holds that many rendered records, ~1-2 KB
#: each (about 150 MB at this bound). Unbounded, a count the buffer never reached (1e23 passed) left
#: only ``flush_period`` (up to a year) to write the records: a process's log stayed in its memory,
#: and a SIGKILL lost all of it.
MAX_LOG_BUFFER_RECORDS = 100_000

#: The most days ``logging.retention_days`` may say (100 years); 0 or null keeps files for ever.
MAX_RETENTION_DAYS = 36_500

DEFAULT_LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(process)d | %(levelname)s | %(name)s:%(lineno)s] %(message)s"


@attrs.define
class LoggingSettings:
    level: str = setting("INFO", "Log level of the site agent and launchers: DEBUG, INFO, WARNING or ERROR.")
    format: str = setting(DEFAULT_LOG_FORMAT, "Python logging format of each log line.")
    datefmt: str = setting("%Y-%m-%d %H:%M:%S", "strftime format of the time stamp in log lines.")
    buffer_num_records: int = setting(
        1024, "Log records held in memory before they are written; a WARNING or worse is written at once with "
        "those before it. 0 or 1: every record is written at once; at most 100000."
    )
    flush_period: int = setting(
        30, "Held log records are written at least this often (seconds); 0: every record is written at once. "
        "A process killed with SIGKILL loses what it holds."
    )
    retention_days: Optional[int] = setting(
        30, "Once an hour the scheduler module removes the site's files not changed for this many days: agent logs "
        "(log/agent_*.log) but the running agent's, launcher logs (log/*_mode_*) but running launchers', and the batch "
        "scripts and outputs "
        "(qsubmit/qlaunch*) of BatchJobs no longer pending, queued or running. 0 or null: keep them for ever."
    )

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            problems["level"] = f"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {show(self.level)}"
        # A format naming an unknown field ('%(nosuch)s') was accepted, then every record failed to
        # format: an empty log and "--- Logging error ---" for each record on the agent's stderr.
        problem = _log_format_problem(self.format, self.datefmt)
        if problem:
            problems[problem[0]] = problem[1]
        # 0 is accepted as well as 1 for unbuffered: a buffer of 0 or 1 record holds nothing back.
        for name in ("buffer_num_records", "flush_period"):
            if getattr(self, name) < 0:
                problems[name] = f"must not be negative, got {getattr(self, name)!r}"
        # Bounded: days past what a float holds (a 400-digit YAML int) would raise OverflowError in the
        # scheduler module's hourly sweep, and a century is "for ever" for a site's logs anyway.
        if self.retention_days is not None and self.retention_days < 0:
            problems["retention_days"] = (f"must not be negative (0 or null: keep for ever), "
                                          f"got {self.retention_days!r}")
        elif self.retention_days is not None and self.retention_days > MAX_RETENTION_DAYS:
            problems["retention_days"] = (f"must be at most {MAX_RETENTION_DAYS} (100 years; 0 or null: keep for "
                                          f"ever), got {show(self.retention_days)}")
        if self.buffer_num_records > MAX_LOG_BUFFER_RECORDS:
            problems["buffer_num_records"] = (f"must be at most {MAX_LOG_BUFFER_RECORDS} (records held in memory by "
                                              f"each process), got {show(self.buffer_num_records)}")
        return problems


def _log_format_problem(fmt: str, datefmt: str) -> Optional[tuple[str, str]]:
    """(key, problem) when a log record cannot be written with this format and date format."""
    record = logging.makeLogRecord({"name": "balsam.check", "levelname": "INFO", "levelno": logging.INFO,
                                    "msg": "settings check", "lineno": 1})
    try:
        time.strftime(datefmt)
    except (ValueError, TypeError) as exc:
        return "datefmt", f"not a strftime format ({exc}): {datefmt!r}"
    try:
        logging.Formatter(fmt, datefmt).format(record)
    except (ValueError, TypeError, KeyError) as exc:
        detail = f"unknown field {exc}" if isinstance(exc, KeyError) else str(exc)
        return "format", f"cannot format a log record ({detail}): {fmt!r}"
    return None


@attrs.define
class LauncherSettings:
    platform: str = setting(
        "default", "Platform plugin describing this machine's nodes and MPI launcher (see `balsam plugins ls`)."
    )
    platform_options: Any = setting(
        help="Options of the platform plugin named above (its options schema; `balsam plugins show NAME`).",
        factory=dict,
    )
    idle_ttl_sec: int = setting(60, "A launcher with nothing to run for this many seconds exits (0 or more).")
    delay_sec: int = setting(1, "Seconds between two launcher cycles (at least 1).")
    error_tail_num_lines: int = setting(10, "Lines of a failed job's output kept in its error event (0 or more).")
    max_concurrent_mpiruns: int = setting(1000, "Most MPI runs one mpi-mode launcher starts at the same time.")
    mpi_drain_for_large_jobs_sec: Optional[float] = setting(
        30.0, "mpi mode only: once the oldest leased job that does not fit the free nodes (a multi-node job while "
        "smaller ones keep the nodes busy) has waited this many seconds, the launcher starts no other job until "
        "enough nodes have drained for it; before that, smaller jobs fill the free nodes. 0: drain at once; null "
        "or a negative number: never drain (smaller jobs always start first, and a large job may wait for the "
        "whole allocation)."
    )
    mpirun_allows_node_packing: Optional[bool] = setting(
        None, "Whether several MPI runs may share a node; null uses the platform's default."
    )
    serial_mode_prefetch_per_rank: int = setting(
        64, "Bound of one lease of free room by a serial-mode launcher, per CPU of its partition (in all at least 64, "
        "at most 2,048). A launcher leases only what its free slots can start now, in chunks of at most this, plus "
        "a short lookahead (half a second of work at the rate its jobs end, at least 8 jobs); with its partition full it "
        "holds only the lookahead, so the rest stays visible to the elastic queue and to other BatchJobs."
    )
    sort_by: Optional[str] = setting(
        None, "mpi mode only: the order in which its launcher leases runnable jobs (and packs them onto free nodes). "
        "null: fewest nodes first, then most jobs per node (node_packing_count), then longest wall time, then id; "
        "long_large_first: longest wall time first, then most nodes, then most jobs per node, then id. Serial mode "
        "ignores it (it leases by id, which keeps its lease fast with millions of jobs) and logs a warning when set."
    )
    serial_mode_startup_params: dict[str, str] = setting(
        help="Extra MPI launch parameters for starting serial-mode workers.", factory=lambda: {"cpu_affinity": "none"}
    )
    default_postprocess_in_launcher: bool = setting(
        True, "A job whose app keeps the default postprocess (not a run() app) goes RUN_DONE -> POSTPROCESSED "
        "in the launcher's own update; false leaves it to the processing module, as Balsam 0.7 did."
    )

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.sort_by not in (None, "long_large_first"):
            problems["sort_by"] = f"expected null or 'long_large_first', got {self.sort_by!r}"
        if self.max_concurrent_mpiruns < 1:
            problems["max_concurrent_mpiruns"] = "must be at least 1"
        elif self.max_concurrent_mpiruns > 2**31 - 1:  # a 32-bit count, as the API's; 1e22 passed
            problems["max_concurrent_mpiruns"] = f"must be at most {2**31 - 1}, got {self.max_concurrent_mpiruns!r}"
        # Below 1 it was silently raised to the floor (the launcher's lease bound is at least 64).
        if self.serial_mode_prefetch_per_rank < 1:
            problems["serial_mode_prefetch_per_rank"] = (
                f"must be at least 1, got {self.serial_mode_prefetch_per_rank!r}")
        # A negative delay reaches a wait timeout (ValueError in the mpi-mode loop); 0 makes an idle
        # launcher ask the API for jobs without pause.
        if self.delay_sec < 1:
            problems["delay_sec"] = f"must be at least 1, got {self.delay_sec!r}"
        for name in ("idle_ttl_sec", "error_tail_num_lines"):
            if getattr(self, name) < 0:
                problems[name] = f"must not be negative, got {getattr(self, name)!r}"
        return problems

    def warnings(self) -> dict[str, str]:
        # serial_mode_startup_params go to the serial workers' MPI launcher as they are: a value it
        # does not take failed every serial-mode start. A warning, not an error: what a launcher
        # takes is the platform's to say (balsam.platform.serial_startup_param_warnings).
        # Imported here, as settings.py imports the plugin manager: loading it (stevedore, the plugins'
        # hook modules) is for a file being checked, not for every import of the schema.
        from balsam.platform import serial_startup_param_warnings
        from balsam.plugins.manager import get_plugin_manager

        try:
            platform = get_plugin_manager().load_driver("platform", self.platform)
        except Exception:  # an unknown platform is already the loader's error
            return {}
        found = serial_startup_param_warnings(platform, self.serial_mode_startup_params or {})
        return {f"serial_mode_startup_params.{key}": text for key, text in found.items()}
