"""Closed and failing standard streams, on the real CLI in its own process against a live server.

Before: every command but ``balsam demo`` ended with click's silent status 1 under ``| head``
(a script could not tell it from a failure); ``app rm --all -y | head -1`` deleted one app of
many and stopped; with stderr closed (``2>&-``) every confirmation failed silently ("input(): lost
sys.stderr"); a Ctrl-C with stderr closed or on a full device exited 1, not 130; ``job ls
2>/dev/full`` exited 1 because "No matching jobs." could not be written; ``>/dev/full`` said
``Error: OSError: [Errno 28] ...`` without naming standard output. Then (13acc16): a plugin's
follow loop printed into a closed pipe for ever; under ``PYTHONIOENCODING=ascii`` click wrote to
the unguarded ``sys.stdout.buffer`` (status 1, ``app rm --all`` left 5 apps); with ``>&-`` a ``y``
on stdin answered a question never shown; login's prompts were answered unseen; an in-process
``main(..., standalone_mode=False)`` left descriptor 1 on /dev/null.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from cli_test_utils import fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (fixture)

BALSAM = [sys.executable, "-c", "from balsam.cli import main; main(prog_name='balsam')"]


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    return make_marked_site(tmp_path, "pipes")


@pytest.fixture
def jobs(site: Any) -> list[int]:
    from balsam.api import Job

    hello = sync_hello("pipes", "echo hi")
    Job.objects.bulk_create([Job(workdir=f"p/{i}", app_id=hello.__app_id__, tags={"exp": "p"}) for i in range(30)])
    return sorted(j.id for j in Job.objects.all())


def start_into_closed_pipe(*args: str, stdin: Optional[bytes] = None, env: Optional[dict[str, str]] = None,
                           argv: Optional[list[str]] = None) -> subprocess.Popen:
    """Start ``balsam ARGS | head`` with ``head`` gone before the first write (stdin written, then
    closed); ``env``: variables added to the environment; ``argv``: another program than ``balsam``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdin_read, stdin_write = os.pipe()
    os.write(stdin_write, stdin or b"")  # a few lines: the pipe holds them
    os.close(stdin_write)
    try:
        return subprocess.Popen([*(argv or BALSAM), *args], stdout=write_end, stderr=subprocess.PIPE,
                                stdin=stdin_read, env={**os.environ, **(env or {})})
    finally:
        os.close(write_end)
        os.close(stdin_read)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """(exit status, stderr) of :func:`start_into_closed_pipe`'s process; killed after ``timeout``
    seconds (then status -9: a command that went on writing into the closed pipe)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


def into_closed_pipe(*args: str, stdin: Optional[bytes] = None, env: Optional[dict[str, str]] = None,
                     timeout: float = 120) -> tuple[int, str]:
    """``balsam ARGS | head`` with ``head`` gone before the first write: (exit status, stderr)."""
    return finish(start_into_closed_pipe(*args, stdin=stdin, env=env), timeout)


def with_redirect(args: list[str], redirect: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``balsam ARGS REDIRECT`` through the shell (``2>&-``, ``2>/dev/full``, ``>/dev/full``)."""
    import shlex

    line = " ".join(shlex.quote(a) for a in [*BALSAM, *args]) + " " + redirect
    return subprocess.run(["bash", "-c", line], capture_output=True, input=stdin, timeout=120)


ASCII = {"PYTHONIOENCODING": "ascii"}  # click writes to sys.stdout.buffer through a wrapper of its own


def test_listings_into_a_closed_pipe_exit_141_quietly(jobs: list[int]) -> None:
    # One test for all the cases (each its own process, run side by side): a process each costs
    # seconds. Under ASCII, before: status 1 (click wrote to the unguarded buffer).
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["job", "ls", "--site", "all"], {}), (["job", "ls", "--site", "all", "--json"], {}),
        (["job", "show", str(jobs[0])], {}), (["app", "ls", "-s", "all"], {}), (["site", "ls"], {}),
        (["queue", "ls", "-h"], {}), (["--help"], {}), (["job", "rm", "--help"], {}),
        (["--help"], ASCII), (["job", "ls", "--site", "all"], ASCII),
    ]
    started = [(args, env, start_into_closed_pipe(*args, env=env)) for args, env in cases]
    for args, env, proc in started:
        code, err = finish(proc)
        assert (code, err) == (141, ""), f"balsam {' '.join(args)} {env or ''}| head: status {code}, stderr {err!r}"


