"""``balsam launcher`` / ``python -m balsam.launcher``: the pilot job started by the job template.

It finds the site (``$BALSAM_SITE_PATH``), the platform driver named in ``settings.launcher.platform``,
the allocation's nodes (``platform.discover_nodes``) and the BatchJob (``$BALSAM_BATCH_JOB_ID``, else
by scheduler id), splits the nodes into partitions (``--part MODE:NODES[:K=V...]``; by default one
partition of all nodes in ``-j MODE``) and runs each partition's job mode: in this process for a
single partition, else one child process per partition. SIGTERM/SIGINT end running jobs as
RUN_TIMEOUT and exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs

from balsam.models import MAX_TAG_FILTERS
from balsam.platform import NodeInfo
from balsam.util import (EnvNumberError, batch_job_id_from_env, env_number, log_file_handler, plain_decimal_text,
                         resume_gc_after_start_up)

from .batch_job_notes import flush_notes
from .server_secrets import drop_server_secrets

logger = logging.getLogger("balsam.launcher")

START_TIME_ENV = "BALSAM_LAUNCHER_START_TIME"
#: How far past now ``$BALSAM_LAUNCHER_START_TIME`` may lie (clock differences between hosts).
MAX_START_AHEAD_SEC = 24 * 3600
NODES_ENV = "BALSAM_LAUNCHER_NODELIST"
#: How many mpi-mode partitions share the batch job (they split the platform's launch limit).
MPI_PARTITIONS_ENV = "BALSAM_LAUNCHER_MPI_PARTITIONS"


def start_time_text(start_time: float) -> str:
    """``start_time`` as ``$BALSAM_LAUNCHER_START_TIME`` for a partition's launcher: fixed-point
    digits, which every launcher reads back to the same float (repr() wrote 1e-05 and 1e+16, which
    none took)."""
    return plain_decimal_text(start_time)


#: The longest ``-t`` taken (ten years): no allocation lasts longer, and beyond about 292 years the
#: launcher's waits overflow (``threading.TIMEOUT_MAX``) and its acquire's whole minutes left leave
#: the API's 64-bit integers.
MAX_WALL_TIME_MIN = 10 * 366 * 24 * 60


class LauncherError(Exception):
    """A launcher start-up problem; ``str()`` is the one line shown to the user."""


@attrs.frozen
class Partition:
    job_mode: str
    num_nodes: int
    filter_tags: dict[str, str] = attrs.field(factory=dict)


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise LauncherError(f"bad tag {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def parse_partition(text: str) -> Partition:
    """``MODE:NODES[:K=V[:K=V...]]`` (Balsam 0.7 syntax, e.g. ``mpi:2:role=leader``)."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0]:
        raise LauncherError(f"bad partition {text!r}: expected MODE:NODES[:KEY=VALUE...]")
    try:
        num_nodes = int(parts[1])
    except ValueError:
        raise LauncherError(f"bad partition {text!r}: node count {parts[1]!r} is not an integer") from None
    if num_nodes < 1:
        raise LauncherError(f"bad partition {text!r}: needs at least 1 node")
    tags = dict(parse_tag(t) for t in parts[2:] if t)
    return Partition(parts[0], num_nodes, tags)


def check_filter_tag_count(settings_tags: dict[str, str], cli_tags: dict[str, str],
                           partitions: Sequence[Partition]) -> None:
    """Each partition's acquires send the settings' ``filter_tags``, the ``--tag`` ones (the
    BatchJob's ``filter_tags``, from its job script) and its ``--part`` tags, merged: the API
    refuses an acquire with more than :data:`MAX_TAG_FILTERS` (422). Unchecked, the launcher
    retried that refused acquire for its whole allocation and ran nothing; it stops here at start."""
    for index, partition in enumerate(partitions):
        merged = {**settings_tags, **cli_tags, **partition.filter_tags}
        if len(merged) > MAX_TAG_FILTERS:
            where = f"settings.yml filter_tags: {len(settings_tags)}, --tag (the BatchJob's filter_tags): {len(cli_tags)}"
            if partition.filter_tags:
                where += f", --part {index}'s tags: {len(partition.filter_tags)}"
            raise LauncherError(f"{len(merged)} filter tags ({where}; keys counted once): an acquire takes at most "
                                f"{MAX_TAG_FILTERS}")


