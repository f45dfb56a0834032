"""The ``local`` scheduler: runs batch scripts as background processes of this machine.

Queue ``local``, project ``local``. Behind it is a small command
(``python -m balsam.builtin.local_queue``) that keeps job records in a state directory
(``$BALSAM_LOCAL_SCHEDULER_DIR``, default ``$BALSAM_HOME/local-scheduler``), so this driver is a
set of render/parse pairs like every other scheduler, its commands go through the injected runner,
and a restarted agent still knows the jobs it submitted. Only those jobs are ever reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from balsam.builtin.local_queue import EXIT_NO_ROOM
from balsam.config.paths import balsam_home
from balsam.models import SchedulerJobStatus
from balsam.scheduler import (
    Command,
    CommandResult,
    CommandRunner,
    JobHistory,
    Scheduler,
    PolledStatuses,
    SchedulerError,
    StatusPoll,
    SubmitRequest,
    subprocess_runner,
)
from balsam.states import BatchJobState

__all__ = ["LocalScheduler", "default_state_dir"]

STATE_DIR_ENV = "BALSAM_LOCAL_SCHEDULER_DIR"



def default_state_dir() -> Path:
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else balsam_home() / "local-scheduler"


def _utc(epoch: Optional[float]) -> Optional[dt.datetime]:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


def _start_time(value: Any) -> Optional[dt.datetime]:
    """A status entry's ``start_time`` (epoch seconds) -> aware UTC; None when absent or not a
    time (a hand-edited or garbled record): the job is still listed, with no start of its own."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    except (ValueError, OverflowError, OSError):  # NaN, inf, a year past 9999
        return None


