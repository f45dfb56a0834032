"""The core's own hook plugin (entry point ``balsam.plugins: core``).

It attaches the core command modules to the ``balsam`` CLI (third-party plugins use the same
hook). The settings.yml sections of the built-in agent modules are the modules' own
``options_schema`` (see balsam.config.sections).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from balsam.plugins.hookspecs import hookimpl

#: Modules whose ``commands`` list (click commands or groups) is added to ``balsam``.
#: Engineers add their module here with a one-line edit once it exists.
CORE_COMMAND_MODULES: list[str] = [
    "balsam.cli.plugins",
    "balsam.cli.site",
    "balsam.demo",
    "balsam.cli.launcher",
    "balsam.cli.server",
    "balsam.cli.auth",
    "balsam.cli.app",
    "balsam.cli.job",
    "balsam.cli.transfer",
    "balsam.cli.queue",
    "balsam.cli.dashboard",
    "balsam.cli.analytics",
]


def attach_command_modules(cli: Any, module_names: list[str]) -> list[str]:
    """Add each module's ``commands`` to ``cli``; a module that fails is reported on one line.

    Returns the problems (also printed on stderr) so callers and tests can see them.
    """
    problems = []
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
            commands = list(getattr(module, "commands"))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
            problems.append(f"balsam: commands of {module_name} are unavailable ({detail})")
            continue
        for command in commands:
            cli.add_command(command)
    for problem in problems:
        click.echo(problem, err=True)
    return problems


@hookimpl
def balsam_cli_commands(cli: Any) -> None:
    attach_command_modules(cli, CORE_COMMAND_MODULES)