def split_nodes(nodes: Sequence[NodeInfo], partitions: Sequence[Partition]) -> list[list[NodeInfo]]:
    """Contiguous node ranges, one per partition."""
    total = sum(p.num_nodes for p in partitions)
    if total > len(nodes):
        raise LauncherError(f"partitions ask for {total} nodes but the allocation has {len(nodes)}")
    out, start = [], 0
    for p in partitions:
        out.append(list(nodes[start : start + p.num_nodes]))
        start += p.num_nodes
    return out


class ConsoleHandler(logging.StreamHandler):
    """stderr, with what its encoding cannot write backslash-escaped: a record quoting a job's
    non-UTF-8 argument (surrogate escapes) raised UnicodeEncodeError in emit on a stream whose
    error handler is strict, printed a traceback and lost the line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.isascii():
            return text
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        try:
            text.encode(encoding)
            return text
        except UnicodeEncodeError:
            pass
        except LookupError:
            encoding = "utf-8"
        return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


class HeldRecords(logging.Handler):
    """Holds the ``balsam`` loggers' records of the launcher's start-up, before its log file is opened
    (:func:`configure_logging` needs the partition): what the platforms log during the node
    discovery (``CUDA_VISIBLE_DEVICES``, a shared allocation's cores) and, with ``echo``, the whole
    start-up's (the client's connect wait: a server not up yet is waited for while the settings are
    read, and the log file never said so). :meth:`replay` hands them to the configured handlers;
    without any (an error before), only those of WARNING and above, to stderr.

    ``echo``: a record of WARNING and above also goes to stderr at once, where it went before it
    was held (``logging.lastResort``, when no other handler takes it): a launcher waiting minutes
    for its server says so now, not when its log opens; its replay then goes to the log file only."""

    def __init__(self, echo: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.echo = echo
        self._logger = logging.getLogger("balsam")
        self._level = self._logger.level
        self._attached = False

    def emit(self, record: logging.LogRecord) -> None:
        if _configured(self._logger):  # the log file is open: its handlers took this record already
            return                     # (held too, the replay wrote it a second time)
        if self.echo and record.levelno >= logging.WARNING and not self._others_take(record):
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)
                record._balsam_echoed = True  # type: ignore[attr-defined]
        self.records.append(record)

    def _others_take(self, record: logging.LogRecord) -> bool:
        """Whether a handler other than this one sees ``record`` (``Logger.callHandlers``' walk)."""
        log: Optional[logging.Logger] = logging.getLogger(record.name)
        while log is not None:
            if any(h is not self for h in log.handlers):
                return True
            if not log.propagate:
                return False
            log = log.parent  # type: ignore[assignment]
        return False

    def __enter__(self) -> "HeldRecords":
        if self._attached:  # a hold the caller began (the CLI's), held on by run_launcher
            return self
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._attached = True
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)  # an INFO line must exist to be replayed
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._attached:
            return
        self._attached = False
        self._logger.removeHandler(self)
        if not _configured(self._logger):  # configure_logging set the level it wants
            self._logger.setLevel(self._level)

    def replay(self) -> None:
        records, self.records = self.records, []
        configured = _configured(self._logger)
        for record in records:
            echoed = getattr(record, "_balsam_echoed", False)
            if configured and echoed:  # on stderr already: to the log file alone
                for handler in self._logger.handlers:
                    if (getattr(handler, "_balsam_launcher", False) and not isinstance(handler, ConsoleHandler)
                            and record.levelno >= handler.level):
                        handler.handle(record)
            elif configured:
                target = logging.getLogger(record.name)
                if target.isEnabledFor(record.levelno):
                    target.handle(record)
            elif not echoed and record.levelno >= logging.WARNING and logging.lastResort is not None:
                logging.lastResort.handle(record)


def _configured(log: logging.Logger) -> bool:
    """Whether :func:`configure_logging` has given ``log`` the launcher's handlers."""
    return any(getattr(h, "_balsam_launcher", False) for h in log.handlers)