def test_a_watch_into_a_closed_pipe_stops_at_the_first_write(jobs: list[int]) -> None:
    # A read-only command stops at the failed write: a watch that did not would redraw until killed.
    code, err = into_closed_pipe("job", "ls", "--site", "all", "--watch", "--interval", "0.2", timeout=60)
    assert (code, err) == (141, ""), (code, err)


def test_which_commands_stop_at_a_closed_output() -> None:
    import click

    from balsam.cli import main
    from balsam.cli._streams import STOPS_AT_CLOSED_OUTPUT, stops_at_closed_output

    found: dict[str, bool] = {}

    def walk(ctx: click.Context) -> None:
        command = ctx.command
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(click.Context(command.get_command(ctx, name), parent=ctx, info_name=name))  # type: ignore[arg-type]
            return
        with ctx:
            found[ctx.command_path.split(" ", 1)[1]] = stops_at_closed_output()

    walk(click.Context(main, info_name="balsam"))
    # The core's site commands come through the Globus plugin's hook (it adds `site globus-login`):
    # still the core's, and those that change something finish.
    for path in ("site sync", "site init", "site rm", "job rm", "app rm", "queue submit"):
        assert found[path] is False, path
    assert {path for path, stops in found.items() if stops} >= STOPS_AT_CLOSED_OUTPUT
    assert found.get("site globus-login", True) is True  # a plugin's, undeclared: it stops


PLUGIN_SCRIPT = """
import pathlib, sys, click
from balsam.cli import main

@click.command("tail-events")
def tail_events():
    \"\"\"A plugin's follow loop that declares nothing.\"\"\"
    while True:
        click.echo("event")

main.add_command(tail_events)  # as a plugin's balsam_cli_commands(cli) does
if sys.argv[1] == "tail-events":  # (it needs no import a plugin written before the decorators lacks)
    main(prog_name="balsam")
from balsam.cli import changes_something, read_only

@read_only
@click.command("follow")
def follow():
    while True:
        click.echo("event")

@changes_something
@click.command("apply")
@click.argument("marker")
def apply(marker):
    for i in range(5000):
        click.echo(f"changed {i}")
    pathlib.Path(marker).write_text("done")

for command in (follow, apply):
    main.add_command(command)
main(prog_name="balsam")
"""


def test_a_plugin_command_stops_at_a_closed_output_unless_it_changes_something(tmp_path: Path) -> None:
    script = tmp_path / "plugin_cli.py"
    script.write_text(PLUGIN_SCRIPT)
    marker = tmp_path / "marker"
    argv = [sys.executable, str(script)]
    # Before: the undeclared loop printed into the closed pipe until killed (status -9).
    started = {name: start_into_closed_pipe(*args, argv=argv)
               for name, args in (("undeclared", ["tail-events"]), ("read_only", ["follow"]),
                                  ("changes_something", ["apply", str(marker)]))}
    for name, proc in started.items():
        code, err = finish(proc, timeout=60)
        assert (code, err) == (141, ""), f"{name}: status {code}, stderr {err!r}"
    assert marker.read_text() == "done"  # the command that changes something finished


@pytest.mark.parametrize("env", [{}, ASCII], ids=["utf-8", "ascii"])
def test_app_rm_all_into_a_closed_pipe_deletes_every_app(site: Any, env: dict[str, str]) -> None:
    from balsam.api import App, ApplicationDefinition

    for i in range(6):
        type(f"Pipe{i}", (ApplicationDefinition,), {"site": "pipes", "command_template": "true"}).sync()
    assert App.objects.filter(site_id=site.id).count() == 6
    code, err = into_closed_pipe("app", "rm", "--all", "--site", "pipes", "-y", env=env)
    assert App.objects.filter(site_id=site.id).count() == 0  # before: 5 left, the first one deleted
    assert (code, err) == (141, ""), (code, err)