class LocalScheduler(Scheduler):
    """Batch scripts run at once as local background processes; SIGTERM then SIGKILL on delete."""

    name = "local"
    description = "Runs batch scripts as background processes of this machine (queue and project 'local')"
    # default_job_template stays empty: the site's generic template (balsam.site.job_template) fits.
    status_error_threshold = 3

    def __init__(
        self,
        runner: CommandRunner = subprocess_runner,
        *,
        user: Optional[str] = None,
        state_dir: Optional[os.PathLike] = None,
        options: Any = None,
    ) -> None:
        super().__init__(runner, user=user, options=options)
        # absolute(), not resolve(): a symlink followed once here, at the agent's start, would turn a
        # link whose target later goes away (an unmounted scratch area) into a plain missing
        # directory, which the local queue answers as "no jobs yet" (its running jobs taken as gone).
        self.state_dir = Path(state_dir).expanduser().absolute() if state_dir else default_state_dir()

    def _queue_command(self, *args: str, cwd: Optional[Path] = None) -> Command:
        return Command(
            args=(sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", str(self.state_dir), *args),
            cwd=cwd,
            timeout=60.0,
        )

    @staticmethod
    def _check(result: CommandResult, what: str, *, permanent: bool = False) -> None:
        if result.returncode != 0:
            said = (result.stderr.strip() or result.stdout.strip()).splitlines()
            text = said[-1] if said else f"exit status {result.returncode}"
            # 2: the queue refused for good; EXIT_NO_ROOM: its state directory is full or over
            # quota, nothing was started (the agent waits for room rather than count a try).
            raise SchedulerError(f"local scheduler could not {what}: {text}",
                                 permanent=permanent or result.returncode == 2,
                                 no_room=result.returncode == EXIT_NO_ROOM)

    # -- submit ---------------------------------------------------------------------------------
    def render_submit(self, request: SubmitRequest) -> Command:
        if request.num_nodes > 1:
            raise SchedulerError(
                f"the local scheduler runs on this machine only: asked for {request.num_nodes} nodes (max 1)",
                permanent=True,
            )
        args = [
            "submit",
            str(Path(request.script_path).resolve()),
            "--queue",
            request.queue,
            "--project",
            request.project,
            "--nodes",
            str(request.num_nodes),
            "--walltime",
            str(request.wall_time_min),
            "--name",
            request.job_name,
        ]
        return self._queue_command(*args, cwd=Path(request.script_path).resolve().parent)

    def parse_submit(self, result: CommandResult) -> int:
        self._check(result, "submit the batch script")
        text = result.stdout.strip()
        if not text.isdecimal():
            raise SchedulerError(f"local scheduler printed no job id after submitting (got {text[:80]!r})")
        return int(text)


    # -- status ---------------------------------------------------------------------------------
    def render_status(self, user: str) -> Command:
        return self._queue_command("status")

    def parse_status(self, result: CommandResult, now: dt.datetime) -> PolledStatuses:
        """The queue's running jobs, with their start times (``start_time``, epoch seconds; a
        listing from before it had one, or a value that is not a time, gives no start)."""
        self._check(result, "list its jobs")
        try:
            listing = json.loads(result.stdout or "{}")
        except json.JSONDecodeError as exc:
            raise SchedulerError(f"local scheduler status is not JSON ({exc.msg} at char {exc.pos})") from None
        if not isinstance(listing, dict):
            raise SchedulerError("local scheduler status is not a JSON object")
        statuses = {}
        start_times: dict[int, dt.datetime] = {}
        for key, item in listing.items():
            try:
                job_id = int(key)
                wall = int(item["wall_time_min"])
                elapsed_min = int(float(item.get("elapsed_sec", 0)) // 60)
                statuses[job_id] = SchedulerJobStatus(
                    scheduler_id=job_id,
                    state=BatchJobState.running if item.get("state") == "running" else BatchJobState.queued,
                    queue=str(item["queue"]),
                    num_nodes=int(item["num_nodes"]),
                    wall_time_min=wall,
                    project=str(item["project"]),
                    time_remaining_min=max(wall - elapsed_min, 0),
                    queued_time_min=int(float(item.get("queued_sec", 0)) // 60),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise SchedulerError(f"local scheduler status entry {key!r} is malformed ({exc})") from None
            started = _start_time(item.get("start_time"))
            if started is not None and statuses[job_id].state is BatchJobState.running:
                start_times[job_id] = started
        return PolledStatuses(statuses, start_times=start_times)

    # -- find an earlier submission -------------------------------------------------------------
    def render_find(self, request: SubmitRequest, user: str) -> Optional[Command]:
        return self._queue_command("find", str(Path(request.script_path).resolve()), "--name", request.job_name)

    def parse_find(self, result: CommandResult, request: SubmitRequest) -> list[int]:
        self._check(result, "look up its jobs")
        try:
            ids = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise SchedulerError(f"local scheduler job lookup is not JSON ({exc.msg})") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise SchedulerError("local scheduler job lookup is not a list of job ids")
        return ids

    # -- delete ---------------------------------------------------------------------------------
    def render_delete(self, scheduler_id: int) -> Command:
        return self._queue_command("delete", str(int(scheduler_id)))

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        self._check(result, f"delete job {scheduler_id}")

    # -- history --------------------------------------------------------------------------------
    def render_histories(self, jobs: Mapping[int, Optional[Path]]) -> Optional[Command]:
        return self._queue_command("history", *(str(int(i)) for i in jobs))

    def parse_histories(
        self, result: Optional[CommandResult], jobs: Mapping[int, Optional[Path]], last_poll: StatusPoll
    ) -> dict[int, Optional[JobHistory]]:
        if result is None:
            raise SchedulerError("local scheduler history was not read")
        self._check(result, "read the records of its jobs")
        try:
            records = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise SchedulerError(f"local scheduler history is not JSON ({exc.msg})") from None
        if not isinstance(records, dict):
            raise SchedulerError("local scheduler history is not a JSON object")
        return {scheduler_id: self._history(scheduler_id, records.get(str(scheduler_id))) for scheduler_id in jobs}

    @staticmethod
    def _history(scheduler_id: int, record: Any) -> Optional[JobHistory]:
        if not isinstance(record, dict) or record.get("state") != "finished":
            return None  # never heard of, or still running: no history yet
        native = str(record.get("native_state", "COMPLETED"))
        message = str(record.get("message", ""))
        if "exit_code" in record and not message:
            message = f"exit status {record['exit_code']}"
        return JobHistory(
            scheduler_id=scheduler_id,
            state=BatchJobState.finished,
            start_time=_utc(record.get("start_time")),
            end_time=_utc(record.get("end_time")),
            native_state=native,
            message=message,
        )