def configure_logging(path: Path, settings: Any = None) -> None:
    """Log to ``path`` with the site's logging settings (and warnings to stderr)."""
    from balsam.config.schema import LoggingSettings

    cfg = getattr(settings, "logging", None) or LoggingSettings()  # the schema: the one source of defaults
    level = cfg.level
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("balsam")
    for handler in list(root.handlers):
        if getattr(handler, "_balsam_launcher", False):
            root.removeHandler(handler)
            handler.close()
    handler = log_file_handler(path, cfg)
    handler._balsam_launcher = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    console = ConsoleHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console._balsam_launcher = True  # type: ignore[attr-defined]
    root.addHandler(console)


#: How often a running launcher touches its log file (its mtime set to now): the site agent's
#: scheduler module removes launcher files unchanged for ``logging.retention_days`` (at least a day)
#: but those whose launcher's log changed since (docs/site.md, "Logs"), and a live launcher's log
#: may be quiet for days (mpi mode logs at a job's start and end only; a launcher started by hand
#: has no BatchJob whose start would keep it). One utime call an hour.
LOG_TOUCH_PERIOD_SEC = 3600.0


class LogToucher:
    """A daemon thread that touches ``path`` every :data:`LOG_TOUCH_PERIOD_SEC` (read at the
    start) until :meth:`stop`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.period = float(LOG_TOUCH_PERIOD_SEC)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-toucher", daemon=True)

    def start(self) -> "LogToucher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            try:
                os.utime(self.path)
            except OSError:
                # Removed by hand, or the file system unreachable for now: the log handler says
                # what it cannot write; the next period tries again.
                pass

    def stop(self) -> None:
        self._stopped.set()


def _find_site(site_path: Optional[str]) -> Any:
    """The site and its id, without its settings (see :func:`_load_settings`)."""
    from balsam.config import SiteConfig

    try:
        site_config = SiteConfig(site_path)
        site_id = site_config.site_id
    except Exception as exc:
        raise LauncherError(str(exc)) from None
    if site_id is None:
        raise LauncherError(f"{site_config.site_path}/.balsam-site has no site id (is the site registered?)")
    return site_config


def _load_settings(site_config: Any) -> Any:
    """The sections a launcher uses (core sections: the agent modules' sections are the agent's,
    checked by it and by ``balsam site check-settings``; reading them imports every agent module)."""
    try:
        return site_config.launcher_settings
    except Exception as exc:
        raise LauncherError(str(exc)) from None


def _platform(settings: Any) -> Any:
    from balsam.config import site_platform
    from balsam.options import OptionsError
    from balsam.plugins.manager import PluginError

    try:
        return site_platform(settings)
    except (PluginError, OptionsError) as exc:
        raise LauncherError(f"settings.yml launcher.platform: {exc}") from None


def _job_mode_class(name: str) -> Any:
    from balsam.plugins.manager import PluginError, get_plugin_manager

    try:
        return get_plugin_manager().load_driver("job_mode", name)
    except PluginError as exc:
        raise LauncherError(str(exc)) from None


#: Launcher settings a job mode does not use, and why: {mode: {key: why}}. A launcher of that mode
#: started with the key set away from its default logs one warning line at start (a key that
#: silently does nothing is a defect). ``balsam site check-settings`` cannot say it: the job mode is
#: a BatchJob's, not the site's.
IGNORED_LAUNCHER_SETTINGS: dict[str, dict[str, str]] = {
    "serial": {
        "sort_by": "a serial-mode launcher leases runnable jobs by id (its acquire reads an index in id order, which "
                   "stays fast with millions of jobs); sort_by orders mpi mode's leases only",
    },
}


def ignored_settings_warnings(job_mode: str, settings: Any, source: Any = "settings.yml") -> list[str]:
    """One line per launcher setting that ``job_mode`` ignores and that ``settings`` sets away from
    its default (see :data:`IGNORED_LAUNCHER_SETTINGS`)."""
    # Imported on use, as this module's others are: at the top they would load the settings schema
    # and the API models before the launcher takes its start time and starts the early lease
    # (which imports the models in the background).
    from balsam.config.schema import LauncherSettings

    from .job_mode import launcher_setting

    defaults = LauncherSettings()
    lines = []
    for key, why in IGNORED_LAUNCHER_SETTINGS.get(job_mode, {}).items():
        value = launcher_setting(settings, key)
        if value != getattr(defaults, key):
            lines.append(f"{source} launcher.{key}: {value!r} is ignored in {job_mode} mode: {why}")
    return lines


def _nodes_from_env(env: dict[str, str]) -> Optional[list[NodeInfo]]:
    raw = env.get(NODES_ENV)
    if not raw:
        return None
    try:
        return [NodeInfo(**n) for n in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise LauncherError(f"{NODES_ENV} is not a JSON list of nodes: {exc}") from None


def run_launcher(
    job_mode: str,
    wall_time_min: float,
    tags: Sequence[str] = (),
    parts: Sequence[str] = (),
    site_path: Optional[str] = None,
    partition_index: int = 0,
    held: Optional[HeldRecords] = None,
) -> int:
    """``held``: the caller's hold on the start-up's records (the CLI's connect-wait notice, logged
    before this starts), replayed into the log file with this start-up's own; by default one of its own."""
    held = HeldRecords(echo=True) if held is None else held
    # What the start-up logs before the log file opens (the early lease's connect wait, the node
    # discovery) is replayed into it; warnings reach stderr at once as before. Every way out
    # replays and ends the hold.
    held.__enter__()
    try:
        # First: every process started from here on (partition launchers, the spawner, each job's
        # shell) inherits this environment (balsam.launcher.server_secrets).
        removed = drop_server_secrets()
        if removed:
            logger.info("the server's secrets %s are not kept in this launcher's environment, nor in its jobs'",
                        ", ".join(removed))
        return _start_launcher(job_mode, wall_time_min, tags, parts, site_path, partition_index, held)
    finally:
        held.replay()
        held.__exit__()


