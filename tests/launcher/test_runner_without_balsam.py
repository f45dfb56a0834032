"""A run() app whose ``python_exe`` has no Balsam at all (a bare venv, a container without it).

Before: the line ``<python_exe> -m balsam._api.python_runner ...`` ended with Python's own
"Error while finding module specification ... No module named 'balsam'" and exit status 1, one of
serial mode's quick-failure codes, so the job ran 4 times, each failing the same way. Now such a
``python_exe`` starts the runner through a ``-c`` program (``RUNNER_BOOTSTRAP``) that says so in
the runner's one line and exits 78 (``CANNOT_RUN_EXIT``), run once. Real venvs
(``python -m venv --without-pip``), the real line through bash, and a real serial-mode launcher.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import tblib

from balsam._api import app as app_module
from balsam._api import codec, python_runner
from balsam._api.app import RUNNER_MODULE, parse_run_markers, python_runner_command
from balsam._api.python_runner import CANNOT_RUN_EXIT
from balsam.api import ApplicationDefinition, Job
from balsam.launcher.app_run import direct_argv, shell_argv
from launcher_harness import finish, start_launcher
from launcher_helpers import events_of, make_runnable, site_logs, wait_for_states

#: Generous: the outcome is waited for, never timed.
WAIT_SEC = 90


def bare_python(root: Path, base: str = sys.executable) -> Path:
    """A venv without pip and without Balsam (made from ``base``'s Python); its python."""
    env = root / "bare"
    subprocess.run([base, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    return env / "bin" / "python"


def python_38() -> Optional[str]:
    """CPython 3.8 installed beside this one (pyenv's), the oldest the runner line must start in."""
    found = sorted(Path(sys.base_prefix).parent.glob("3.8.*/bin/python3"))
    return str(found[0]) if found else None


def python_27() -> Optional[str]:
    """CPython 2.7 installed beside this one (pyenv's): a python_exe a user may still name."""
    found = sorted(Path(sys.base_prefix).parent.glob("2.7.*/bin/python"))
    return str(found[0]) if found else None


def _app(python_exe: str):
    class Bare(ApplicationDefinition):
        site = 1

        def run(self, x):
            return x

    Bare.python_exe = python_exe
    Bare.__app_id__ = 43
    return Bare


def _job():
    return Job._from_api({"id": 9, "workdir": "w", "app_id": 43, "serialized_parameters": codec.serialize({"x": 1})})


def run_line(line: str, cwd: Path, **env: str) -> tuple[int, str]:
    """The line through bash, stdout and stderr in one file as the launcher writes job.out;
    without PYTHONPATH, which would hand the bare venv this test's Balsam."""
    out = cwd / "job.out"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(out, "wb") as fh:
        code = subprocess.run(["/bin/bash", "-c", line], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**environ, **env}, timeout=120).returncode
    return code, out.read_text()


def expected_line(python: object, version: str, module: str = "balsam") -> str:
    return (f"balsam: the run() app cannot run in {python} (Python {version}): module {module!r} is not "
            "installed there; install Balsam into it, or set the app's python_exe to a Python that has Balsam")


def version_of(python: object) -> str:
    return subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.mark.parametrize("base", ["this", "3.8"])
def test_a_python_without_balsam_says_so_in_the_runners_line_and_exits_78(tmp_path: Path, base: str) -> None:
    """Before: exit 1 and Python's "Error while finding module specification for
    'balsam._api.python_runner' (ModuleNotFoundError: No module named 'balsam')"."""
    if base == "3.8" and python_38() is None:
        pytest.skip("no CPython 3.8 installed beside this one")
    python = bare_python(tmp_path, sys.executable if base == "this" else python_38())
    code, out = run_line(python_runner_command(_app(str(python)), _job()), tmp_path)
    assert (code, out) == (CANNOT_RUN_EXIT, expected_line(python, version_of(python)) + "\n")
    assert parse_run_markers(out) == (None, None)


@pytest.mark.mpi
def test_shell_words_and_mpi_ranks(tmp_path: Path) -> None:
    """python_exe as shell words (a wrapper program before the interpreter, as ``apptainer exec
    img.sif python3``): the line names the interpreter that ran it. Under MPI (a real ``mpiexec -n
    2``, MPICH's hydra) only rank 0 prints it, as the runner's own line; every rank exits 78."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (MPICH's, in the test venv)")
    python = bare_python(tmp_path)
    line = python_runner_command(_app(f"env -u PYTHONPATH {python}"), _job())
    expected = expected_line(python, version_of(python)) + "\n"
    assert run_line(line, tmp_path) == (78, expected)
    assert run_line(f"{shlex.quote(mpiexec)} -n 2 {line}", tmp_path) == (78, expected)


def test_pals_and_srun_ranks(tmp_path: Path) -> None:
    """Cray PALS (Aurora's and Polaris' mpiexec, and Perlmutter's srun through Slurm's cray_shasta
    plugin) sets PALS_RANKID, ``srun --mpi=none`` only SLURM_PROCID: before, every rank printed the
    line (``srun --mpi=none -n 3``: 3 lines). Their variables as they set them (no PALS here, and a
    Slurm step of this test would overlap the slurm group's allocations): slurmstepd sets
    SLURM_TASK_PID to the task's pid, which the line's programs exec into."""
    python = bare_python(tmp_path)
    line = python_runner_command(_app(str(python)), _job())
    expected = expected_line(python, version_of(python)) + "\n"
    assert run_line(line, tmp_path, PALS_RANKID="1") == (78, "")
    assert run_line(line, tmp_path, PALS_RANKID="0") == (78, expected)
    task = "export SLURM_TASK_PID=$$ SLURM_PROCID=%s SLURM_STEP_NUM_TASKS=3 SLURM_NTASKS=3; exec "
    assert run_line(task % 1 + line, tmp_path) == (78, "")
    assert run_line(task % 0 + line, tmp_path) == (78, expected)
    # Not a task of an srun step: a task of serial-mode worker 1, which srun started (this process
    # standing for it), inherits its SLURM_* (a launcher task keeps them): one line, not none.
    worker = {"SLURM_PROCID": "1", "SLURM_TASK_PID": str(os.getpid()), "SLURM_STEP_NUM_TASKS": "2"}
    assert run_line(line, tmp_path, **worker) == (78, expected)


def test_the_runner_reads_the_same_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own rank (its cannot-run line and its result marker on rank 0 only), as the
    program reads it: before, PALS_RANKID and an srun task's SLURM_PROCID were rank 0 (under
    Aurora's mpiexec every rank wrote a result marker)."""
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)  # an earlier test's MPI would answer
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "ALPS_APP_PE",
                 "PALS_RANKID", "SLURM_PROCID", "SLURM_TASK_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PALS_RANKID", "2")
    assert python_runner.mpi_rank() == 2
    monkeypatch.delenv("PALS_RANKID")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_TASK_PID", str(os.getpid()))
    assert python_runner.mpi_rank() == 3
    monkeypatch.setenv("SLURM_TASK_PID", str(os.getppid()))  # inherited from the task above this one
    assert python_runner.mpi_rank() == 0
    # The program reads the same variables, in the same order.
    assert python_runner.RANK_VARIABLES == app_module.RANK_VARIABLES
    assert " ".join(app_module.RANK_VARIABLES) in app_module.RUNNER_BOOTSTRAP


def test_a_balsam_without_this_runner_names_the_runner(tmp_path: Path) -> None:
    """A Python with an older Balsam (0.7's has ``balsam._api`` but runs
    ``balsam.site.launcher.python_runner``): before, "module 'balsam._api.python_runner' is not
    installed there; install Balsam into it" to a user who had."""
    python = bare_python(tmp_path)
    old = tmp_path / "old-balsam"
    (old / "balsam" / "_api").mkdir(parents=True)
    (old / "balsam" / "site" / "launcher").mkdir(parents=True)
    (old / "balsam" / "__init__.py").write_text("__version__ = '0.7.0'\n")
    for package in ("_api", "site", "site/launcher"):
        (old / "balsam" / package / "__init__.py").write_text("")
    (old / "balsam" / "site" / "launcher" / "python_runner.py").write_text("")
    (next((python.parent.parent / "lib").glob("python3.*/site-packages")) / "old.pth").write_text(f"{old}\n")
    code, out = run_line(python_runner_command(_app(str(python)), _job()), tmp_path)
    assert (code, out) == (78, (
        f"balsam: the run() app cannot run in {python} (Python {version_of(python)}): its Balsam has no module "
        "'balsam._api.python_runner' (an older Balsam, such as 0.7); install the current Balsam into it, or set "
        "the app's python_exe to a Python that has Balsam\n"))


def test_a_python_2_says_so_in_the_runners_line(tmp_path: Path) -> None:
    """Python compiles the whole program first: before, a Python 2 python_exe printed a SyntaxError
    of 4 lines with the program in them (its f-strings), exit 1, a quick failure relaunched."""
    python = python_27()
    if python is None:
        pytest.skip("no CPython 2.7 installed beside this one")
    line = python_runner_command(_app(python), _job())
    assert run_line(line, tmp_path) == (78, (
        f"balsam: the run() app cannot run in {python} (Python {version_of(python)}): Balsam needs Python 3; "
        "set the app's python_exe to a Python that has Balsam\n"))
    assert run_line(line, tmp_path, PMI_RANK="1") == (78, "")


def _workdir_import_app(python_exe: str):
    class WorkdirImport(ApplicationDefinition):
        """run() as job scripts are written: chdir into a directory of the job, then import a
        module of the job's workdir (a helper script copied there) and a stdlib module that a data
        file of the new directory is named like. And what a thread or an atexit handler of run()
        sees of ``__main__``, sys.argv[0] and sys.path[0] once the runner has ended."""

        site = 1

        def run(self):
            import atexit
            import os
            import sys

            start = os.getcwd()

            def report():
                import __main__

                seen = [sorted(vars(__main__)), getattr(__main__.__spec__, "name", None), sys.argv[0],
                        sys.path[0] == start]
                print("AT-EXIT", repr(seen), flush=True)

            atexit.register(report)
            os.mkdir("data")
            with open(os.path.join("data", "tabnanny.py"), "w") as fh:
                fh.write("SHADOWED = True\n")
            os.chdir("data")
            try:
                import balsam_test_workdir_helper

                found = balsam_test_workdir_helper.VALUE
            except ImportError as exc:  # what the test shows, beside the rest
                found = repr(exc)
            import tabnanny

            return [found, getattr(tabnanny, "SHADOWED", False)]

    WorkdirImport.python_exe = python_exe
    WorkdirImport.__app_id__ = 45
    return WorkdirImport


def test_the_program_runs_the_runner_as_dash_m_does(tmp_path: Path) -> None:
    """This Python under another spelling (the venv's python3: not sys.executable, so the -c
    program) against the -m line. Before: sys.path[0] was "" (the directory the process is in
    NOW), so after run()'s chdir the workdir's module was not found and a data file named like a
    stdlib module shadowed it; and runpy.run_module(alter_sys=True) put back the program's
    ``__main__`` (no __spec__) and argv[0] "-c" when the runner exited, before atexit ran."""
    spelled = Path(sys.executable).with_name("python3")
    if not spelled.exists() or str(spelled) == sys.executable:
        pytest.skip("no second spelling of this Python beside it")
    seen: dict[str, list] = {}
    for label, python_exe in (("-m", sys.executable), ("-c", str(spelled))):
        job = Job._from_api({"id": 9, "workdir": "w", "app_id": 45, "serialized_parameters": codec.serialize({})})
        line = python_runner_command(_workdir_import_app(python_exe), job)
        assert (f"-m {RUNNER_MODULE}" in line) == (label == "-m")
        workdir = tmp_path / label
        workdir.mkdir()
        (workdir / "balsam_test_workdir_helper.py").write_text("VALUE = 'found'\n")
        # This test's environment (its PYTHONPATH too): the same Balsam in both.
        ran = subprocess.run(["/bin/bash", "-c", line], cwd=workdir, capture_output=True, text=True, timeout=120)
        value, exception = parse_run_markers(ran.stdout)
        assert (ran.returncode, exception) == (0, None), ran.stderr
        (at_exit,) = [x for x in ran.stdout.splitlines() if x.startswith("AT-EXIT ")]
        seen[label] = [codec.deserialize(value), ast.literal_eval(at_exit[len("AT-EXIT "):])]
    assert seen["-c"] == seen["-m"]
    (found, shadowed), (names, spec, argv0, path0) = seen["-c"]
    assert (found, shadowed, spec, argv0, path0) == ("found", False, RUNNER_MODULE, python_runner.__file__, True)
    assert "run_main" in names


def test_the_launchers_own_python_keeps_the_dash_m_line() -> None:
    """The default python_exe is the Python running the launcher, which has Balsam: its line stays
    ``-m balsam._api.python_runner``, as short as before; only another python_exe needs the program."""
    default = shlex.split(python_runner_command(_app(sys.executable), _job()))
    assert default[:5] == [sys.executable, "-m", "balsam._api.python_runner", "43", "1"]
    line = python_runner_command(_app("python3"), _job())
    bootstrap = app_module.RUNNER_BOOTSTRAP
    assert "'" not in bootstrap and line.startswith(f"python3 -c '{bootstrap}' 43 1 ")
    # The same argv after the program as after the module (two words each, as wrappers that
    # drop them expect): the runner reads them alike. (The app's payload holds its python_exe.)
    other = shlex.split(line)
    assert other[:5] == ["python3", "-c", bootstrap, "43", "1"] and other[-1] == default[-1]


def test_a_long_line_in_another_python_runs_from_a_script(tmp_path: Path) -> None:
    """The program's Python syntax sends the line through bash (its base64 words were exec'd
    directly): one over 128 KiB (a job near the parameters' limit) runs from a script file, as the
    launchers start it, in a venv where Balsam is importable."""
    python = bare_python(tmp_path)
    links = tmp_path / "deps"
    links.mkdir()
    for dep in ("attr", "attrs", "cattrs", "dill", "tblib", "typing_extensions.py", "orjson"):
        (links / dep).symlink_to(Path(tblib.__file__).parent.parent / dep)
    site = next((python.parent.parent / "lib").glob("python3.*/site-packages"))
    (site / "balsam-test.pth").write_text(f"{Path(app_module.__file__).parent.parent.parent}\n{links}\n")

    class Big(ApplicationDefinition):
        site = 1
        python_exe = str(python)

        def run(self, pad):
            return len(pad)

    Big.__app_id__ = 44
    job = Job._from_api({"id": 9, "workdir": "w", "app_id": 44,
                         "serialized_parameters": codec.serialize({"pad": "p'{$}" * 80_000})})
    line = python_runner_command(Big, job)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert len(line) > 131_072 and direct_argv(line, env) is None
    argv = shell_argv(line, str(tmp_path), job_id=9)
    assert argv[0] == "/bin/bash" and Path(argv[1]).name.startswith(".balsam_command.9.")
    ran = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert codec.deserialize(parse_run_markers(ran.stdout)[0]) == 400_000
    assert not list(tmp_path.glob(".balsam_command.*"))  # bash removed it


def test_a_run_app_in_a_python_without_balsam_runs_once(new_site, tmp_path: Path) -> None:
    """A real serial-mode launcher (its spawner applies the quick-failure rule). Before: 4 runs,
    RUN_ERROR with exit 1 and "relaunched 3 times"; now one run, 78, and the one line."""
    name, path = new_site(idle_ttl_sec=2)
    python = bare_python(tmp_path)
    wrapper = tmp_path / "bare-python"
    # Counts its starts in the job's workdir; the launcher's PYTHONPATH (if any) would hand Balsam over.
    wrapper.write_text(f'#!/bin/bash\necho run >> runs\nexec env -u PYTHONPATH {python} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)

    class NoBalsam(ApplicationDefinition):
        site = name
        python_exe = str(wrapper)

        def run(self):
            return 1

    NoBalsam.sync()
    (job_id,) = make_runnable([NoBalsam.submit(workdir="nobalsam", save=False)])
    proc = start_launcher(path, "serial", 1)
    try:
        wait_for_states([job_id], {"RUN_ERROR"}, timeout=WAIT_SEC)
    finally:
        finish(proc)
    assert (path / "data" / "nobalsam" / "runs").read_text() == "run\n"
    line = expected_line(python, version_of(python))
    assert (path / "data" / "nobalsam" / "job.out").read_text() == line + "\n"
    (event,) = [e for e in events_of([job_id])[job_id] if str(e.to_state) == "RUN_ERROR"]
    assert event.data["returncode"] == 78, event.data
    assert event.data["error"].splitlines()[0] == line and "relaunched" not in event.data["error"], event.data
    assert "relaunching" not in site_logs(path)
