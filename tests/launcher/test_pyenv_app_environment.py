"""An app's environment and shell preamble as HPC users write them, through the pools a launcher runs
tasks with (a spawner process, the in-process pool) and then the real launcher in both job modes:

- the server's secrets (token signing key, database URL, invitation) that the shell starting the
  site agent often holds never reach an app; one the app sets itself does;
- ``environment_variables`` with spaces, quotes, ``$``, backquotes, backslashes and newlines, and a
  PATH override, arrive as written, with and without a preamble;
- a preamble that fails or calls ``exit`` says so in job.out (one line), and the app does not run;
- end to end: a run() app whose ``python_exe`` is a venv's ``python3`` activated by the preamble, one
  in a container (a faithful ``apptainer`` on PATH) and one in a Python without dill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import app_run
from balsam.launcher.app_run import JobPreparer, shell_line
from balsam.launcher.runner import ProcessPool, SpawnerPool
from launcher_harness import finish, start_launcher
from launcher_helpers import PreambleApp, make_runnable, prepared_job, reap_all, wait_for_states

SECRETS = {"BALSAM_AUTH_SECRET_KEY": "signing-key-0123", "BALSAM_DATABASE_URL": "postgresql://balsam:hunter2@db/balsam",
           "BALSAM_INVITATION": "invite-abc"}
TRICKY = {"SP": "a b  c", "Q": "it's \"quoted\"", "DOLLAR": "$HOME `whoami` $(echo injected) ${X:-y}",
          "NL": "line1\nline2\n", "BS": "back\\slash\\n", "STAR": "*"}
#: Prints the environment as JSON (the launcher's Python: in every pool's PATH).
DUMP = f"{sys.executable} -c 'import os,json; print(\"ENV\", json.dumps(dict(os.environ)))'"


def _dumped(out: str) -> dict[str, str]:
    line = next(line for line in out.splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


def _job(job_id: int, workdir: str) -> Any:
    """A one-rank job with the parameter fields a run() app's job also has."""
    return prepared_job(job_id, workdir, parameters={}, serialized_parameters="", get_parameters=lambda: {})


def _run(pool: Any, tasks: dict[int, tuple[str, Path, dict]], timeout: float = 30.0) -> dict[int, int]:
    for job_id, (line, workdir, env) in tasks.items():
        pool.start(job_id, line, workdir, env)
    return reap_all(pool, tasks, timeout)


def _apps() -> dict[int, type]:
    from balsam.api import ApplicationDefinition

    class Plain(ApplicationDefinition):
        site = 1
        command_template = DUMP
        environment_variables = {**TRICKY, "PATH": f"/opt/app/bin:{os.environ['PATH']}"}

    class Preamble(Plain):
        def shell_preamble(self):
            return "echo preamble-out; export FROM_PREAMBLE=1"

    class Own(Plain):
        """Its own get_environ_vars, from os.environ as many write it."""

        def get_environ_vars(self):
            return {**os.environ, "MINE": "1"}

    class Declares(Plain):
        environment_variables = {"BALSAM_DATABASE_URL": "sqlite:////tmp/my-own.db"}

    return {1: Plain, 2: Preamble, 3: Own, 4: Declares}