def _start_launcher(job_mode: str, wall_time_min: float, tags: Sequence[str], parts: Sequence[str],
                    site_path: Optional[str], partition_index: int, held: HeldRecords) -> int:
    # Set by the job template ($(date +%s)) or the first partition's launcher (start_time_text):
    # a bad one stops the launcher in one line (float() took nan, inf, -5 and 1_000, and raised a
    # traceback on 'now'); the moment it names is the allocation's, which no default could stand for.
    # Not after tomorrow: a start that far ahead is a typo (1e16 ran the launcher for ever); a day
    # leaves room for clocks of the batch system's hosts that disagree.
    now = time.time()
    try:
        start_time = env_number(START_TIME_ENV, now, fraction=True, maximum=float(int(now) + MAX_START_AHEAD_SEC),
                                on_bad="raise", maximum_text="a day past this host's clock")
    except EnvNumberError as exc:
        raise LauncherError(f"{exc}: the allocation's start in seconds since the epoch") from None
    # Not only "> 0": -t nan passed that test and the launcher stopped at once, exit 0, "done (wall
    # time)"; -t inf (or 1e300) made every acquire fail ("cannot convert float NaN to integer", HTTP
    # 422) once a second, and a serial launcher then never went idle: it ran until killed.
    if not (math.isfinite(wall_time_min) and 0 < wall_time_min <= MAX_WALL_TIME_MIN):
        raise LauncherError(f"wall time must be positive and finite, in minutes (at most {MAX_WALL_TIME_MIN}: ten "
                            f"years), got -t {wall_time_min}")
    # Imported here, after the start time is taken (the client and its HTTP stack: tens of ms).
    from balsam.client import on_credential_refused
    from balsam.site.launcher_credentials import use_launcher_credential

    cli_tags = dict(parse_tag(t) for t in tags)
    partitions = [parse_partition(p) for p in parts] or [Partition(job_mode, 0)]
    site_config = _find_site(site_path)
    # The BatchJob's own site-scoped credential (minted by the agent), if there is one; child
    # processes (partitions, jobs using the API) inherit it.
    credential = use_launcher_credential(site_config.site_path, os.environ)
    # The Session is created (and the API models imported) in the background while the settings are
    # read and the plugins (hook modules, the platform) load: the longest steps before the first
    # job starts.
    early_lease = _start_early_lease(site_config.site_id, partitions)
    on_main_thread = threading.current_thread() is threading.main_thread()
    # Not ``starting`` yet: a signal before the ``try`` below is only noted (no StartUpSignal that
    # would skip the discard), and :meth:`StartUpSignals.end` raises it again after the discard.
    signals = StartUpSignals(starting=False) if early_lease is not None and on_main_thread else None
    # Nested: a signal that interrupts the inner ``finally`` still finds the outer one, which gives
    # back what the early lease holds whatever happened before it.
    try:
        if signals is not None:
            signals.starting = True
        try:
            if signals is not None:
                signals.raise_noted()  # one came before the ``try``: the start-up ends here
            settings = _load_settings(site_config)
            settings_tags = dict(getattr(settings, "filter_tags", None) or {})
            check_filter_tag_count(settings_tags, cli_tags, partitions)
            base_tags = {**settings_tags, **cli_tags}
            return _run_with_site(site_config, settings, credential, partitions, base_tags, wall_time_min, start_time,
                                  partition_index, early_lease, on_credential_refused, held=held, signals=signals)
        finally:
            if signals is not None:
                signals.starting = False  # from here on a signal is noted, and acted on after the discard
            held.replay()  # the log file (when open) has the start-up's records before the discard's
    finally:
        try:
            if early_lease is not None:
                # After a signal the server gets a short grace: a launcher told to end does not wait
                # out a connect wait (a Session still unanswered then is released when it expires).
                early_lease.discard(hurried=(lambda: bool(signals.received)) if signals is not None else None)
        finally:
            if signals is not None:
                signals.end()


