"""The scheduler driver contract (entry-point group ``balsam.schedulers``).

A scheduler is a set of *pure* functions that render each command (submit, status, delete, history,
backfill, project discovery) and parse its output, plus an injected :class:`CommandRunner` that
actually runs them. Tests feed recorded real outputs to the ``parse_*`` functions and run the whole
driver against a fake ``qsub``/``squeue`` on PATH; the agent never sees an exception from a driver
method other than :class:`SchedulerError` (whose message goes into ``BatchJob.status_info``).

Subclasses implement the ``render_*``/``parse_*`` pairs; the orchestration methods (``submit``,
``get_statuses`` ...) are shared and should rarely need overriding.
"""

from __future__ import annotations

import abc
import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Protocol

import attrs

from .models import BackfillWindow, SchedulerJobStatus
from .options import NoOptions, build_options
from .states import BatchJobState

__all__ = [
    "BackfillWindow",
    "Command",
    "CommandResult",
    "CommandRunner",
    "JobHistory",
    "Scheduler",
    "SchedulerError",
    "SchedulerJobStatus",
    "SubmitRequest",
    "subprocess_runner",
]


class SchedulerError(Exception):
    """A scheduler command failed or printed something we cannot read.

    The message is one line meant for users (it is stored in ``BatchJob.status_info["error"]``).
    ``permanent`` says whether retrying the same request is pointless (e.g. the scheduler refused a
    submission because the queue does not exist) or may work later (a timeout, a daemon restart).
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@attrs.frozen
class Command:
    """A command line to run, with extra environment variables (merged over ``os.environ``)."""

    args: tuple[str, ...] = attrs.field(converter=tuple)
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: Optional[Path] = None
    timeout: float = 60.0
    #: Variables removed from the inherited environment (e.g. a user's SQUEUE_FORMAT or
    #: SQUEUE_PARTITION, which would change what the command prints).
    unset_env: tuple[str, ...] = attrs.field(converter=tuple, default=())


@attrs.frozen
class CommandResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """One line: the command, its exit code and the first line of what it said."""
        said = (self.stderr.strip() or self.stdout.strip()).splitlines()
        first = said[0] if said else "no output"
        return f"`{' '.join(self.args[:1])}` exited {self.returncode}: {first}"


class CommandRunner(Protocol):
    def __call__(self, command: Command) -> CommandResult: ...


def subprocess_runner(command: Command) -> CommandResult:
    """Run a command for real. A missing executable or a timeout comes back as a SchedulerError."""
    env = {**os.environ, **command.env}
    for name in command.unset_env:
        env.pop(name, None)
    try:
        proc = subprocess.run(
            list(command.args),
            env=env,
            cwd=command.cwd,
            capture_output=True,
            encoding="utf-8",
            errors="replace",  # one stray byte in a job name must not make the whole output unreadable
            timeout=command.timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise SchedulerError(f"`{command.args[0]}` was not found on PATH", permanent=True) from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"`{command.args[0]}` did not answer within {command.timeout:.0f} s") from None
    return CommandResult(tuple(command.args), proc.returncode, proc.stdout, proc.stderr)


@attrs.frozen
class SubmitRequest:
    """Everything a scheduler needs to submit one BatchJob's rendered script."""

    script_path: Path
    project: str
    queue: str
    num_nodes: int
    wall_time_min: int
    job_name: str = "balsam"
    optional_params: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class JobHistory:
    """What the scheduler's history/accounting says about a job that left the queue."""

    scheduler_id: int
    state: BatchJobState  # finished, or submit_failed when the scheduler never ran it
    start_time: Optional[dt.datetime] = None
    end_time: Optional[dt.datetime] = None
    #: The scheduler's own final state and reason, e.g. "TIMEOUT" or "CANCELLED by 0".
    native_state: str = ""
    message: str = ""


