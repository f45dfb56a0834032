"""What a task's shell line runs: an app's ``shell_preamble()`` in the forms users write, and an
executable script without a ``#!`` line as the command (exec'd directly when the line needs no
shell). Real processes through every pool a launcher runs tasks with (the spawner, several
spawners, the in-process pool with and without its reaper thread), then the real launcher in
both job modes against a live server."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.launcher.app_run import JobPreparer, direct_argv, shell_line
from balsam.launcher.runner import ProcessPool, SpawnerPool, SpawnerShards
from launcher_harness import finish, start_launcher
from launcher_helpers import PreambleApp, make_runnable, prepared_job, reap_all, wait_for_states

POOLS: dict[str, Callable[[], Any]] = {
    "spawner": lambda: SpawnerPool(5, threading.Event()),
    "two spawners": lambda: SpawnerShards(2, 5, threading.Event()),
    "in-process, reaper": lambda: ProcessPool(5, wake=threading.Event()),
    "in-process, polled": lambda: ProcessPool(5),
}


@pytest.fixture(params=list(POOLS))
def pool(request: pytest.FixtureRequest) -> Any:
    made = POOLS[request.param]()
    yield made
    if isinstance(made, ProcessPool):
        made.terminate_all(1.0)
    else:
        made.close()


def _run(pool: Any, tasks: dict[int, tuple[str, Path]], env: dict[str, str], cpu_ids: Any = (),
         timeout: float = 30.0) -> dict[int, int]:
    """Start ``tasks`` (job id -> (shell line, workdir)); reap until all reported: job id -> returncode."""
    for job_id, (line, workdir) in tasks.items():
        pool.start(job_id, line, workdir, env, cpu_ids)
    return reap_all(pool, tasks, timeout)


# -- shell_preamble() -------------------------------------------------------------------------------

#: Preambles as users write them, and whether the app must run after them.
PREAMBLES: dict[str, tuple[Any, bool]] = {
    # A docstring-style one-liner (the indentation and newlines of a triple-quoted string): the
    # newline before `&&` was a bash syntax error, so the job failed without running.
    "padded one-liner": ("""
        export FOO=bar
        """, True),
    "trailing newline": ("export FOO=bar\n", True),
    # The comment swallowed `&& <command>`: the app never ran and the job "succeeded".
    "trailing comment": ("export FOO=bar  # the site's default", True),
    "trailing semicolon": ("export FOO=bar;", True),
    "comment only": ("# nothing to set up", True),
    "list": (["true", "export FOO=bar"], True),
    "multi-line": ("\nexport FOO=bar\nexport BAZ=1  # more\n", True),
    # A failing preamble still skips the app (and the job ends RUN_ERROR).
    "failing one-liner": ("false  # e.g. a module that is not there", False),
    # `set -e` and ERR traps stop the preamble where it fails, as in a script: inside the `&&`
    # list of the first fix, bash ignored them and the app ran after a failed step.
    "set -e one-liner": ("set -e; false; export FOO=bar", False),
    "ERR trap one-liner": ("trap 'exit 7' ERR; false; export FOO=bar", False),
    "set -e multi-line": ("set -e\nfalse\nexport FOO=bar\n", False),
    "exit in a preamble": ("exit 4", False),
}


class _App(PreambleApp):
    """An app as JobPreparer loads one: ``printenv FOO`` (in an empty app environment) after the
    preamble of the test's choice."""

    command = "printenv FOO"


def test_every_form_of_shell_preamble_runs_before_the_app(pool: Any, tmp_path: Path) -> None:
    apps = {i: type(f"App{i}", (_App,), {"preamble": value}) for i, (value, _) in enumerate(PREAMBLES.values(), 1)}
    preparer = JobPreparer(tmp_path / "data", load_app=apps.__getitem__)
    tasks = {}
    for job_id, name in enumerate(PREAMBLES, 1):
        prepared = preparer.prepare(prepared_job(job_id, name.replace(" ", "-")))
        tasks[job_id] = (shell_line(prepared.cmdline, prepared.preamble, prepared.workdir), prepared.workdir)
    exits = _run(pool, tasks, dict(os.environ, FOO="unset-by-preamble"))
    for job_id, (name, (_, runs)) in enumerate(PREAMBLES.items(), 1):
        out = (tasks[job_id][1] / "job.out").read_text()
        if not runs:
            # The app never ran: job.out holds nothing, or the one line that says the preamble
            # stopped it (a failing last command, an exit; a set -e stop prints none).
            assert exits[job_id] != 0 and (out == "" or (out.startswith("balsam: the shell preamble ")
                                                         and out.count("\n") == 1)), (name, exits[job_id], out)
        elif name == "comment only":
            assert (exits[job_id], out) == (0, "unset-by-preamble\n"), name
        else:
            assert (exits[job_id], out) == (0, "bar\n"), (name, out)


