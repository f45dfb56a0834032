"""serial job mode: many single-rank tasks packed on every node of the partition.

The partition launcher starts one rank per node with the platform's MPI launcher::

    mpiexec -n <nodes> -ppn 1 --hosts ... python -m balsam.launcher.modes.serial_worker <config.json>

Rank 0 is the master: it holds the Session, leases jobs in large batches (``serial_only``), places
tasks on every node with the NodeManager, runs its own node's tasks and sends the other ranks theirs
over mpi4py (many tasks per message); the workers start, reap and report them back. A one-node
partition on the launcher's own node, on a platform that declares ``serial_workers_without_mpi``,
runs the master in this process instead (no MPI). See :mod:`balsam.launcher.modes.serial_worker`.

If the workers did not start one per node, the master refuses to run anything: the launcher exits
1 and the BatchJob's ``status_info["error"]`` says what was seen.

If the workers die (a rank killed, a node lost: the MPI launcher then ends every rank, the master
too, and exits non-zero; or it could not start them on a node that is down), the launcher process
ends the master's Session itself (the master records it: :class:`~.serial_worker.SessionRecord`),
so that its RUNNING jobs become RUN_TIMEOUT at once and are run again instead of waiting for the
Session to expire; it logs at ERROR and records ``serial workers died (<launcher> exit N): <the end
of the MPI launcher's output>`` in the BatchJob's ``status_info["error"]`` (``<launcher>``: the
platform's MPI launcher as it was run, ``mpiexec``, ``srun``, ``aprun``).

Not so when the launcher itself is stopping (the batch system's SIGTERM to the whole job: ``balsam
queue term``, scancel, the time limit): the MPI launcher then exits by the signal too (``srun`` at
once, -15) while the master, which Slurm signals separately, still ends its tasks and reports them
RUN_TIMEOUT. The launcher waits for the master to close its Session (at most
:meth:`SerialMode.stop_report_wait_sec`), records no error, and deletes the Session only if the
master never closed it: deleting it under a live master had the server refuse the master's
RUN_TIMEOUT reports (HTTP 409) and the jobs' reason said the Session was deleted.

Serial mode runs only jobs of one rank on one node (``serial_only``): the server never leases it
the others, which wait for an mpi-mode BatchJob. As it ends normally (idle, with time left), the
launcher reads the site's runnable jobs once (one listing request, at most
:data:`MULTI_RANK_SCAN_LIMIT` jobs) and, if some need more than one rank or node, says so once: in
its log and in the BatchJob's ``status_info["launcher"]`` (``balsam queue ls -v``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs

from balsam.client.lease import RESTORE_WAIT_SEC
from balsam.platform import LaunchSpec
from balsam.util import api_text, same_process, tail_file

from ..batch_job_notes import flush_notes
from ..service_calls import default_client, note_batch_job, report_batch_job_error
from ..job_mode import (
    RUNNABLE_NOTE_WAIT_SEC, RUNNABLE_SCAN_LIMIT, JobMode, gpuless_acquire_filter, longest_offered_min, runnable_jobs_page,
    too_long_note,
)
from .serial_worker import (
    EXIT_START_FAILED, FINAL_COLLECT_EXTRA_SEC, LAUNCHER_SLURM_ENV, LocalTransport, StartError, build_master,
    launcher_slurm_environment, master_exit_code, rank_for_node, read_session_record, record_start_error,
)

logger = logging.getLogger(__name__)

#: Once the master has closed its Session (its stop is done: every report sent), the MPI launcher
#: gets this long to exit before it is killed. A worker rank the master took out as hung (SIGSTOP,
#: a node wedged in D state) never exits, and the MPI launcher waits for every rank: it held the
#: allocation to its end.
EXIT_AFTER_CLOSE_SEC = 10.0
#: How often the launcher reads the master's Session record while the ranks run.
SESSION_RECORD_POLL_SEC = 2.0
#: Runnable jobs read, in one request as the launcher ends, to count those serial mode leaves to
#: mpi mode; the launcher waits at most MULTI_RANK_NOTE_WAIT_SEC for it.
MULTI_RANK_SCAN_LIMIT = RUNNABLE_SCAN_LIMIT
MULTI_RANK_NOTE_WAIT_SEC = RUNNABLE_NOTE_WAIT_SEC
#: An MPI launcher that exits by one of these while the launcher's own stop is not yet seen: the
#: launcher waits this long for the same signal to reach it (the batch system signals every
#: process of the job, in no set order) before it judges the exit as the workers' death.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNAL_SETTLE_SEC = 1.0
#: The longest a stopping launcher waits for the master to close its Session after the workers' MPI
#: launcher exited (:meth:`SerialMode._workers_stopped`). Slurm SIGKILLs the job's processes its
#: KillWait (30 s by default) after the stop signal: the wait of the master's own stop (grace +
#: FINAL_COLLECT_EXTRA_SEC + EXIT_AFTER_CLOSE_SEC, up to 30 s) would leave no time to end a dead
#: master's Session, whose RUNNING jobs then wait for its expiry.
STOP_REPORT_WAIT_MAX_SEC = 15.0
#: ``env`` options that take the next word as their value (``env -u NAME srun ...``).
_ENV_OPTIONS_WITH_VALUE = ("-u", "--unset", "-C", "--chdir", "-S", "--split-string")


def multi_rank_note(client: Any, site_id: int, filter_tags: Optional[dict[str, str]] = None,
                    offered: Optional[Callable[[], tuple[int, float]]] = None) -> Optional[str]:
    """Why some runnable jobs of the site (of the launcher's tags) are never run by serial mode:
    they need more than one rank or node; with ``offered`` (called after the request: the most wall
    time the launcher offered, :func:`~balsam.launcher.job_mode.longest_offered_min`, and its
    ``-t``), also those that ask for more (:func:`~balsam.launcher.job_mode.too_long_note`). None
    when there are none. One request: the first :data:`MULTI_RANK_SCAN_LIMIT` runnable jobs (a
    count beyond them is "at least")."""
    rows, total = runnable_jobs_page(client, site_id, filter_tags)
    notes = []
    wide = sum(1 for r in rows if int(r.get("num_nodes") or 1) > 1 or int(r.get("ranks_per_node") or 1) > 1)
    if wide:
        count = f"at least {wide}" if total > len(rows) else str(wide)
        verbs = ("job needs", "is") if wide == 1 else ("jobs need", "are")
        notes.append(f"{count} runnable {verbs[0]} more than one rank or node and {verbs[1]} left for an mpi-mode BatchJob "
                     "(balsam queue submit -j mpi): serial mode runs single-rank, single-node jobs only")
    if offered is not None:
        single = [r for r in rows if not (int(r.get("num_nodes") or 1) > 1 or int(r.get("ranks_per_node") or 1) > 1)]
        long_note = too_long_note(single, total > len(rows), *offered())
        if long_note:
            notes.append(long_note)
    return "; ".join(notes) or None


def launcher_name(cmd: str) -> str:
    """The program a workers' command line starts (``srun``, ``mpiexec``), for messages: its first
    word past an ``env`` and its ``VAR=value`` words and options. Never an error: a line shlex
    cannot split (a startup param quoted oddly) is bash's to run or refuse; its first plain word
    names it then."""
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    after_env = False
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if Path(word).name == "env" and not after_env:
            after_env = True
            continue
        if after_env and word.startswith("-"):
            skip_next = word in _ENV_OPTIONS_WITH_VALUE
            continue
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word, flags=re.DOTALL):
            continue
        return Path(word).name
    return "mpiexec"


def _option_name(key: str) -> str:
    """A launch param's option as written any way: ``--cpu-bind``, ``cpu_bind``, ``cpu-bind`` -> ``cpu-bind``."""
    return key.lstrip("-").replace("_", "-").lower()


class SerialMode(JobMode):
    name = "serial"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._proc: "subprocess.Popen | None" = None
        #: The MPI launcher as the workers' command line names it (``srun``, ``mpiexec``): its messages say it.
        self._launcher_name = "mpiexec"

    def worker_config(self) -> dict[str, Any]:
        ctx = self.context
        config: dict[str, Any] = {
            "site_path": str(getattr(ctx.site_config, "site_path", "")),
            "site_id": ctx.site_id,
            "data_path": str(ctx.data_path),
            "log_path": str(ctx.log_path),
            "spool_path": str(ctx.spool_path) if ctx.spool_path is not None else None,
            "batch_job_id": ctx.batch_job_id,
            "filter_tags": ctx.filter_tags,
            "wall_time_min": ctx.wall_time_min,
            "start_time": ctx.start_time,
            "timestamp": ctx.timestamp,
            "partition_index": ctx.partition_index,
            "nodes": [attrs.asdict(n) for n in ctx.nodes],
            "start_error_path": str(self.start_error_path),
            "error_tail_num_lines": int(ctx.setting("error_tail_num_lines")),
            "logging": {
                name: getattr(getattr(ctx.settings, "logging", None), name, None)
                for name in ("level", "format", "datefmt", "buffer_num_records", "flush_period")
            },
            # Resolved here so the master can lease jobs before it has read settings.yml itself.
            "launcher": {
                name: ctx.setting(name)
                for name in ("platform", "idle_ttl_sec", "delay_sec", "error_tail_num_lines", "serial_mode_prefetch_per_rank",
                             "default_postprocess_in_launcher")
            },
        }
        # The options as plain values (the settings loader may hand over an instance of the schema).
        options = ctx.setting("platform_options") or {}
        config["launcher"]["platform_options"] = attrs.asdict(options) if attrs.has(type(options)) else dict(options)
        # Decided here, where the nodes were discovered (the master may be another process).
        config["acquire_filter"] = gpuless_acquire_filter(ctx.nodes)
        config["cpu_ids_are_cores"] = bool(getattr(ctx.platform, "cpu_ids_are_cores", False))
        # The node manager's threads_per_core cap: the one the platform's pinning and warning use.
        config["hardware_threads_per_core"] = int(getattr(ctx.platform, "hardware_threads_per_core", 0) or 0)
        return config

    @property
    def start_error_path(self) -> Path:
        return self.context.log_file("serial.start-error")

    @property
    def session_path(self) -> Path:
        """Where the master (an MPI rank) records its Session (:class:`~.serial_worker.SessionRecord`)."""
        return self.context.log_file("serial.session")

    def runs_in_process(self) -> bool:
        """One node, this launcher's own, on a platform whose launcher runs on its compute node."""
        ctx = self.context
        if len(ctx.nodes) != 1 or not getattr(ctx.platform, "serial_workers_without_mpi", False):
            return False
        here = socket.gethostname().split(".")[0].lower()
        return ctx.nodes[0].hostname.split(".")[0].lower() in (here, "localhost")

    def command(self, config_path: str) -> str:
        ctx = self.context
        worker = f"{shlex.quote(sys.executable)} -m balsam.launcher.modes.serial_worker {shlex.quote(config_path)}"
        params = {str(k): str(v) for k, v in (ctx.setting("serial_mode_startup_params") or {}).items()}
        # Balsam 0.7's default ``cpu_affinity: none`` means "do not bind the workers" (they pin their
        # own tasks). MPI launchers bind by default (aprun -cc depth, srun to --cpus-per-task 1, Open
        # MPI to a core): the platform says how to start its workers unbound; one that does not
        # know (None) gets the key left out rather than an option its launcher does not have.
        if params.get("cpu_affinity", "").lower() == "none":
            params.pop("cpu_affinity")
            unbound = ctx.platform.unbound_serial_worker_params()
            # The user's own setting of an option wins however it is spelled (``--cpu-bind``,
            # ``cpu_bind`` beside the platform's ``cpu-bind``): platforms read the first spelling
            # in their own order, which could be the translation's.
            given = {_option_name(key) for key in params}
            for key, value in (unbound or {}).items():
                if _option_name(str(key)) not in given:
                    params[str(key)] = str(value)
        gpus = len(ctx.nodes[0].gpu_ids) if ctx.nodes else 0
        spec = LaunchSpec(
            cmdline=worker,
            hostnames=[n.hostname for n in ctx.nodes],
            ranks_per_node=1,
            threads_per_rank=1,
            gpus_per_rank=float(gpus),
            launch_params=params,
        )
        return ctx.platform.mpi_command_line(spec)

    def request_stop(self, reason: str = "signal") -> None:
        super().request_stop(reason)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # mpiexec forwards SIGTERM to the ranks; the master ends running tasks as RUN_TIMEOUT.
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def note_multi_rank_jobs(self) -> Optional[str]:
        """Say once (log, BatchJob ``status_info["launcher"]``) that runnable jobs needing more than one
        rank or node are left for mpi mode. Best effort: an API that does not answer only logs it."""
        ctx = self.context
        try:
            message = multi_rank_note(default_client(), ctx.site_id, ctx.filter_tags,
                                      lambda: (longest_offered_min(self.countdown), ctx.wall_time_min))
        except ValueError as exc:
            # A filter tag key holding ':' (the jobs listing's tag filter is KEY:VALUE): said once, so
            # that a missing note has a reason (the acquire sends the tags as JSON: not affected).
            logger.info("runnable jobs not counted for the multi-rank note: %s", exc)
            return None
        except Exception as exc:
            logger.debug("runnable jobs not counted for the multi-rank note: %s", exc)
            return None
        if message:
            logger.warning(message)
            note_batch_job(ctx.batch_job_id, "launcher", message)
        return message

    def run(self) -> int:
        code = self._run()
        # When the work is over (a listing request while jobs ran slowed them: the server counts
        # and reads the runnable jobs), and only after a normal end with time left: a launcher
        # that went idle with such jobs left is the case to explain; one stopped by a signal, a
        # refused credential or its wall time must exit at once (the scheduler's kill follows).
        # Bounded: an API that does not answer does not hold the launcher's exit.
        if code == 0 and not self.stop.requested and self.countdown.remaining_sec() > 2 * MULTI_RANK_NOTE_WAIT_SEC:
            note = threading.Thread(target=self.note_multi_rank_jobs, name="multi-rank-note", daemon=True)
            note.start()
            note.join(MULTI_RANK_NOTE_WAIT_SEC)
        # The BatchJob's notes (an error, the note above) are written by the note writer's thread:
        # on the server when this returns (bounded: batch_job_notes.FLUSH_SEC, once per outage).
        flush_notes()
        return code

    def _run(self) -> int:
        ctx = self.context
        config = self.worker_config()
        if self.runs_in_process():
            return self._run_in_process(config)
        if ctx.early_lease is not None:  # the master (another process) opens its own
            early, ctx.early_lease = ctx.early_lease, None
            early.discard()
            refusal = early.refusal()
            if refusal is not None:  # no such BatchJob: the master's Session would be refused too
                raise refusal
        config["session_path"] = str(self.session_path)
        config_path = ctx.log_file("serial.json")
        try:
            cmd = self.command(str(config_path))
        except ValueError as exc:
            # A launcher.serial_mode_startup_params value the platform refuses (a PALS --cpu-bind of
            # 'depht': balsam.platform.checked_launch_param's one line, naming the setting). It was a
            # traceback, in no log and not on the BatchJob; now the start's failure as the workers'
            # refused start is: nothing has started, and the early lease is discarded already
            # (no job is held).
            self._fail_start(str(exc))
            return 1
        config_path.parent.mkdir(parents=True, exist_ok=True)
        # Exclusive create: a name clash with another launcher must fail loudly, never be shared.
        with open(config_path, "x") as fh:
            fh.write(json.dumps(config))
        self._launcher_name = launcher_name(cmd)
        out_path = ctx.log_file("out")
        logger.info("serial mode: %d nodes; starting %s", len(ctx.nodes), cmd)
        with open(out_path, "ab") as out:
            # srun writes its step's values over the job script's SLURM_NTASKS, SLURM_NNODES...
            # in the ranks (also under hydra's mpiexec, which starts its proxies with srun): this
            # launcher's own values travel beside them, for the ranks to give their tasks back.
            env = {**os.environ, LAUNCHER_SLURM_ENV: launcher_slurm_environment()}
            # The MPI launcher keeps SIGPIPE ignored, as mpi mode's do (runner.local_pool: hydra's
            # mpiexec can die of a late write at the end of a run that succeeded); restore_signals
            # restores SIGPIPE and SIGXFSZ together, so SIGXFSZ stays ignored for it too.
            self._proc = subprocess.Popen(["/bin/bash", "-c", "exec " + cmd], stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, restore_signals=False, env=env)
            if self.stop.requested:
                self.request_stop(self.stop_reason)
            # The ranks keep their own countdown; this is only a backstop if they hang.
            hard_deadline = self.countdown.deadline + self.countdown.margin_sec
            closed_at: Optional[float] = None  # when the master was seen to have closed its Session
            closed_reason = ""
            next_look = time.monotonic() + SESSION_RECORD_POLL_SEC
            while True:
                try:
                    rc = self._proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if time.time() > hard_deadline:
                        logger.error("serial workers still running at the allocation end; killing them")
                        self._proc.kill()
                    elif closed_at is None and now >= next_look:
                        next_look = now + SESSION_RECORD_POLL_SEC
                        record = read_session_record(self.session_path)
                        if record and record.get("closed"):
                            closed_at, closed_reason = now, str(record["closed"])
                    elif closed_at is not None and now - closed_at > EXIT_AFTER_CLOSE_SEC:
                        logger.warning("serial workers still running %.0f s after the master stopped (%s): a rank "
                                       "it took out as unresponsive holds the MPI launcher; killing it",
                                       EXIT_AFTER_CLOSE_SEC, closed_reason)
                        self._proc.kill()
                        self._proc.wait()
                        # The master's own outcome (its Session is closed, its reports sent).
                        return master_exit_code(closed_reason)
        logger.info("serial mode workers exited with %s", rc)
        failure = self._start_failure(rc)
        if failure:
            self._fail_start(failure)
            return 1
        if rc != 0:
            if self._stopping(rc):
                return self._workers_stopped(rc, hard_deadline)
            self._workers_exited(rc, out_path)
        return 0 if rc == 0 else 1

    def _stopping(self, rc: int) -> bool:
        """Whether the launcher itself is stopping (a signal, its wall time): the workers' exit
        ``rc`` is then the stop's doing. An MPI launcher killed by a stop signal a moment before the
        same signal reached this process (Slurm signals the job's processes in no set order) counts
        too, once that signal arrives."""
        if self.stop.requested:
            return True
        if (rc < 0 and -rc in STOP_SIGNALS) or (rc > 128 and rc - 128 in STOP_SIGNALS):
            self.stop.event.wait(STOP_SIGNAL_SETTLE_SEC)
        return self.stop.requested

    def stop_report_wait_sec(self) -> float:
        """How long a stopping launcher waits for the master to close its Session: the master's own
        stop (its tasks' grace, the workers' last reports, :data:`FINAL_COLLECT_EXTRA_SEC`) and the
        time to send its reports (:data:`EXIT_AFTER_CLOSE_SEC`), at most
        :data:`STOP_REPORT_WAIT_MAX_SEC` (the batch system's kill follows the stop signal)."""
        return min(STOP_REPORT_WAIT_MAX_SEC, self.countdown.grace_sec + FINAL_COLLECT_EXTRA_SEC + EXIT_AFTER_CLOSE_SEC)

    def _workers_stopped(self, rc: int, hard_deadline: float) -> int:
        """The MPI launcher exited ``rc`` while the launcher stops: the master (signalled by the
        batch system, or by the MPI launcher before it went) may still be ending its tasks and
        reporting them RUN_TIMEOUT under its Session. Wait for it to close that Session, bounded
        (never past the allocation's end), as the normal end waits; no BatchJob error, which the
        stop is not. A master that never closes it (dead with the workers) gets it deleted then,
        so that its RUNNING jobs are RUN_TIMEOUT without waiting for the expiry."""
        deadline = min(time.monotonic() + self.stop_report_wait_sec(),
                       time.monotonic() + max(0.0, hard_deadline - time.time()))
        while True:
            record = read_session_record(self.session_path)
            closed = record.get("closed") if record else None
            if closed:
                logger.info("serial workers (%s) exited with %s at the launcher's stop (%s); the master closed its "
                            "session (%s)", self._launcher_name, rc, self.stop_reason, closed)
                return master_exit_code(str(closed))
            if _master_gone(record) and not (read_session_record(self.session_path) or {}).get("closed"):
                # (read again: a master may write its close and exit between the read and the look)
                logger.warning("serial workers (%s) exited with %s at the launcher's stop (%s) and the master "
                               "(pid %s on this host) is gone without closing its session: ending it",
                               self._launcher_name, rc, self.stop_reason, record.get("pid") if record else "?")
                self._end_session(record)
                return 1
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if record is not None:
            logger.warning("serial workers (%s) exited with %s at the launcher's stop (%s) and the master did not "
                           "close its session in %.0f s: ending it", self._launcher_name, rc, self.stop_reason,
                           self.stop_report_wait_sec())
            self._end_session(record)
        return 1

    def _run_in_process(self, config: dict[str, Any]) -> int:
        """The master alone, in this process: no MPI launcher, no second Python start-up."""
        ctx = self.context
        logger.info("serial mode: 1 node (%s), master in the launcher process", ctx.nodes[0].hostname)
        transport = LocalTransport()
        try:
            ranks = rank_for_node(ctx.nodes, transport.hosts())
        except StartError as exc:
            record_start_error(config, str(exc))
            self._fail_start(str(exc))
            return 1
        master = build_master(config, transport, ranks, self.stop, self.wake, lambda: ctx.platform, lease=ctx.open_lease)
        reason = master.run()
        return master_exit_code(reason)

    def _start_failure(self, rc: int) -> Optional[str]:
        """Why the workers refused to start (the lines the masters wrote), or None."""
        try:
            lines = [line.strip() for line in self.start_error_path.read_text(errors="replace").splitlines() if line.strip()]
        except FileNotFoundError:
            lines = []
        if not lines:
            if rc == EXIT_START_FAILED:
                return f"the start check failed (see {self.context.log_file('master.log').name})"
            return None
        extra = f" ({len(lines)} masters said so: the ranks did not see each other)" if len(lines) > 1 else ""
        return lines[0] + extra

    def _workers_exited(self, rc: int, out_path: Path) -> None:
        """The MPI launcher exited non-zero: unless the master closed its Session itself (it stopped,
        then a rank exited non-zero), the ranks died (the master with them: the MPI launcher ends
        every rank when one dies) or never started. End the master's Session now, so that its
        RUNNING jobs become RUN_TIMEOUT and run again without waiting for its expiry, and say why."""
        record = read_session_record(self.session_path)
        closed = record.get("closed") if record else None
        if closed:
            if master_exit_code(str(closed)):  # the master lost its Session: its own stop, already logged by it
                logger.error("serial master stopped: %s", closed)
            else:
                logger.warning("serial workers exited with %s after the master closed its session (%s)", rc, closed)
            return
        if record is not None:
            self._end_session(record)
        reason = f"serial workers died ({self._launcher_name} exit {rc})"
        tail = _tail(out_path, int(self.context.setting("error_tail_num_lines")))
        logger.error("%s: %s", reason, tail or "no output")
        self._record_error(f"{reason}: {tail}" if tail else reason, "the workers' failure")

    def _end_session(self, record: dict[str, Any]) -> None:
        """Delete the dead master's Session (the server makes its RUNNING jobs RUN_TIMEOUT), as its
        lease's close would have; but, as that close, leave it to expire if the master spooled
        updates sent under it (the site agent replays them while the Session still holds the jobs)."""
        # Here, not at the top: the client's modules cost the launcher's start-up ~10 ms, and only
        # this failure path needs them (the master imports them in its own process).
        from balsam.client.status_updater import http_status, spool_prefix

        session_id = record["session_id"]
        spool = self.context.spool_path
        if spool is not None and any(Path(spool).glob(f"{spool_prefix(record.get('host'), record.get('pid'))}*")):
            logger.warning("session %s of the dead serial master is left to expire: it spooled updates", session_id)
            # The master may have announced its end (balsam.client.lease, "An announced end"): its
            # Session would expire seconds later and the agent's replay be refused (the job no longer
            # held: its result lost, run again). A plain heartbeat gives it a full expiry again.
            try:
                # One attempt, bounded: the API that did not take the reports may still hang.
                default_client().put(f"/sessions/{session_id}", json={}, retry_count=0,
                                     deadline=time.monotonic() + RESTORE_WAIT_SEC)
            except Exception as exc:  # the API is down: the server restarts every clock once it is back
                logger.warning("could not give session %s a full expiry for the agent's replay: %s", session_id, exc)
            return
        try:
            default_client().delete(f"/sessions/{session_id}")
            logger.info("session %s of the dead serial master deleted: its RUNNING jobs are RUN_TIMEOUT", session_id)
        except Exception as exc:
            if http_status(exc) == 404:
                logger.info("session %s of the dead serial master was already gone", session_id)
            else:
                logger.error("could not delete session %s of the dead serial master (it expires on the server): %s",
                             session_id, exc)

    def _fail_start(self, reason: str) -> None:
        logger.error("serial mode did not start: %s", reason)
        self._record_error(f"serial mode did not start: {reason}", "the start failure")

    def _record_error(self, message: str, what: str) -> None:
        """``message`` in the BatchJob's ``status_info["error"]`` (the log says it already)."""
        batch_job_id = self.context.batch_job_id
        if batch_job_id is None:
            return
        try:
            # api_text: the message quotes host names and MPI output; the server refuses NUL.
            report_batch_job_error(batch_job_id, api_text(message))
        except Exception as exc:  # the log still says why
            logger.warning("could not record %s on BatchJob %s: %s", what, batch_job_id, exc)


def _master_gone(record: Optional[dict[str, Any]]) -> bool:
    """Whether the master that wrote ``record`` (its Session record) is known to have exited: it
    ran on this host and its pid runs no more. A master on another node cannot be looked at: only
    its close, or the wait's end, says."""
    if not record or record.get("host") != socket.gethostname():
        return False
    try:
        return not same_process(int(record["pid"]))
    except (KeyError, TypeError, ValueError):
        return False


def _tail(path: Path, num_lines: int, max_bytes: int = 16384) -> str:
    """The last ``num_lines`` non-empty lines of ``path`` (read from its end), joined with " | "."""
    text = tail_file(path, sys.maxsize, max_bytes=max_bytes)  # every line of the last max_bytes
    # Without the rules of hydra's banner (lines of "=" only), which say nothing.
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("=")]
    return " | ".join(lines[-max(1, num_lines):])
