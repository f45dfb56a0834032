"""Shared helpers of the scheduler driver tests: recorded outputs and a replaying command runner."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable, Optional

from balsam.scheduler import Command, CommandResult

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def recorded(scheduler: str, name: str) -> str:
    path = DATA / scheduler / name
    return path.read_bytes().decode("utf-8", errors="replace") if path.exists() else ""


def result(args: tuple = ("cmd",), stdout: str = "", stderr: str = "", returncode: int = 0) -> CommandResult:
    return CommandResult(tuple(args), returncode, stdout, stderr)


def utc(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=dt.timezone.utc)


class ReplayRunner:
    """A CommandRunner that answers each command (by program name) from a table of recorded
    results, and remembers what it was asked to run."""

    def __init__(self, answers: dict[str, CommandResult | Callable[[Command], CommandResult]]) -> None:
        self.answers = answers
        self.calls: list[Command] = []

    def __call__(self, command: Command) -> CommandResult:
        self.calls.append(command)
        answer = self.answers[command.args[0]]
        return answer(command) if callable(answer) else answer

    def programs(self) -> list[str]:
        return [c.args[0] for c in self.calls]