# -- a script without '#!' --------------------------------------------------------------------------

def _shebangless_script(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "run.sh"
    script.parent.mkdir()
    script.write_text('echo "ran $(basename $0) with [$1] [$2] FOO=$FOO"\n')
    script.chmod(0o755)
    return script


def test_a_script_without_a_shebang_runs_as_bash_would_run_it(pool: Any, tmp_path: Path) -> None:
    """The kernel refuses to exec such a script (ENOEXEC), where bash, which the line goes through
    when it is not exec'd directly (and in mpi mode, under mpiexec), runs it as a shell script: the
    job failed to start (12345) in serial mode only. It now gets bash's behaviour, with its
    environment and arguments; a file that is not a script still fails, as bash says."""
    script = _shebangless_script(tmp_path)
    binary = tmp_path / "bin" / "garbage"
    binary.write_bytes(b"\x7fELF\x00\x01\x02\x00\xff\xfe")
    binary.chmod(0o755)
    line = f"{script} 'a b' c"
    env = dict(os.environ, FOO="from-env")
    assert direct_argv(line, env) == [str(script), "a b", "c"]  # the direct exec path is the one tested
    workdirs = {i: tmp_path / str(i) for i in (1, 2, 3)}
    for path in workdirs.values():
        path.mkdir()
    cpu = sorted(os.sched_getaffinity(0))[:1]
    exits = _run(pool, {1: (line, workdirs[1]), 2: (f"{binary} x", workdirs[2])}, env)
    exits.update(_run(pool, {3: (line, workdirs[3])}, env, cpu_ids=cpu))  # pinned: the same
    assert exits[1] == exits[3] == 0
    for i in (1, 3):
        assert (workdirs[i] / "job.out").read_text() == "ran run.sh with [a b] [c] FOO=from-env\n"
    assert exits[2] == 126 and "cannot execute binary file" in (workdirs[2] / "job.out").read_text()


# -- the launcher, end to end -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "mpi"])
def test_the_launcher_runs_preambles_and_shebangless_scripts(mode: str, new_site, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = new_site(idle_ttl_sec=2)
    script = _shebangless_script(tmp_path)

    class Docstring(ApplicationDefinition):
        site = name
        command_template = "printenv FOO"

        def shell_preamble(self):
            return """
            export FOO=from-docstring
            """

    class Commented(ApplicationDefinition):
        site = name
        command_template = "printenv FOO"

        def shell_preamble(self):
            return "export FOO=commented  # site default"

    class Script(ApplicationDefinition):
        site = name
        command_template = f"{script} {{{{ arg }}}}"
        environment_variables = {"FOO": "app-env"}

    for app in (Docstring, Commented, Script):
        app.sync()
    ids = make_runnable([Docstring.submit(workdir="doc", save=False), Commented.submit(workdir="comment", save=False),
                         Script.submit(workdir="script", arg="x y", save=False)])
    batch_job = BatchJob.objects.create(site_id=Script.resolve_site_id(), project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode=mode, scheduler_id=4242)
    env = {"BALSAM_BATCH_JOB_ID": str(batch_job.id)} if mode == "mpi" else {"BALSAM_LOCAL_JOB_ID": "4242"}
    proc = start_launcher(path, mode, 1, env=env)
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR", "JOB_FINISHED", "FAILED"}, timeout=90)
    assert finish(proc) == 0
    outputs = {w: (path / "data" / w / "job.out").read_text() for w in ("doc", "comment", "script")}
    assert {str(j.state) for j in jobs.values()} <= {"RUN_DONE", "JOB_FINISHED"}, (outputs, jobs)
    assert "from-docstring" in outputs["doc"]
    assert "commented" in outputs["comment"]
    assert "ran run.sh with [x y] [] FOO=app-env" in outputs["script"]
