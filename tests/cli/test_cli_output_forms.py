"""What a docs walkthrough found in the CLI's output, as printed.

- `balsam init ~/myWorkflow` (0.x) answered `balsam site init PATH -n NAME` and `cd PATH && balsam
  site start`: pasted as printed, that created a directory named PATH. It names the user's path now.
- `balsam site stop` / `sync` redrew their progress counter each second with '\\r' also into a log or
  a pipe: one line of 20-40 fragments. Off a terminal each line is printed on its own, when its
  words change or every 10 s; on a terminal it is still redrawn in place.
- `balsam site init`'s platform menu lost its alignment from item 10) on.

The clock of site_commands is a fake one (its sleeps advance it), so waits are counted, not timed."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.cli.site_commands as site_commands
from balsam.cli import main

SITE_ID = 3


# --- 1. `balsam init PATH` (0.x) ----------------------------------------------------------------

def test_0x_init_names_the_users_own_path() -> None:
    result = CliRunner().invoke(main, ["init", "~/myWorkflow"])
    assert result.exit_code == 2, result.output
    path = shlex.quote(str(Path.home() / "myWorkflow"))
    assert f"Use instead:\n  balsam site init {path}\n" in result.output, result.output
    assert f"Note: then `cd {path} && balsam site start`" in result.output, result.output
    # site init names the site after its directory: no -n to fill in, no placeholder left
    assert "PATH" not in result.output and "-n NAME`" not in result.output


def test_0x_init_path_is_shell_quoted_and_its_0x_options_listed() -> None:
    result = CliRunner().invoke(main, ["init", "--db-type", "postgres", "my flows/wf 1"])
    assert result.exit_code == 2, result.output
    assert "  balsam site init 'my flows/wf 1'\n" in result.output, result.output
    assert "then `cd 'my flows/wf 1' && balsam site start`" in result.output
    assert "(no equivalent for --db-type)" in result.output


# --- 2. progress lines of `site stop` / `site sync` ---------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def stop(monkeypatch, tmp_path):
    """`balsam site stop` on a site whose agent takes ``stops_after`` s to stop (reported every
    0.2 s as stop_agent does), after ``marked``: the BatchJobs `balsam queue term` marked as each
    read lists them (None: no agent to wait for); ``tty``: whether stderr is a terminal."""
    import balsam.site.agent
    import balsam.site.site_ops

    clock = Clock()

    def stop_agent(path, *, timeout, force, progress=None, echo=None):
        elapsed = 0.0
        while elapsed < run.stops_after:
            progress(elapsed, timeout)
            clock.sleep(0.2)
            elapsed += 0.2
        return 4242

    class Marked:
        retry_count = 10

        def get(self, path, params=None, deadline=None):
            self.reads = getattr(self, "reads", 0) + 1
            rows = [{"id": i, "state": "pending_deletion", "scheduler_id": 100 + i, "status_info": {}}
                    for i in run.marked(self.reads)]
            return {"count": len(rows), "results": rows}

    def run(*, tty: bool, stops_after: float = 0.0, marked=None, columns: int = 200):
        run.stops_after, run.marked = stops_after, marked
        settings = SimpleNamespace(sections={"scheduler": SimpleNamespace(sync_period=30)})
        monkeypatch.setattr(site_commands, "_stderr_tty", lambda: tty, raising=False)
        monkeypatch.setattr(site_commands, "_terminal_columns", lambda: columns, raising=False)
        monkeypatch.setattr(site_commands, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
        monkeypatch.setattr(site_commands, "_site_path", lambda path: tmp_path)
        monkeypatch.setattr(site_commands, "_site_config", lambda path: SimpleNamespace(site_id=SITE_ID,
                                                                                        settings=settings))
        monkeypatch.setattr(site_commands, "_client", Marked)
        running = None if marked is None else (socket.gethostname(), 4242)
        monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: running)
        monkeypatch.setattr(balsam.site.agent, "agent_stop_timeout", lambda path: 45.0)
        monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
        result = CliRunner().invoke(site_commands.stop, [str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert result.stdout == "Site agent [pid 4242] shutdown OK\n"
        return result.stderr

    return run


def test_off_a_terminal_the_stop_counter_is_a_line_every_10_s(stop):
    stderr = stop(tty=False, stops_after=25.1)
    assert "\r" not in stderr
    assert stderr.splitlines(keepends=True) == [f"Waiting for the site agent to stop... {s:>2d}/45 s\n"
                                                for s in (1, 11, 21)], stderr


def test_on_a_terminal_the_stop_counter_is_redrawn_in_place(stop):
    stderr = stop(tty=True, stops_after=3.1)
    assert stderr == "".join(f"\rWaiting for the site agent to stop...  {s}/45 s" for s in (1, 2, 3)) + "\n"


def _marked(read: int) -> list[int]:
    """BatchJobs 1 and 2 marked; 1 ended at the 4th read, 2 at the 26th."""
    return [1, 2] if read < 4 else [2] if read < 26 else []


def test_off_a_terminal_the_term_wait_prints_a_line_when_it_changes_or_every_10_s(stop):
    stderr = stop(tty=False, marked=_marked)
    assert "\r" not in stderr
    words = "Waiting for the site agent to end {} BatchJob(s) marked by `balsam queue term` ({})... {:>2d}/65 s\n"
    assert stderr.splitlines(keepends=True) == [
        words.format(2, "1, 2", 1), words.format(1, "2", 3), words.format(1, "2", 13), words.format(1, "2", 23)
    ], stderr


def test_on_a_terminal_the_term_wait_is_redrawn_in_place(stop):
    stderr = stop(tty=True, marked=lambda read: [1, 2] if read < 4 else [])
    first = "Waiting for the site agent to end 2 BatchJob(s) marked by `balsam queue term` (1, 2)... {:>2d}/65 s"
    assert stderr == f"\r{first.format(1)}\r{first.format(2)}\n", repr(stderr)


# --- 3. `balsam site init`'s platform menu ------------------------------------------------------

def test_the_platform_menu_stays_aligned_past_item_9(monkeypatch, tmp_path):
    import balsam.site.site_ops

    platforms = {f"plat{i}": f"Platform number {i}" for i in range(1, 13)}
    monkeypatch.setattr(balsam.site.site_ops, "available_platforms", lambda: platforms)
    monkeypatch.setattr(balsam.site.site_ops, "detect_platform", lambda: None)
    monkeypatch.setattr(balsam.site.site_ops, "platform_projects", lambda name: [])
    monkeypatch.setattr(balsam.site.site_ops, "init_site", lambda path, name, platform, client, **kw: 7)
    monkeypatch.setattr(site_commands, "_interactive", lambda: True)
    monkeypatch.setattr(site_commands, "_client", lambda: None)
    result = CliRunner().invoke(site_commands.init, [str(tmp_path / "s")], input="11\ns\n\n")
    assert result.exit_code == 0, result.output
    menu = [line for line in result.output.splitlines() if ") plat" in line]
    assert len(menu) == 12
    assert {line.index("plat") for line in menu} == {6}, menu  # "   1) plat1", "  12) plat12"
    assert {line.index("Platform number") for line in menu} == {27}, menu
    assert menu[0].startswith("   1) ") and menu[11].startswith("  12) ")
    assert "platform plat11" in result.output


# --- 4. review of the above: closed stderr, wrapped redraws, messages inside the line, 0.x hints --

def test_site_stop_with_stderr_closed_still_signals_the_agent(monkeypatch, tmp_path):
    """`balsam site stop 2>&-`: sys.stderr is None; asking it isatty() failed before any signal."""
    import sys

    import balsam.site.site_ops

    stopped = []

    def stop_agent(path, *, timeout, force, progress=None, echo=None):
        stopped.append(path)
        progress(1.5, timeout)  # the progress line writes nowhere, and does not fail either
        return 4242

    monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
    monkeypatch.setattr(sys, "stderr", None)
    assert site_commands._stop(tmp_path, 45.0, False) == 4242
    assert stopped == [tmp_path]


def test_on_a_narrow_terminal_each_redraw_fits_one_row(stop):
    """A line wider than the terminal wraps and '\\r' returns to its last row: a row per redraw."""
    stderr = stop(tty=True, marked=lambda read: list(range(1, 9)) if read < 4 else [], columns=60)
    redraws = stderr.split("\r")[1:]
    assert redraws == ["Waiting for the site agent to end 8 BatchJob(s) mar  1/65 s",
                       "Waiting for the site agent to end 8 BatchJob(s) mar  2/65 s\n"], redraws
    assert all(len(text.rstrip("\n")) <= 59 for text in redraws)


def test_the_width_is_the_terminals_of_stderr_or_else_the_default(monkeypatch):
    import os
    import shutil

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((60, 24)))
    assert site_commands._terminal_columns() == 60  # stderr (pytest's capture) is no terminal here


class _ZeroSizedTerminal:
    """stderr on a pty that reports 0x0 (a new pty, ``ssh -tt`` from a script)."""

    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("columns, expected", [(None, 72), ("", 72), ("0", 72), ("abc", 72), ("²", 72), ("50", 50)])
def test_a_terminal_of_width_0_or_columns_in_the_environment_gives_a_usable_width(monkeypatch, columns, expected):
    """A pty reporting 0 columns gave width 1 and the progress line was cut to "s"; COLUMNS was ignored."""
    import os
    import shutil
    import sys

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "stderr", _ZeroSizedTerminal())
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=1: os.terminal_size((0, 0)))
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((72, 24)))
    assert site_commands._terminal_columns() == expected


def test_fit_shortens_the_id_list_before_the_words():
    text = ("Waiting for the site agent to end 8 BatchJob(s) marked by `balsam queue term` (1, 2, 3, 4, 5 and 3 more)... "
            "12/65 s")
    assert site_commands._fit(text, 200) == text
    # fewer ids first (here "(ids 1, ... 7 more)" is still too wide: their count alone), the counter kept
    assert site_commands._fit(text, 111) == text.replace("(1, 2, 3, 4, 5 and 3 more)", "(ids 1, 2, ... 6 more)")
    assert site_commands._fit(text, 110) == text.replace("(1, 2, 3, 4, 5 and 3 more)", "(ids 1, ... 7 more)")
    assert site_commands._fit(text, 105) == text.replace("(1, 2, 3, 4, 5 and 3 more)", "(8 ids)")
    assert site_commands._fit(text, 40) == "Waiting for the site agent to en 12/65 s"


def test_fit_never_lengthens_the_id_list_nor_cuts_inside_it():
    """"(7)" became "(1 ids)" (longer) and was then cut inside: "(1 id 12/65 s"."""
    import re

    text = "Waiting for the site agent to end 1 BatchJob(s) marked by `balsam queue term` (7)... 12/65 s"
    assert site_commands._fit(text, 91) == text.replace("(7)...", "(7)..")
    # a cut inside the parentheses drops them whole
    cut = "Waiting for the site agent to end 1 BatchJob(s) marked by `balsam queue term` 12/65 s"
    assert site_commands._fit(text, 88) == cut
    two = text.replace("end 1", "end 8").replace("(7)", "(1 and 7 more)")
    assert site_commands._fit(two, len(two) - 1) == two.replace("(1 and 7 more)", "(8 ids)")
    assert site_commands._fit(two, 85) == cut.replace("end 1", "end 8")
    for width in range(20, len(two)):
        for line in (text, two):
            fitted = site_commands._fit(line, width)
            # no id list cut short: "(1 id", "(1, 2", "(ids 1, ..."
            assert len(fitted) <= width and not re.search(r"\((?:\d|ids )[^)]*$", fitted), (width, fitted)


def test_stop_agents_messages_end_the_open_progress_line_first(monkeypatch, tmp_path):
    """stop_agent's "Ended N processes..." (from its finally) was glued onto the redrawn line."""
    import click

    import balsam.site.site_ops

    written: list[tuple[str, bool]] = []
    monkeypatch.setattr(click, "echo", lambda message="", nl=True, err=False, **kw: written.append(
        (str(message) + ("\n" if nl else ""), err)))
    monkeypatch.setattr(site_commands, "_stderr_tty", lambda: True)

    def stop_agent(path, *, timeout, force, progress=None, echo=None):
        progress(1.2, timeout)
        echo("Ended 2 processes the site agent left behind")
        return 4242

    monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
    assert site_commands._stop(tmp_path, 45.0, False) == 4242
    assert written == [("\rWaiting for the site agent to stop...  1/45 s", True), ("\n", True),
                       ("Ended 2 processes the site agent left behind\n", False)], written