class Scheduler(abc.ABC):
    """Base class of scheduler drivers. Subclasses set ``name`` and implement render/parse pairs."""

    #: The driver name used in ``settings.yml`` (``scheduler: {name: slurm}``).
    name: ClassVar[str] = ""
    #: The Jinja2 text of the default ``job-template.sh`` for this scheduler (see docs/job-template.md).
    default_job_template: ClassVar[str] = ""
    #: How many consecutive failed status polls are tolerated before BatchJobs are marked failed.
    status_error_threshold: ClassVar[int] = 3
    #: The attrs class of this driver's options (``scheduler.options`` in settings.yml); see balsam.options.
    options_schema: ClassVar[type] = NoOptions

    def __init__(
        self, runner: CommandRunner = subprocess_runner, *, user: Optional[str] = None, options: Any = None
    ) -> None:
        self.options = build_options(self.options_schema, options, where="scheduler.options")
        self.runner = runner
        self.user = user or os.environ.get("USER") or _current_user()

    # -- pure render/parse pairs (override these) ----------------------------------------------
    @abc.abstractmethod
    def render_submit(self, request: SubmitRequest) -> Command:
        ...

    @abc.abstractmethod
    def parse_submit(self, result: CommandResult) -> int:
        ...

    @abc.abstractmethod
    def render_status(self, user: str) -> Command:
        ...

    @abc.abstractmethod
    def parse_status(self, result: CommandResult, now: dt.datetime) -> dict[int, SchedulerJobStatus]:
        ...

    @abc.abstractmethod
    def render_delete(self, scheduler_id: int) -> Command:
        ...

    def parse_delete(self, result: CommandResult, scheduler_id: int) -> None:
        if result.returncode != 0:
            raise SchedulerError(f"could not delete job {scheduler_id}: {result.describe()}")

    def render_history(self, scheduler_id: int, script_path: Optional[Path]) -> Optional[Command]:
        """The command that reads a finished job's record, or None when the record is a file."""
        return None

    def parse_history(
        self, result: Optional[CommandResult], scheduler_id: int, script_path: Optional[Path]
    ) -> Optional[JobHistory]:
        """Parse the history record; None means "the scheduler does not know this job (yet)"."""
        return JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished)

    def render_backfill(self) -> Optional[Command]:
        return None

    def parse_backfill(self, result: CommandResult) -> dict[str, list[BackfillWindow]]:
        return {}

    def render_discover_projects(self) -> Optional[Command]:
        return None

    def parse_discover_projects(self, result: CommandResult) -> list[str]:
        return []

    # -- orchestration through the injected runner -------------------------------------------
    # Every method below raises only SchedulerError: a parser that trips over output nobody
    # anticipated must not take the agent down (see _guard).
    def run(self, command: Command) -> CommandResult:
        return self.runner(command)

    def submit(self, request: SubmitRequest) -> int:
        with _guard(self, "submit"):
            result = self.run(self.render_submit(request))
            return self.parse_submit(result)

    def get_statuses(self, now: Optional[dt.datetime] = None) -> dict[int, SchedulerJobStatus]:
        """One bulk poll of all the user's jobs. Raises SchedulerError when the poll itself failed."""
        now = now or dt.datetime.now(dt.timezone.utc)
        with _guard(self, "status poll"):
            return self.parse_status(self.run(self.render_status(self.user)), now)

    def delete_job(self, scheduler_id: int) -> None:
        with _guard(self, f"delete of job {scheduler_id}"):
            self.parse_delete(self.run(self.render_delete(scheduler_id)), scheduler_id)

    def get_history(self, scheduler_id: int, script_path: Optional[Path] = None) -> Optional[JobHistory]:
        with _guard(self, f"history lookup of job {scheduler_id}"):
            command = self.render_history(scheduler_id, script_path)
            result = self.run(command) if command is not None else None
            return self.parse_history(result, scheduler_id, script_path)

    def get_histories(self, jobs: Mapping[int, Optional[Path]]) -> dict[int, Optional[JobHistory]]:
        """History of several jobs that left the queue: ``{scheduler_id: script_path}`` in,
        ``{scheduler_id: JobHistory or None}`` out (None: not known yet, or still active).

        Drivers whose history command accepts several ids (sacct, qstat -x) override this with one
        command; the default asks job by job. Raises SchedulerError when the lookup failed.
        """
        return {scheduler_id: self.get_history(scheduler_id, path) for scheduler_id, path in jobs.items()}

    def get_backfill_windows(self) -> dict[str, list[BackfillWindow]]:
        with _guard(self, "backfill query"):
            command = self.render_backfill()
            if command is None:
                return {}
            return self.parse_backfill(self.run(command))

    def discover_projects(self) -> list[str]:
        with _guard(self, "project discovery"):
            command = self.render_discover_projects()
            if command is None:
                return []
            return self.parse_discover_projects(self.run(command))


class _guard:
    """Turn anything but a SchedulerError raised inside the block into a one-line SchedulerError."""

    def __init__(self, scheduler: "Scheduler", what: str) -> None:
        self.scheduler = scheduler
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, SchedulerError) or not isinstance(exc, Exception):
            return False
        name = self.scheduler.name or type(self.scheduler).__name__
        raise SchedulerError(f"{name} {self.what} failed: {type(exc).__name__}: {exc}") from exc


def _current_user() -> str:
    import getpass

    return getpass.getuser()


# Helpers shared by scheduler drivers ------------------------------------------------------------


def format_walltime(wall_time_min: int) -> str:
    """Minutes -> ``HH:MM:00`` (hours may exceed 24, as PBS and Cobalt accept)."""
    return f"{wall_time_min // 60:02d}:{wall_time_min % 60:02d}:00"

