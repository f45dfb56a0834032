"""The serial-mode program run on every node: rank 0 is the master, the other ranks are workers.

Started by :class:`balsam.launcher.modes.serial.SerialMode` as
``mpiexec -n <nodes> -ppn 1 python -m balsam.launcher.modes.serial_worker <config.json>``.

- Master (rank 0): holds the Session (heartbeat thread), leases runnable single-rank jobs in large
  batches from a background thread (``serial_only``, ``max_wall_time_min`` = time left), places every
  task with one NodeManager over all nodes, starts its own node's tasks and sends the others to their
  rank in one mpi4py message per rank per loop; reports RUNNING / RUN_DONE / RUN_ERROR through the
  BulkStatusUpdater. At wall time, idle timeout or SIGTERM it tells every worker to stop, ends the
  running tasks as RUN_TIMEOUT, flushes the updates and deletes the Session.
- Worker (rank > 0): starts the tasks it is sent, reaps them and sends back
  ``(job_id, returncode, error_tail, end_time)`` batches; on "stop" it terminates its tasks (SIGTERM,
  then SIGKILL after the grace period) and reports which ones it ended.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

TAG_LAUNCH = 11  # master -> worker: {"launch": [task...]} or {"stop": reason}
TAG_REPORT = 12  # worker -> master: {"done": [...], "killed": [...], "final": bool}

logger = logging.getLogger("balsam.launcher.serial")

#: Sleep of an idle-ish loop turn while tasks run (reaping latency); the loop never sleeps after progress.
POLL_SEC = 0.0005


def _setup_logging(path: Path, logging_config: Optional[dict[str, Any]] = None) -> None:
    import types

    from balsam.launcher.entry import configure_logging

    configure_logging(path, types.SimpleNamespace(logging=types.SimpleNamespace(**(logging_config or {}))))


class _Signals:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.wake = threading.Event()
        self.signum: Optional[int] = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        self.event.set()
        self.wake.set()


def _isend_all(comm: Any, requests: list, outbox: dict[int, list]) -> None:
    for rank, tasks in outbox.items():
        if tasks:
            requests.append(comm.isend({"launch": tasks}, dest=rank, tag=TAG_LAUNCH))
    outbox.clear()
    if len(requests) > 64:
        from mpi4py import MPI

        MPI.Request.Waitall(requests)
        requests.clear()


class Master:
    def __init__(self, config: dict[str, Any], comm: Any, signals: _Signals) -> None:
        from balsam.launcher._api import open_updater
        from balsam.launcher.app_run import JobPreparer
        from balsam.launcher.job_mode import Countdown, IdleTimer
        from balsam.launcher.node_manager import NodeManager
        from balsam.launcher.runner import ProcessPool
        from balsam.platform import NodeInfo

        self.config = config
        self.comm = comm
        self.size = comm.Get_size()
        self.signals = signals
        launcher = config["launcher"]
        self.nodes = [NodeInfo(**n) for n in config["nodes"]][: self.size] or [NodeInfo(**config["nodes"][0])]
        self.node_manager = NodeManager(self.nodes, allow_node_packing=True)
        self.countdown = Countdown(config["wall_time_min"], start_time=config["start_time"])
        self.idle_timer = IdleTimer(launcher["idle_ttl_sec"])
        self.delay_sec = float(launcher["delay_sec"])
        #: Set whenever the loop has something to do: a task exited, jobs arrived, a signal came.
        self.wake = signals.wake
        self.pool = ProcessPool(int(launcher["error_tail_num_lines"]), wake=self.wake)
        self.preparer = JobPreparer(Path(config["data_path"]))
        slots = sum(max(1, len(n.cpu_ids)) for n in self.nodes)
        #: Jobs kept leased ahead of the free slots (Balsam 0.7: prefetch per rank), at least 64, at most 2048.
        self.prefetch_depth = max(64, min(2048, int(launcher["serial_mode_prefetch_per_rank"]) * slots))
        self.queue: deque = deque()
        self.remote: dict[int, int] = {}  # job id -> rank
        self.need_more = threading.Event()
        self.source_empty = False
        #: Worth trying to start queued tasks: resources were freed or new jobs arrived since the
        #: last attempt stopped on a full node (resources only change when tasks end).
        self.try_start = True
        self.source: Any = None
        self.source_error: Optional[BaseException] = None
        self.acquire_error: Optional[str] = None
        self.stop_event = threading.Event()
        self.base_env = dict(os.environ)
        self.started = 0
        self.finished = 0
        self.updater = open_updater(config.get("spool_path"))
        # Lease jobs while the rest of the start-up (settings, platform plugin) happens.
        self.acquirer = threading.Thread(target=self._acquirer, name="acquirer", daemon=True)
        self.acquirer.start()

        from balsam.config import SiteConfig, site_platform
        from balsam.launcher.runner import _launch_hook

        try:
            self.site_config = SiteConfig(config["site_path"] or None)
            self.platform = site_platform(self.site_config.settings)
            self.hook = _launch_hook()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Start-up failed: give the leased jobs back now rather than at session expiry."""
        self.stop_event.set()
        self.need_more.set()
        self.acquirer.join(30)
        try:
            self.updater.close()
        finally:
            if self.source is not None:
                self.source.close()

    # -- acquiring (background thread) ---------------------------------------------------------
    def _acquirer(self) -> None:
        from balsam.launcher.app_run import JobBuildError
        from balsam.launcher._api import open_lease
        from balsam.launcher.node_manager import UnsatisfiableJob
        from balsam.launcher.runner import report_failed

        cfg = self.config
        updater = self.updater
        try:
            source = self.source = open_lease(cfg["site_id"], cfg["batch_job_id"], cfg["filter_tags"])
        except BaseException as exc:
            logger.exception("could not create the session")
            self.source_error = exc
            return
        while not self.stop_event.is_set():
            if len(self.queue) >= self.prefetch_depth // 2:
                self.need_more.wait(0.05)
                self.need_more.clear()
                continue
            want = self.prefetch_depth - len(self.queue)
            try:
                jobs = source.acquire(want, max_wall_time_min=self.countdown.remaining_min(), max_nodes_per_job=1, serial_only=True)
                self.acquire_error = None
            except Exception as exc:
                self.acquire_error = str(exc)
                logger.warning("acquire failed (retrying in %.1f s): %s", self.delay_sec, exc)
                self.stop_event.wait(self.delay_sec)
                continue
            for job in jobs:
                try:
                    prepared = self.preparer.prepare(job)
                    self.node_manager.check_satisfiable(prepared.demand)
                except (JobBuildError, UnsatisfiableJob) as exc:
                    logger.error("job %s FAILED: %s", job.id, exc)
                    report_failed(updater, job.id, str(exc))
                    continue
                except Exception as exc:  # keep the acquire thread alive whatever one job holds
                    logger.exception("job %s FAILED while preparing", job.id)
                    report_failed(updater, job.id, f"An exception occurred while preparing the job: {type(exc).__name__}: {exc}")
                    continue
                self.queue.append(prepared)
                if len(self.queue) == 1:  # the loop may be idle-waiting: start this one right away
                    self.try_start = True
                    self.wake.set()
            if jobs:
                self.try_start = True
                self.wake.set()
            self.source_empty = not jobs
            if not jobs:
                self.stop_event.wait(self.delay_sec)

    # -- main loop -----------------------------------------------------------------------------
    def _task_for_remote(self, prepared: Any, env: dict[str, str], cpu_ids: tuple[int, ...]) -> dict[str, Any]:
        from balsam.launcher.app_run import shell_line

        diff = {k: v for k, v in env.items() if self.base_env.get(k) != v}
        return {
            "id": prepared.id,
            "cmd": shell_line(prepared.cmdline, prepared.preamble, prepared.workdir),
            "workdir": str(prepared.workdir),
            "env": diff,
            "unset": [k for k in self.base_env if k not in env],
            "cpu_ids": list(cpu_ids),
        }

    def _start_queued(self, updater: Any, outbox: dict[int, list]) -> int:
        from balsam.launcher.app_run import shell_line
        from balsam.launcher.node_manager import InsufficientResources
        from balsam.launcher.runner import launch_environment, report_failed, report_running

        started = 0
        misses = 0
        queue = self.queue
        self.try_start = False
        full_for: set = set()  # demands that did not fit in this pass: the same demand will not fit either
        while queue and misses < 8:
            prepared = queue.popleft()
            if prepared.demand in full_for:
                queue.append(prepared)
                misses += 1
                continue
            try:
                placement = self.node_manager.assign(prepared.id, prepared.demand)
            except InsufficientResources:
                queue.append(prepared)
                full_for.add(prepared.demand)
                misses += 1
                continue
            rank = placement.node_indexes[0]
            try:
                env = launch_environment(prepared, placement, self.platform, self.hook)
                cpu_ids = placement.cpu_ids[0]
                if rank == 0:
                    self.pool.start(prepared.id, shell_line(prepared.cmdline, prepared.preamble, prepared.workdir),
                                    prepared.workdir, env, cpu_ids)
                else:
                    outbox.setdefault(rank, []).append(self._task_for_remote(prepared, env, cpu_ids))
                    self.remote[prepared.id] = rank
            except Exception as exc:
                self.node_manager.free(prepared.id)
                report_failed(updater, prepared.id, f"An exception occurred while preparing the launch: {type(exc).__name__}: {exc}")
                continue
            report_running(updater, prepared)
            started += 1
        self.started += started
        return started

    def _finish(self, updater: Any, results: list) -> None:
        from balsam.launcher.runner import report_exit

        if results:
            self.try_start = True
        for job_id, rc, tail, when in results:
            self.node_manager.free(job_id)
            self.remote.pop(job_id, None)
            report_exit(updater, job_id, rc, tail, when)
        self.finished += len(results)

    def _receive(self, updater: Any) -> int:
        from mpi4py import MPI

        got = 0
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REPORT, status=status):
            msg = self.comm.recv(source=status.Get_source(), tag=TAG_REPORT)
            self._finish(updater, msg.get("done", []))
            got += len(msg.get("done", []))
        return got

    def _should_stop(self) -> Optional[str]:
        if self.source_error is not None:
            return f"no session: {self.source_error}"
        if self.signals.event.is_set():
            return f"signal {self.signals.signum}"
        if self.countdown.expired:
            return "wall time"
        if self.idle_timer.expired:
            return "idle"
        return None

    def run(self) -> int:
        cfg = self.config
        logger.info("serial master: %d ranks, %d nodes, prefetch %d, stop in %.0f s, filter_tags %s",
                    self.size, len(self.nodes), self.prefetch_depth, self.countdown.remaining_sec(), cfg["filter_tags"])
        updater = self.updater
        requests: list = []
        outbox: dict[int, list] = {}
        reason = "wall time"
        self.idle_timer.busy()  # idle time counts from here, not from the (slow, under load) start-up
        try:
            while True:
                stop = self._should_stop()
                if stop:
                    reason = stop
                    break
                progress = 0
                self.wake.clear()  # before looking: an event from now on makes the next wait return
                done = self.pool.reap()
                if done:
                    self._finish(updater, done)
                    progress += len(done)
                if self.size > 1:
                    progress += self._receive(updater)
                if self.queue and self.try_start:
                    progress += self._start_queued(updater, outbox)
                    if outbox:
                        _isend_all(self.comm, requests, outbox)
                if len(self.queue) < self.prefetch_depth // 2:
                    self.need_more.set()
                busy = bool(self.pool.running or self.remote or self.queue) or not self.source_empty
                if busy:
                    self.idle_timer.busy()
                else:
                    self.idle_timer.idle()
                if not progress:
                    # Remote reports arrive by MPI (polled); local exits and new jobs set `wake`.
                    self.wake.wait(POLL_SEC if self.remote else 0.05)
        finally:
            self.stop_event.set()
            self.need_more.set()
            self._shutdown(updater, reason, requests)
            self.acquirer.join(30)
            try:
                updater.close()
            finally:
                if self.source is not None:
                    self.source.close(retry_count=0) if updater.gave_up else self.source.close()
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        logger.info("serial master done (%s): %d started, %d finished; master CPU %.2f s user + %.2f s system",
                    reason, self.started, self.finished, usage.ru_utime, usage.ru_stime)
        return 0 if self.source_error is None else 1

    def _shutdown(self, updater: Any, reason: str, requests: list) -> None:
        from mpi4py import MPI

        from balsam.launcher.runner import report_exit, report_timeout

        grace = self.countdown.grace_sec
        for rank in range(1, self.size):
            requests.append(self.comm.isend({"stop": reason, "grace": grace}, dest=rank, tag=TAG_LAUNCH))
        victims, finished = self.pool.terminate_all(grace)
        self._finish(updater, finished)
        for job_id in victims:
            self.node_manager.free(job_id)
            report_timeout(updater, job_id, f"launcher stopped ({reason})")
        pending_final = set(range(1, self.size))
        deadline = time.monotonic() + grace + 10
        status = MPI.Status()
        while pending_final and time.monotonic() < deadline:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REPORT, status=status):
                src = status.Get_source()
                msg = self.comm.recv(source=src, tag=TAG_REPORT)
                self._finish(updater, msg.get("done", []))
                for job_id in msg.get("killed", []):
                    self.remote.pop(job_id, None)
                    report_timeout(updater, job_id, f"launcher stopped ({reason})")
                if msg.get("final"):
                    pending_final.discard(src)
            else:
                time.sleep(0.01)
        for job_id in list(self.remote):
            report_timeout(updater, job_id, f"launcher stopped ({reason}); worker did not report")
        if pending_final:
            logger.error("workers %s did not confirm their stop", sorted(pending_final))
        if victims:
            logger.info("%d local tasks ended as RUN_TIMEOUT (%s)", len(victims), reason)