@pytest.mark.parametrize("args, path", [(["init", "-"], "./-"), (["init", "--", "-x"], "./-x"),
                                        (["init", "--db-type", "postgres", "--", "-x"], "./-x")])
def test_0x_init_of_a_path_starting_with_a_dash_prints_a_line_that_goes_there(args, path):
    from balsam.cli.legacy import legacy_hint

    hint = legacy_hint(args, set())
    assert f"  balsam site init {path}\n" in hint and f"then `cd {path} && balsam site start`" in hint, hint
    assert "cd - " not in hint and "(no equivalent for -)" not in hint and "for --)" not in hint, hint


@pytest.mark.parametrize("args, line, dropped", [
    (["kill", "--id", "12"], "balsam job modify -s FAILED --id 12", None),
    (["killjob", "--id", "12", "--recursive"], "balsam job modify -s FAILED --id 12", "--recursive"),
    (["mkchild", "--name", "x"], "balsam job create --parent-id ID -w x", None),
    (["modify", "jobs", "--id", "3", "--attr", "state", "--value", "RUN_DONE"], "balsam job modify --id 3 -s RUN_DONE",
     None),
    # 0.x's own modify forms: `modify jobs ID --attr A --value V` (early), `modify ID ATTR VALUE [--type]` (final)
    (["modify", "jobs", "3", "--attr", "state", "--value", "RUN_DONE"], "balsam job modify --id 3 -s RUN_DONE", None),
    (["modify", "3", "state", "RUN_DONE", "--type", "jobs"], "balsam job modify --id 3 -s RUN_DONE", None),
    # 0.x ids were UUID prefixes, which --id (an integer) refuses: the placeholder stays
    (["modify", "3f2a", "state", "RUN_DONE"], "balsam job modify --id ID -s RUN_DONE", None),
    (["modify", "apps", "say", "--attr", "executable", "--value", "x"], "balsam app ls", None),
    (["killjob", "--id", "3f2a9c"], "balsam job modify -s FAILED --id ID", None),
    # mkchild required --wall-minutes; without it the line ran with the default -t 1
    (["mkchild", "--name", "x", "--wall-minutes", "10"], "balsam job create --parent-id ID -w x -t 10", None),
    # nargs='*' options took every following word (--args one value: the 0.x README's "--args 'a b'")
    (["mkchild", "--name", "x", "--args", "hello world", "--yes"],
     "balsam job create --parent-id ID -w x -p arg1=hello -p arg2=world -y", None),
    (["job", "--name", "x", "--description", "my", "job", "--input-files", "a.dat", "b.dat",
      "--stage-out-files", "*.out", "c.out", "--mpi-flags", "--wall-minutes", "5"], "balsam job create -w x -t 5",
     "--description, --input-files, --stage-out-files, --mpi-flags"),
])
def test_other_0x_commands_translate_the_options_they_share(args, line, dropped):
    from balsam.cli.legacy import legacy_hint

    hint = legacy_hint(args, set())
    assert f"Use instead:\n  {line}\n" in hint, hint
    if "--id ID" in line:
        assert "job ids are integers now" in hint and "was part of a UUID" in hint, hint
    if dropped:
        assert f"(no equivalent for {dropped})" in hint, hint
    else:
        assert "no equivalent" not in hint, hint


def test_an_empty_submitted_by_listing_names_each_program_once(monkeypatch):
    import balsam.api
    import balsam.cli.queue as queue

    class Empty:
        @staticmethod
        def filter(**filters):
            return []

    monkeypatch.setattr(balsam.api, "BatchJob", SimpleNamespace(objects=Empty))
    monkeypatch.setattr(queue, "site_filter", lambda selector: {})
    out = CliRunner().invoke(queue.ls, ["--submitted-by", "elastic", "--submitted-by", "elastic",
                                        "--submitted-by", "-", "--submitted-by", "-"])
    assert out.exit_code == 0, out.output
    assert out.stdout == ("No active batch jobs submitted by elastic, nor any that no program marked "
                          "(`--submitted-by -`).\n"), out.stdout
