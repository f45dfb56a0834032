"""A run() app that raises runs once, in every launcher mode. Real server, real launchers.

Found by a DeepHyper-style search (benchmarks/deephyper_style_search.py) through the real stack:
the python runner recorded the app's exception in job.out and exited 1, which is one of serial
mode's quick-failure codes (Balsam 0.7's ``RETRY_CODES``): the spawner relaunched it 3 more times,
each run raising the same exception (RUNNING -> RUN_ERROR median 11.1 s against 2.8 s for a
RUN_DONE). The same for a runner that cannot set up in the app's ``python_exe``. The runner now
exits 70 (the app's exception) or 78 (it cannot run there), outside the quick-failure codes.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import events_of, make_runnable, site_logs, wait_for_states

#: Generous: the outcome is waited for, never timed.
WAIT_SEC = 90


def raising_app(name: str):
    from balsam.api import ApplicationDefinition

    class Diverges(ApplicationDefinition):
        site = name

        def run(self, x):
            # Counts its runs (its working directory is the job's workdir), then fails as a
            # search's objective does for a bad point.
            with open("runs", "a") as fh:
                fh.write("run\n")
            raise ValueError(f"diverged at x={x}")

    Diverges.sync()
    return Diverges


def runs_of(path: Path, workdir: str) -> int:
    return (path / "data" / workdir / "runs").read_text().count("run\n")


def assert_run_once_and_recorded(path: Path, job_id: int, workdir: str, code: int, needle: str) -> None:
    (event,) = [e for e in events_of([job_id])[job_id] if str(e.to_state) == "RUN_ERROR"]
    assert event.data["returncode"] == code, event.data
    assert needle in event.data["error"] and "relaunched" not in event.data["error"], event.data["error"]
    text = site_logs(path)
    assert "relaunching" not in text, text[-3000:]


@pytest.mark.parametrize("mode, env", [
    ("serial", {}),  # the spawner process applies the quick-failure rule
    ("serial", {"BALSAM_LAUNCHER_SPAWNER": "0"}),  # the in-process pool applies it
    pytest.param("mpi", {}, marks=pytest.mark.mpi),  # never relaunched: the exit status is the same
])
def test_a_raising_run_app_runs_once_and_its_exception_is_recorded(new_site, mode: str, env: dict) -> None:
    from balsam._api import codec
    from balsam.site.hooks_runner import read_run_markers

    name, path = new_site(idle_ttl_sec=2)
    Diverges = raising_app(name)
    (job_id,) = make_runnable([Diverges.submit(workdir="bad", x=0.093, save=False)])
    proc = start_launcher(path, mode, 1, env=env)
    try:
        wait_for_states([job_id], {"RUN_ERROR"}, timeout=WAIT_SEC)
    finally:
        finish(proc)
    assert runs_of(path, "bad") == 1
    assert_run_once_and_recorded(path, job_id, "bad", 70, "ValueError: diverged at x=0.093")
    # What the processing module reads into job.result(): the app's own exception.
    value, exc = read_run_markers(path / "data" / "bad")
    assert value == "" and exc
    with pytest.raises(ValueError, match="diverged at x=0.093"):
        raise codec.deserialize_exception(exc)


def test_a_run_app_whose_python_cannot_set_up_runs_once(new_site, tmp_path: Path) -> None:
    """A python_exe without dill (here: one that hides it), as in commit 0aab011: one line naming
    the interpreter, exit 78, run once (it was relaunched 3 times, each failing the same way)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)
    wrapper = tmp_path / "python-without-dill"
    # Counts its starts in the job's workdir, then runs the runner with dill unimportable.
    wrapper.write_text(
        "#!/bin/bash\necho run >> runs\n"
        f"exec {sys.executable} -c 'import sys, runpy; sys.modules[\"dill\"] = None; sys.argv = sys.argv[2:]; "
        "sys.argv[0] = \"python_runner\"; runpy.run_module(\"balsam._api.python_runner\", run_name=\"__main__\")' "
        '"$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)

    class NoDill(ApplicationDefinition):
        site = name
        python_exe = str(wrapper)

        def run(self):
            return 1

    NoDill.sync()
    (job_id,) = make_runnable([NoDill.submit(workdir="nodill", save=False)])
    proc = start_launcher(path, "serial", 1)
    try:
        wait_for_states([job_id], {"RUN_ERROR"}, timeout=WAIT_SEC)
    finally:
        finish(proc)
    assert runs_of(path, "nodill") == 1
    assert_run_once_and_recorded(path, job_id, "nodill", 78, "module 'dill' is not installed")