class Worker:
    def __init__(self, config: dict[str, Any], comm: Any, signals: _Signals, error_tail_num_lines: int = 10) -> None:
        from balsam.launcher.runner import ProcessPool

        self.comm = comm
        self.signals = signals
        self.pool = ProcessPool(error_tail_num_lines, wake=signals.wake)
        self.base_env = dict(os.environ)

    def _env(self, task: dict[str, Any]) -> dict[str, str]:
        env = dict(self.base_env)
        for key in task.get("unset", ()):
            env.pop(key, None)
        env.update(task["env"])
        return env

    def run(self) -> int:
        comm = self.comm
        requests: list = []
        signal_time: Optional[float] = None
        while True:
            self.signals.wake.clear()
            if comm.Iprobe(source=0, tag=TAG_LAUNCH):
                msg = comm.recv(source=0, tag=TAG_LAUNCH)
                if "stop" in msg:
                    victims, finished = self.pool.terminate_all(float(msg.get("grace", 5)))
                    comm.send({"done": finished, "killed": victims, "final": True}, dest=0, tag=TAG_REPORT)
                    logger.info("worker stopped (%s): %d tasks ended", msg["stop"], len(victims))
                    return 0
                for task in msg.get("launch", ()):
                    self.pool.start(task["id"], task["cmd"], task["workdir"], self._env(task), task.get("cpu_ids", ()))
                continue
            done = self.pool.reap()
            if done:
                requests.append(comm.isend({"done": done}, dest=0, tag=TAG_REPORT))
                if len(requests) > 64:
                    from mpi4py import MPI

                    MPI.Request.Waitall(requests)
                    requests.clear()
                continue
            if self.signals.event.is_set():
                # The master got the same signal and will send "stop"; fend for ourselves if it does not.
                signal_time = signal_time or time.monotonic()
                if time.monotonic() - signal_time > 30:
                    victims, finished = self.pool.terminate_all(5)
                    logger.error("no stop message from the master 30 s after a signal; %d tasks killed", len(victims))
                    return 1
            # Messages from the master are polled; task exits set `wake` at once.
            self.signals.wake.wait(POLL_SEC if self.pool.running else 0.002)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m balsam.launcher.modes.serial_worker CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    signals = _Signals()
    signals.install()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    log_dir = Path(config["log_path"])
    base = f"serial_mode_{config['timestamp']}.{config['partition_index']}"
    if rank == 0:
        _setup_logging(log_dir / f"{base}.master.log", config.get("logging"))
        try:
            return Master(config, comm, signals).run()
        except Exception:
            logger.exception("serial master failed")
            for r in range(1, comm.Get_size()):
                comm.isend({"stop": "master failed", "grace": 5}, dest=r, tag=TAG_LAUNCH)
            return 1
    _setup_logging(log_dir / f"{base}.{socket.gethostname()}.{rank}.log", config.get("logging"))
    try:
        return Worker(config, comm, signals, int(config.get("error_tail_num_lines", 10))).run()
    except Exception:
        logger.exception("serial worker failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
