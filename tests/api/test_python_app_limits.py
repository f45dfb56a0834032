"""run() apps near the size limits: big parameters and results with real launchers (both modes,
real mpiexec), and a result over the server's limit.

Linux caps one exec argument at 128 KiB (MAX_ARG_STRLEN): a run() job's command line carries its
job's JSON, which through ``bash -c`` was one argument, so a job with a 200,000-character parameter
never started ("Argument list too long"), and a re-run of a job with a ~100 KB result neither.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from balsam.models import MAX_SERIALIZED_PAYLOAD_CHARS

sys.path.insert(0, str(Path(__file__).parent.parent / "launcher"))

from launcher_harness import finish, make_site, start_launcher  # noqa: E402
from launcher_helpers import make_runnable, wait_for_states  # noqa: E402

#: Shell syntax in every chunk ({, }, $, ', \, !): what made the line go through bash.
BIG_PARAM = ("x{y}$z'q\\!" * 20_000)[:200_000]


def _marker_result(path: Path, workdir: str) -> Any:
    from balsam._api.app import parse_run_markers
    from balsam._api.codec import deserialize, deserialize_exception

    text = (path / "data" / workdir / "job.out").read_text()
    value, exc = parse_run_markers(text)
    assert exc is None, deserialize_exception(exc)
    assert value is not None, text[-2000:]
    return deserialize(value)


def _launch(path: Path, mode: str) -> Any:
    from balsam.api import BatchJob, Site

    site_id = int((path / ".balsam-site").read_text())
    assert Site.objects.get(id=site_id)
    if mode == "mpi":
        return start_launcher(path, mode, 1)
    batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode=mode, scheduler_id=4343)
    assert batch_job.id
    return start_launcher(path, mode, 1, env={"BALSAM_LOCAL_JOB_ID": "4343"})


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "mpi"])
@pytest.mark.parametrize("preamble", ["", "export LIMITS_PRE=set"])
def test_a_200k_character_parameter_runs(mode: str, preamble: str, balsam_env: Any, tmp_path: Path) -> None:
    """Without a preamble the line is exec'd as argv (each chunk one argument); with one it must
    go through bash, from a file in the workdir (``bash -c`` would take it as one argument)."""
    from balsam.api import ApplicationDefinition

    name = f"limits-{mode}-{os.getpid()}"
    path = make_site(tmp_path / name, name, {"idle_ttl_sec": 2})

    class Measure(ApplicationDefinition):
        site = name

        def shell_preamble(self):
            return preamble

        def run(self, text):
            import os

            return (len(text), text == ("x{y}$z'q\\!" * 20_000)[:200_000], os.environ.get("LIMITS_PRE"))

    Measure.sync()
    # And one at the server's limit on serialized parameters (dill+base64: 4/3 of the text).
    near_limit = "n" * (MAX_SERIALIZED_PAYLOAD_CHARS * 3 // 4 - 200)
    jobs = [Measure.submit(workdir="big", text=BIG_PARAM, save=False),
            Measure.submit(workdir="limit", text=near_limit, save=False)]
    assert MAX_SERIALIZED_PAYLOAD_CHARS - 1000 < len(jobs[1].serialized_parameters) <= MAX_SERIALIZED_PAYLOAD_CHARS
    ids = make_runnable(jobs)
    proc = _launch(path, mode)
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"}, timeout=90)
    assert finish(proc) == 0
    for job_id, workdir in zip(ids, ["big", "limit"]):
        out = (path / "data" / workdir / "job.out").read_text()
        assert str(jobs[job_id].state) == "RUN_DONE", out[-2000:]
    assert _marker_result(path, "big") == (200_000, True, "set" if preamble else None)
    # Exec'd as argv without a preamble; through bash, from a script with one, which removed itself.
    assert not [p.name for p in (path / "data" / "big").iterdir() if p.name.startswith(".balsam_command")]
    assert _marker_result(path, "limit")[0] == len(near_limit)


@pytest.mark.slow
def test_a_rerun_of_a_job_with_a_big_result_starts(balsam_env: Any, tmp_path: Path) -> None:
    """The job's JSON on the runner's command line no longer carries the previous run's result."""
    from balsam.api import ApplicationDefinition, Job

    name = f"limits-rerun-{os.getpid()}"
    path = make_site(tmp_path / name, name, {"idle_ttl_sec": 2})

    class Big(ApplicationDefinition):
        site = name

        def run(self, n):
            return "r" * n

    Big.sync()
    ids = make_runnable([Big.submit(workdir="rerun", n=150_000, save=False)])
    proc = _launch(path, "serial")
    wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"}, timeout=90)
    assert finish(proc) == 0
    from balsam._api.app import parse_run_markers

    value, _ = parse_run_markers((path / "data" / "rerun" / "job.out").read_text())
    assert value is not None and len(value) > 100_000
    # As the processing module stores it; then the user re-runs the job.
    Job.objects.filter(id=ids).update(serialized_return_value=value, state="RESTART_READY")
    job = Job.objects.get(id=ids[0])
    assert len(job.serialized_return_value) == len(value)
    assert len(Big(job).get_arg_str()) < 20_000  # the result is not shipped to the runner
    proc = _launch(path, "serial")
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR"}, timeout=90)
    assert finish(proc) == 0
    out = (path / "data" / "rerun" / "job.out").read_text()
    assert str(jobs[ids[0]].state) == "RUN_DONE", out[-2000:]
    assert _marker_result(path, "rerun") == "r" * 150_000
