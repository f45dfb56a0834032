"""Every option of balsam's own commands has a help line, and the --site / -h helps say what the code does."""

from __future__ import annotations

import click
from click.testing import CliRunner


def _commands(cmd: click.Command, path: list[str]):
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _commands(sub, path + [name])
    else:
        yield path, cmd


def _help(*args: str) -> str:
    from balsam.cli import main

    result = CliRunner().invoke(main, [*args, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_every_option_of_balsams_own_commands_has_help():
    from balsam.cli import main

    missing = [
        f"{' '.join(path)} {'/'.join(p.opts)}"
        for path, cmd in _commands(main, ["balsam"])
        if (getattr(cmd.callback, "__module__", "") or "").startswith("balsam.")  # not third-party plugins
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not p.help
    ]
    assert missing == []


def test_site_helps_match_each_commands_rules():
    assert "One site: this, or an id, name or path fragment (default: this site)" in _help("queue", "submit")
    term = _help("queue", "term")
    assert "(default: every site)" in term and "active sites" not in term
    assert "(default: this site, else active sites)" in _help("queue", "ls")
    assert "Delete every job of the selected sites (no --site: the site you are in" in _help("job", "rm")
    assert "site init/sync/mv/rename" in _help("site", "ls")


def test_queue_ls_h_is_history_and_says_so():
    text = _help("queue", "ls")
    assert "-h, --history" in text and "-h here means --history, as in Balsam 0.7" in text
    assert "--scheduler-id INTEGER" in text and "--scheduler_id" not in text