def test_job_modify_and_rm_into_a_closed_pipe_complete_their_change(jobs: list[int]) -> None:
    from balsam.api import Job

    code, err = into_closed_pipe("job", "modify", "-t", "exp=p", "-s", "FAILED", "-y", "--site", "all")
    assert code == 141 and "Error" not in err, (code, err)
    assert Job.objects.filter(tags={"exp": "p"}, state="FAILED").count() == 30
    code, err = into_closed_pipe("job", "rm", "-t", "exp=p", "-y", "--site", "all")
    assert (code, err) == (141, ""), (code, err)
    assert Job.objects.filter(tags={"exp": "p"}).count() == 0


def test_a_question_into_a_closed_pipe_is_not_asked_nor_answered(jobs: list[int]) -> None:
    from balsam.api import Job

    # "y" waits on stdin: the question it would answer was never shown, so nothing is deleted.
    code, err = into_closed_pipe("job", "rm", "-t", "exp=p", "--site", "all", stdin=b"y\n")
    assert (code, err) == (141, ""), (code, err)
    assert Job.objects.filter(tags={"exp": "p"}).count() == 30


def test_a_question_with_stdout_closed_at_start_is_not_asked(jobs: list[int]) -> None:
    from balsam.api import Job

    proc = with_redirect(["job", "rm", "-t", "exp=p", "--site", "all"], ">&-", stdin=b"y\n")
    assert proc.returncode == 1, proc  # before: 0, every job deleted on a question no one saw
    assert b"standard output was closed" in proc.stderr, proc.stderr
    assert Job.objects.filter(tags={"exp": "p"}).count() == 30


def test_a_login_prompt_into_a_closed_pipe_is_not_asked(balsam_env: Any) -> None:
    # Before: the address prompt was dropped, the answers on stdin taken, and the server asked.
    code, err = into_closed_pipe("register", "--password-stdin", stdin=b"http://127.0.0.1:9\nuser\npw\n")
    assert (code, err) == (141, ""), (code, err)


def test_the_descriptors_are_given_back_after_an_in_process_command() -> None:
    script = ("import os, sys\nfrom balsam.cli import main\n"
              "code = main(['--help'], standalone_mode=False)\n"
              "sys.stderr.write(f'{code} {os.readlink(\"/proc/self/fd/1\")}')\n")
    code, err = finish(start_into_closed_pipe("-c", script, argv=[sys.executable]), timeout=60)
    assert err.startswith("141 pipe:"), (code, err)  # before: "141 /dev/null", the script's output swallowed


def test_a_confirmation_with_stderr_closed_still_asks(jobs: list[int]) -> None:
    from balsam.api import Job

    proc = with_redirect(["job", "rm", "-t", "exp=p", "--site", "all"], "2>&-", stdin=b"y\n")
    assert proc.returncode == 0, proc  # before: 1, "input(): lost sys.stderr", nothing said
    assert b"Deleted 30 job(s)" in proc.stdout, proc.stdout
    assert Job.objects.filter(tags={"exp": "p"}).count() == 0


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full"])
def test_ctrl_c_with_stderr_unwritable_exits_130(jobs: list[int], redirect: str) -> None:
    import shlex

    line = "exec " + " ".join(shlex.quote(a) for a in [*BALSAM, "job", "rm", "-t", "exp=p", "--site", "all"])
    # SIGINT as at a terminal: a test run started in the background (bash `&` without job control)
    # ignores it, and an ignored SIGINT is inherited: the command then never saw the Ctrl-C.
    proc = subprocess.Popen(["bash", "-c", f"{line} {redirect}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = b""
    while b"Really delete" not in seen and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 200)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # before: 1


def test_no_matching_jobs_on_a_full_stderr_is_still_status_0(jobs: list[int]) -> None:
    proc = with_redirect(["job", "ls", "--id", str(jobs[-1] + 1000)], "2>/dev/full")
    assert proc.returncode == 0, proc  # before: 1 ("No matching jobs." could not be written)


def test_a_full_stdout_is_one_line_naming_it(jobs: list[int]) -> None:
    proc = with_redirect(["job", "ls", "--site", "all"], ">/dev/full")
    assert proc.returncode == 1
    assert proc.stderr.decode() == "Error: cannot write to standard output: [Errno 28] No space left on device\n"
