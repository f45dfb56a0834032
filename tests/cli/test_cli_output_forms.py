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

    def run(*, tty: bool, stops_after: float = 0.0, marked=None):
        run.stops_after, run.marked = stops_after, marked
        settings = SimpleNamespace(sections={"scheduler": SimpleNamespace(sync_period=30)})
        monkeypatch.setattr(site_commands, "_stderr_tty", lambda: tty, raising=False)
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