@pytest.mark.parametrize("pool_kind", ["spawner", "in-process"])
def test_server_secrets_never_reach_an_app_and_values_arrive_as_written(
        pool_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every app had BALSAM_AUTH_SECRET_KEY (forge a token for any user), the database URL
    with its password and the invitation in its environment, when the agent's shell had them."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(app_run, "_base_env", None)  # the launcher's environment, as at its start
    apps = _apps()
    preparer = JobPreparer(tmp_path / "data", load_app=apps.__getitem__)
    tasks = {}
    for job_id in apps:
        prepared = preparer.prepare(_job(job_id, f"w{job_id}"))
        tasks[job_id] = (shell_line(prepared.cmdline, prepared.preamble, prepared.workdir), prepared.workdir, prepared.env)
    pool = SpawnerPool(5, threading.Event()) if pool_kind == "spawner" else ProcessPool(5, wake=threading.Event())
    try:
        exits = _run(pool, tasks)
    finally:
        pool.close() if pool_kind == "spawner" else pool.terminate_all(1.0)
    outs = {job_id: (workdir / "job.out").read_text() for job_id, (_, workdir, _) in tasks.items()}
    assert set(exits.values()) == {0}, outs
    envs = {job_id: _dumped(out) for job_id, out in outs.items()}
    for job_id in (1, 2, 3):
        assert not set(SECRETS) & set(envs[job_id]), (job_id, sorted(set(SECRETS) & set(envs[job_id])))
    # Set by the app itself: kept, with its own value; the others still go.
    assert envs[4]["BALSAM_DATABASE_URL"] == "sqlite:////tmp/my-own.db"
    assert "BALSAM_AUTH_SECRET_KEY" not in envs[4] and "BALSAM_INVITATION" not in envs[4]
    for job_id in (1, 2):
        assert {k: envs[job_id][k] for k in TRICKY} == TRICKY, job_id
        assert envs[job_id]["PATH"].startswith("/opt/app/bin:") and envs[job_id]["BALSAM_JOB_ID"] == str(job_id)
    assert outs[2].startswith("preamble-out\n") and envs[2]["FROM_PREAMBLE"] == "1"
    assert envs[3]["MINE"] == "1"
    # The launcher's own environment is left as it was.
    assert all(os.environ[name] == value for name, value in SECRETS.items())


#: Preambles that stop the job: (preamble, exit status, the line job.out must end with or None).
FAILING = {
    "exit": ("exit 3", 3, "balsam: the shell preamble called exit 3: the app was not started"),
    "last command fails": ("source /tmp/pyenvs-no-such/setup.sh", 1,
                           "balsam: the shell preamble failed (exit status 1): the app was not started"),
    "module banner then false": (["echo 'Loading mymod/1.0'", "false"], 1,
                                 "balsam: the shell preamble failed (exit status 1): the app was not started"),
    "multi-line exit": ("echo loading\nexit 5\necho never\n", 5,
                        "balsam: the shell preamble called exit 5: the app was not started"),
    "ERR trap": ("trap 'exit 7' ERR; false; echo never", 7,
                 "balsam: the shell preamble called exit 7: the app was not started"),
    # set -e stops at the failing command: what it printed is the reason (bash names the file).
    "set -e": ("set -e\nsource /tmp/pyenvs-no-such/setup.sh\necho never\n", 1, None),
}


def test_a_failing_preamble_says_so_in_job_out(tmp_path: Path) -> None:
    """Before: ``exit 3`` left an empty job.out and an event with status 3 and no error; a failing
    ``module load`` left its banner only. The app never runs; ``(exit N)`` in a subshell (an idiom
    of setup scripts) is no exit of the preamble."""

    class _App(PreambleApp):
        command = "echo APP-RAN"

        def get_environ_vars(self) -> dict:
            return dict(os.environ)

    cases = {**FAILING, "subshell exit idiom": ("(exit 4); echo set-up", 0, "APP-RAN")}
    apps = {i: type(f"App{i}", (_App,), {"preamble": value[0]}) for i, value in enumerate(cases.values(), 1)}
    preparer = JobPreparer(tmp_path / "data", load_app=apps.__getitem__)
    tasks = {}
    for job_id, name in enumerate(cases, 1):
        prepared = preparer.prepare(_job(job_id, f"w{job_id}"))
        tasks[job_id] = (shell_line(prepared.cmdline, prepared.preamble, prepared.workdir), prepared.workdir, prepared.env)
    pool = ProcessPool(5, wake=threading.Event())
    try:
        exits = _run(pool, tasks)
    finally:
        pool.terminate_all(1.0)
    for job_id, (name, (_, status, last)) in enumerate(cases.items(), 1):
        out = (tasks[job_id][1] / "job.out").read_text()
        assert exits[job_id] == status, (name, exits[job_id], out)
        lines = out.splitlines()
        if name == "subshell exit idiom":
            assert lines == ["set-up", "APP-RAN"], out
            continue
        assert "APP-RAN" not in out and "never" not in out, (name, out)
        if last is None:
            assert "setup.sh: No such file or directory" in out, (name, out)
        else:
            assert lines[-1] == last and out.count("balsam:") == 1, (name, out)


# -- the real launcher, end to end -----------------------------------------------------------------

FAKE_APPTAINER = r"""#!/bin/bash
# `apptainer exec [options] IMAGE CMD...` as the real one behaves here: the host environment passes
# in (APPTAINERENV_X becomes X), a missing image is FATAL with status 255, CMD is exec'd; the "image"
# is a file naming the python that is python3 inside it.
[ "$1" = exec ] || { echo "FATAL:   unknown command $1" >&2; exit 255; }
shift
while [ $# -gt 0 ]; do case "$1" in --nv|--cleanenv|-e) shift;; -B|--bind) shift 2;; *) break;; esac; done
image=$1; shift
[ -f "$image" ] || { echo "FATAL:   could not open image $image: no such file or directory" >&2; exit 255; }
for v in $(compgen -e); do case "$v" in APPTAINERENV_*) export "${v#APPTAINERENV_}=${!v}"; unset "$v";; esac; done
export APPTAINER_CONTAINER="$image" APPTAINER_NAME="$(basename "$image")"
if [ "$1" = python3 ]; then shift; exec "$(head -1 "$image")" "$@"; fi
exec "$@"
"""


def _venv(root: Path, name: str, without: str = "") -> Path:
    """A venv (no pip) where Balsam and the runner's dependencies are importable (links to the
    installed ones), less ``without``."""
    import balsam
    import tblib

    site_packages = Path(tblib.__file__).parent.parent
    env = root / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    links = env / "deps"
    links.mkdir()
    for dep in ("attr", "attrs", "cattrs", "dill", "tblib", "typing_extensions.py", "orjson"):
        if dep != without:
            (links / dep).symlink_to(site_packages / dep)
    site = next((env / "lib").glob("python3.*/site-packages"))
    (site / "balsam-test.pth").write_text(f"{Path(balsam.__file__).parent.parent}\n{links}\n")
    return env


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "mpi"])
def test_apps_in_other_pythons_and_containers_through_the_launcher(mode: str, new_site, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob
    from balsam._api import codec
    from balsam._api.app import parse_run_markers

    name, path = new_site(idle_ttl_sec=2)
    venv = _venv(tmp_path, "appenv")
    nodill = _venv(tmp_path, "nodill", without="dill")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    image = tmp_path / "app.sif"
    image.write_text(f"{venv}/bin/python\n")
    path_override = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"

    class Activated(ApplicationDefinition):
        """python_exe found on the PATH the preamble's activation sets."""
        site = name
        python_exe = "python3"
        environment_variables = dict(TRICKY)

        def shell_preamble(self):
            return f"source {venv}/bin/activate\necho activated\n"

        def run(self, x):
            import os
            import sys
            return [x, sys.executable, {k: os.environ.get(k) for k in ("SP", "Q", "DOLLAR", "NL", "BS", "STAR",
                                                                       "BALSAM_AUTH_SECRET_KEY", "BALSAM_DATABASE_URL")}]

    class Contained(ApplicationDefinition):
        site = name
        python_exe = f"apptainer exec --nv {image} python3"
        environment_variables = {"PATH": path_override}

        def run(self, x):
            import os
            return [x, os.environ.get("APPTAINER_NAME")]

    class NoDill(ApplicationDefinition):
        site = name
        python_exe = f"{nodill}/bin/python"

        def run(self, x):
            return x

    class Failing(ApplicationDefinition):
        site = name
        command_template = "echo APP-RAN"

        def shell_preamble(self):
            return "exit 3"

    apps = (Activated, Contained, NoDill, Failing)
    for app in apps:
        app.sync()
    ids = make_runnable([app.submit(workdir=app.__name__, save=False, **({} if app is Failing else {"x": 2}))
                         for app in apps])
    batch_job = BatchJob.objects.create(site_id=Activated.resolve_site_id(), project="local", queue="local",
                                        num_nodes=1, wall_time_min=1, job_mode=mode, scheduler_id=4243)
    env = {"BALSAM_BATCH_JOB_ID": str(batch_job.id)} if mode == "mpi" else {"BALSAM_LOCAL_JOB_ID": "4243"}
    proc = start_launcher(path, mode, 1, env={**env, **SECRETS})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR", "JOB_FINISHED", "FAILED"}, timeout=120)
    assert finish(proc) == 0
    by_app = dict(zip((a.__name__ for a in apps), ids))
    outs = {a: (path / "data" / a / "job.out").read_text() for a in by_app}
    states = {a: str(jobs[i].state) for a, i in by_app.items()}
    assert states["Activated"] == states["Contained"] == "RUN_DONE", (states, outs)
    value = codec.deserialize(parse_run_markers(outs["Activated"])[0])
    assert value[0] == 2 and value[1] == f"{venv}/bin/python3", value
    assert value[2] == {**TRICKY, "BALSAM_AUTH_SECRET_KEY": None, "BALSAM_DATABASE_URL": None}
    assert outs["Activated"].startswith("activated\n")
    assert codec.deserialize(parse_run_markers(outs["Contained"])[0]) == [2, "app.sif"]
    # The interpreter without dill, and the preamble's exit: RUN_ERROR, and the reason is the one line
    # of job.out, so the job's error (its event) reads the same.
    assert states["NoDill"] == states["Failing"] == "RUN_ERROR", (states, outs)
    (line,) = outs["NoDill"].splitlines()
    assert f"cannot run in {nodill}/bin/python (Python " in line and "module 'dill' is not installed" in line
    assert outs["Failing"] == "balsam: the shell preamble called exit 3: the app was not started\n"
    from balsam.api import EventLog

    errors = {e.job_id: e.data.get("error") for e in EventLog.objects.filter(job_id=[by_app["NoDill"], by_app["Failing"]])
              if str(e.to_state) == "RUN_ERROR"}
    assert errors[by_app["NoDill"]].splitlines()[0] == line
    assert errors[by_app["Failing"]].splitlines()[0] == outs["Failing"].strip()