class StartUpSignal(BaseException):
    """SIGTERM or SIGINT while the launcher starts, before its job mode handles them (a
    BaseException, as KeyboardInterrupt: the start-up's ``except Exception`` must not turn it into
    an error line)."""


class StartUpSignals:
    """SIGTERM and SIGINT of a launcher holding an early lease, from its start until the lease is
    discarded (run_launcher): one handler, installed once.

    While ``starting``, the first signal raises :class:`StartUpSignal`: the start-up ends through
    the early lease's discard (its Session deleted, the jobs it acquired early given back at once),
    not by the signal's default action, which left them held until the Session expired. While the
    job mode runs, its handler gets them (:meth:`hand_over`). Otherwise a signal is only noted, so
    that nothing cuts the discard short; :meth:`end` then puts the original handlers back and
    raises the first signal noted again: the launcher ends as it did without an early lease (killed
    by SIGTERM; KeyboardInterrupt for SIGINT)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, starting: bool = True) -> None:
        self.starting = starting
        #: Signals noted (not the job mode's): the first is raised again by :meth:`end`.
        self.received: list[int] = []
        self._mode_handler: Any = None
        self._original: dict[int, Any] = {}
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                # Inherited as ignored (``cmd &`` in a non-interactive shell, ``trap '' TERM``): it
                # stays ignored, as it was before this handler existed (end() could not raise it).
                continue
            self._original[sig] = current  # before the install: a signal right after finds it restored
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        handler = self._mode_handler
        if handler is not None:
            handler(signum, frame)
            return
        self.received.append(signum)
        if self.starting:
            self.starting = False  # once: a second signal must not cut the way to the discard short
            raise StartUpSignal(f"signal {signum} during the launcher's start-up")

    def raise_noted(self) -> None:
        """Raise :class:`StartUpSignal` for a signal noted before ``starting`` was set."""
        if self.received and self.starting:
            self.starting = False  # as _handle: a further signal must not cut the discard short
            raise StartUpSignal(f"signal {self.received[0]} during the launcher's start-up")

    def hand_over(self, handler: Any) -> None:
        """The job mode's handler gets the signals from now on (None: they are noted again)."""
        self.starting = False
        self._mode_handler = handler

    def end(self) -> None:
        for sig, handler in self._original.items():
            signal.signal(sig, handler)
        if self.received:
            # SIGTERM's default action kills the process: what the launcher's buffered log file
            # handler holds (the start-up's records, the discard's lines) is written first.
            for log_handler in logging.getLogger("balsam").handlers:
                if getattr(log_handler, "_balsam_launcher", False):
                    try:
                        log_handler.flush()
                    except Exception:  # a full disk must not keep the signal from ending the launcher
                        pass
            signal.raise_signal(self.received[0])


