"""Recorded scheduler output and a command runner that replays it.

A scheduler driver never runs a command itself: it renders a :class:`~balsam.scheduler.Command` and
parses a :class:`~balsam.scheduler.CommandResult`, and an injected runner does the running. In tests
that runner is a :class:`ReplayRunner` answering each program (``sbatch``, ``squeue`` ...) from
recorded real output, so every render/parse pair is checked without a batch system.

Recorded files follow one naming rule (:func:`load_recorded`): ``NAME`` or ``NAME.txt`` is the
standard output of a successful command; ``NAME.stdout.txt`` / ``NAME.stderr.txt`` /
``NAME.rc.txt`` hold the three parts of a failed one (each optional). Record with exactly the
command line the driver renders, and say in a README next to the files where they came from.

Example::

    from balsam.testing import ReplayRunner, load_recorded, result

    runner = ReplayRunner({"squeue": load_recorded(DATA, "squeue_all"),
                           "sacct": result(stderr="sacct: error: slurmdbd down", returncode=1)})
    slurm = SlurmScheduler(runner, user="root")
    assert set(slurm.get_statuses(NOW)) == {2, 5}
    assert runner.programs() == ["squeue"]
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from balsam.scheduler import Command, CommandResult

__all__ = ["Answer", "ReplayRunner", "load_recorded", "result", "utc"]

#: What a ReplayRunner answers for one program: a fixed result, or a function of the command.
Answer = Union[CommandResult, Callable[[Command], CommandResult]]


def result(args: tuple = ("cmd",), stdout: str = "", stderr: str = "", returncode: int = 0) -> CommandResult:
    """A CommandResult in one call (defaults: exit code 0, no output)."""
    return CommandResult(tuple(args), returncode, stdout, stderr)


def utc(*parts: int) -> dt.datetime:
    """``utc(2026, 11, 22, 5, 43)``: an aware UTC datetime (parse_status takes one as ``now``)."""
    return dt.datetime(*parts, tzinfo=dt.timezone.utc)


def _read(path: Path) -> str:
    # Recorded output may hold stray bytes (job names, hostnames): read it as the runner does.
    return path.read_bytes().decode("utf-8", errors="replace")


def load_recorded(directory: Union[str, Path], name: str, args: tuple = ("cmd",)) -> CommandResult:
    """The recorded result ``name`` in ``directory``.

    ``NAME`` or ``NAME.txt`` alone: stdout of a command that exited 0. Otherwise
    ``NAME.stdout.txt``, ``NAME.stderr.txt`` and ``NAME.rc.txt`` (exit code, default 1 when a
    stderr file exists, else 0). A name with none of these files is a FileNotFoundError (a typo in
    a test must not pass as "empty output").
    """
    directory = Path(directory)
    for plain in (directory / name, directory / f"{name}.txt"):
        if plain.is_file():
            return CommandResult(tuple(args), 0, _read(plain), "")
    parts = {part: directory / f"{name}.{part}.txt" for part in ("stdout", "stderr", "rc")}
    if not any(p.is_file() for p in parts.values()):
        raise FileNotFoundError(f"no recorded output {name!r} in {directory}")
    stdout = _read(parts["stdout"]) if parts["stdout"].is_file() else ""
    stderr = _read(parts["stderr"]) if parts["stderr"].is_file() else ""
    if parts["rc"].is_file():
        returncode = int(parts["rc"].read_text().strip() or 0)
    else:
        returncode = 1 if parts["stderr"].is_file() else 0
    return CommandResult(tuple(args), returncode, stdout, stderr)


class ReplayRunner:
    """A CommandRunner that answers each command, by program name (``args[0]``), from a table of
    results or functions of the command, and remembers what it was asked to run.

    ``default`` answers every program missing from the table; without it, a missing program is
    answered as a shell would (exit 127, "command not found"), so a driver that runs something
    unexpected fails visibly.
    """

    def __init__(self, answers: Mapping[str, Answer], *, default: Optional[Answer] = None) -> None:
        self.answers = dict(answers)
        self.default = default
        self.calls: list[Command] = []

    def __call__(self, command: Command) -> CommandResult:
        self.calls.append(command)
        answer = self.answers.get(command.args[0], self.default)
        if answer is None:
            return CommandResult(tuple(command.args), 127, "", f"{command.args[0]}: command not found (ReplayRunner)")
        return answer(command) if callable(answer) else CommandResult(tuple(command.args), answer.returncode,
                                                                      answer.stdout, answer.stderr)

    def programs(self) -> list[str]:
        """The programs run so far, in order."""
        return [c.args[0] for c in self.calls]
