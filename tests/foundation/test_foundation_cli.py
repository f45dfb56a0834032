"""The `balsam` root group: --version, plugin command groups, one-line errors, broken command modules."""

from __future__ import annotations

import click
from click.testing import CliRunner

import balsam
from balsam.builtin import core_plugin
from balsam.cli import BalsamGroup, main

from foundation_helpers import run_balsam


def test_version():
    result = run_balsam("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"balsam, version {balsam.__version__}"


def test_help_lists_core_and_plugin_commands():
    result = run_balsam("--help")
    assert result.returncode == 0, result.stderr
    for name in ("plugins", "site", "testplugin"):
        assert f"  {name} " in result.stdout


def test_hook_balsam_cli_commands(fresh_plugins):
    result = CliRunner().invoke(main, ["testplugin", "hello", "--name", "balsam"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello balsam\n"


def test_errors_are_one_line_and_exit_1():
    result = run_balsam("plugins", "show", "nothing-by-this-name")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: no plugin, driver or distribution named 'nothing-by-this-name'")
    assert result.stderr.count("\n") == 1


def test_traceback_on_request():
    result = run_balsam("plugins", "show", "nothing-by-this-name", env={"BALSAM_CLI_TRACEBACK": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "balsam.plugins.report.PluginError: no plugin, driver or distribution named" in result.stderr


def test_unexpected_exceptions_are_one_line_too(monkeypatch):
    group = BalsamGroup(name="balsam")
    group._plugins_attached = True  # only the command below

    @group.command("boom")
    def boom():
        {}["missing"]

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 1
    assert result.output == "Error: KeyError: 'missing'\n"
    monkeypatch.setenv("BALSAM_CLI_TRACEBACK", "1")
    result = CliRunner().invoke(group, ["boom"])
    assert isinstance(result.exception, KeyError)


def test_broken_command_module_is_reported_and_the_rest_works(fresh_plugins, monkeypatch):
    monkeypatch.setattr(
        core_plugin, "CORE_COMMAND_MODULES", ["balsam.cli.no_such_module", *core_plugin.CORE_COMMAND_MODULES]
    )
    group = BalsamGroup(name="balsam")
    result = CliRunner().invoke(group, ["plugins", "ls"])
    assert result.exit_code == 0
    problem = (
        "balsam: commands of balsam.cli.no_such_module are unavailable "
        "(ModuleNotFoundError: No module named 'balsam.cli.no_such_module')"
    )
    assert problem in result.output
    assert "scheduler" in result.output and "local" in result.output


def test_attach_command_modules_reports_a_module_without_commands(capsys):
    group = BalsamGroup(name="balsam")
    group._plugins_attached = True
    problems = core_plugin.attach_command_modules(group, ["balsam.cli.plugins", "balsam.config.paths"])
    assert "plugins" in group.commands
    assert problems == [
        "balsam: commands of balsam.config.paths are unavailable "
        "(AttributeError: module 'balsam.config.paths' has no attribute 'commands')"
    ]
    assert capsys.readouterr().err == problems[0] + "\n"


def test_duplicate_command_names_are_reported_not_replaced(capsys):
    group = BalsamGroup(name="balsam")
    group._plugins_attached = True
    first = click.Command("x", callback=lambda: click.echo("first"))
    second = click.Command("x", callback=lambda: click.echo("second"))
    group.add_command(first)
    group._current_plugin = "other"
    group.add_command(second)
    assert group.commands["x"] is first
    assert group.problems == ["plugin 'other' tried to add command 'x', which already exists; kept the first one"]
    assert "kept the first one" in capsys.readouterr().err


def test_a_plugin_whose_hook_raises_does_not_break_the_cli(fresh_plugins):
    from balsam.plugins import hookimpl
    from balsam.plugins.manager import get_plugin_manager

    class Raising:
        @hookimpl
        def balsam_cli_commands(self, cli):
            raise RuntimeError("no commands today")

    get_plugin_manager().add_plugin(Raising(), name="raising")
    group = BalsamGroup(name="balsam")
    result = CliRunner().invoke(group, ["plugins", "ls", "--kind", "platform"])
    assert result.exit_code == 0
    assert "balsam: plugin 'raising' could not add its commands: no commands today" in result.output
    assert "default" in result.output