def _start_early_lease(site_id: int, partitions: Sequence[Partition]) -> Any:
    """A Session opened in the background now, for a single-partition launch whose BatchJob id is
    known from the environment (what the job template exports); None otherwise. Its acquire filters
    (tags, sort order: they come from the settings) are given when the job mode takes it."""
    batch_job_id = batch_job_id_from_env(os.environ)
    if len(partitions) != 1 or batch_job_id is None:
        return None
    from .service_calls import EarlyLease

    return EarlyLease.start(site_id, batch_job_id)


def _run_with_site(site_config: Any, settings: Any, credential: Any, partitions: list[Partition], base_tags: dict[str, str],
                   wall_time_min: float, start_time: float, partition_index: int, early_lease: Any,
                   on_credential_refused: Any, held: Optional[HeldRecords] = None,
                   signals: Optional[StartUpSignals] = None) -> int:
    # ``held``: the start-up's hold (run_launcher), replayed and ended once the log file opens;
    # without it, one for the discovery alone.
    own_hold = held is None
    held = HeldRecords() if held is None else held
    platform = _platform(settings)
    env = dict(os.environ)
    nodes = _nodes_from_env(env)
    # Every way out replays what the discovery logged (an error before the log file opens
    # included: a warning there may be what explains it).
    try:
        if nodes is None:
            with held if own_hold else contextlib.nullcontext():
                try:
                    nodes = platform.discover_nodes(env)
                except Exception as exc:
                    raise LauncherError(f"platform {platform.name!r} could not discover the nodes: {exc}") from None
        if not nodes:
            raise LauncherError(f"platform {platform.name!r} found no nodes in this allocation")
        if len(partitions) == 1 and partitions[0].num_nodes == 0:  # no --part: one partition of every node
            partitions = [Partition(partitions[0].job_mode, len(nodes), partitions[0].filter_tags)]
        for p in partitions:
            _job_mode_class(p.job_mode)  # fail fast on a misspelt mode, before anything starts
        node_groups = split_nodes(nodes, partitions)

        from .service_calls import find_batch_job_id
        from .job_mode import LauncherContext

        batch_job_id = find_batch_job_id(site_config.site_id, env, platform)
        if len(partitions) > 1:
            held.replay()  # now, not after the partitions' run
            if not own_hold:
                held.__exit__()
            return _run_partitions(partitions, node_groups, wall_time_min, base_tags, site_config, batch_job_id, start_time)

        partition = partitions[0]
        context = LauncherContext(
            site_config=site_config,
            settings=settings,
            site_id=site_config.site_id,
            data_path=site_config.data_path,
            log_path=site_config.log_path,
            platform=platform,
            nodes=node_groups[0],
            wall_time_min=wall_time_min,
            filter_tags={**base_tags, **partition.filter_tags},
            batch_job_id=batch_job_id,
            job_mode=partition.job_mode,
            partition_index=partition_index,
            start_time=start_time,
            early_lease=early_lease if early_lease is not None and early_lease.batch_job_id == batch_job_id else None,
        )
        # Jobs (and serial workers) see which mode and how many nodes run them, as in Balsam 0.7.
        os.environ["BALSAM_LAUNCHER_NODES"] = str(len(context.nodes))
        os.environ["BALSAM_JOB_MODE"] = partition.job_mode
        configure_logging(context.log_file("log"), settings)
    finally:
        held.replay()
        if not own_hold:
            held.__exit__()  # the log file has them now, and what comes next
    for line in ignored_settings_warnings(partition.job_mode, settings, getattr(site_config, "settings_path", "settings.yml")):
        logger.warning("%s", line)
    if credential is not None:
        logger.info("using the launcher credential %s", credential)
    mode = _job_mode_class(partition.job_mode)(context)

    def on_refused(error: Any) -> None:
        # Revoked or expired for good: the server has ended this launcher's sessions (its jobs run
        # again elsewhere); stop acquiring and end what runs rather than run blind.
        logger.error("the server refused this launcher's credential (%s): stopping", error.detail)
        mode.request_stop("credential refused")

    on_credential_refused(on_refused)
    def on_signal(signum: int, _frame: Any) -> None:
        logger.warning("signal %s: ending running jobs as RUN_TIMEOUT", signum)
        mode.request_stop(f"signal {signum}")

    # ``signals``: the start-up's handler (run_launcher) passes them on while the mode runs, and
    # notes them again after it (they are acted on once the early lease is discarded).
    if signals is not None:
        signals.hand_over(on_signal)
        previous: dict[int, Any] = {}
    else:
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    toucher = LogToucher(context.log_file("log")).start()
    try:
        logger.info("launcher %s: site %s, batch job %s, %d nodes", partition.job_mode, site_config.site_path, batch_job_id, len(context.nodes))
        resume_gc_after_start_up()  # start-up is over (see balsam.launcher.__main__)
        from .service_calls import UnknownBatchJob

        try:
            code = int(mode.run() or 0)
        except UnknownBatchJob as exc:
            raise LauncherError(str(exc)) from None
        # The Session refused for its BatchJob in a thread of the mode (which stopped for it).
        refusal = early_lease.refusal() if code and early_lease is not None else None
        if refusal is not None:
            raise LauncherError(str(refusal))
        return code
    finally:
        try:
            # The mode's notes on its BatchJob (status_info) are written by the note writer's
            # thread: before the exit, bounded (batch_job_notes.FLUSH_SEC, not again after a flush
            # that timed out); here, while the log file is open for its warning.
            flush_notes()
        finally:
            toucher.stop()
            if signals is not None:
                signals.hand_over(None)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


#: Seconds after a forwarded SIGTERM before a partition's launcher still running is killed: a child
#: ends its jobs within its grace (at most 10 s), sends or spools its updates (5 s) and closes its
#: session; the rest is room for a loaded node.
PARTITION_STOP_LIMIT_SEC = 40.0


def partitions_exit_code(codes: list[int]) -> int:
    """The exit status of a launcher of several partitions: 0 when every child ended well, else the
    first failure's, a child killed by signal N as 128 + N (as a shell says it). ``max()`` took a
    signal's negative code for success beside a 0."""
    failed = [code for code in codes if code != 0]
    if not failed:
        return 0
    return 128 - failed[0] if failed[0] < 0 else failed[0]


def _run_partitions(partitions, node_groups, wall_time_min, base_tags, site_config, batch_job_id, start_time) -> int:
    """One child launcher per partition; SIGTERM is forwarded, stragglers killed
    ``PARTITION_STOP_LIMIT_SEC`` after it."""
    resume_gc_after_start_up()  # this process only waits from here on (see balsam.launcher.__main__)
    children: list[subprocess.Popen] = []
    stopping = {"at": None}

    def forward(signum: int, _frame: Any) -> None:
        stopping["at"] = stopping["at"] or time.monotonic()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, (partition, group) in enumerate(zip(partitions, node_groups)):
            env = dict(os.environ)
            env[START_TIME_ENV] = start_time_text(start_time)
            env[NODES_ENV] = json.dumps([attrs.asdict(n) for n in group])
            env["BALSAM_SITE_PATH"] = str(site_config.site_path)
            env["BALSAM_LAUNCHER_NODES"] = str(len(group))
            env["BALSAM_JOB_MODE"] = partition.job_mode
            env[MPI_PARTITIONS_ENV] = str(sum(1 for p in partitions if p.job_mode == "mpi"))
            if batch_job_id is not None:
                env["BALSAM_BATCH_JOB_ID"] = str(batch_job_id)
            argv = [sys.executable, "-m", "balsam.launcher", "-j", partition.job_mode, "-t", repr(wall_time_min),
                    "--partition-index", str(index)]
            for key, value in {**base_tags, **partition.filter_tags}.items():
                argv += ["--tag", f"{key}={value}"]
            children.append(subprocess.Popen(argv, env=env))
        codes = []
        for child in children:
            while True:
                try:
                    codes.append(child.wait(timeout=0.5))
                    break
                except subprocess.TimeoutExpired:
                    if stopping["at"] and time.monotonic() - stopping["at"] > PARTITION_STOP_LIMIT_SEC:
                        child.kill()
        return partitions_exit_code(codes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
