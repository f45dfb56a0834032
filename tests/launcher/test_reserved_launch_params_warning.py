"""A job's launch param that names an option balsam sets from the placement (``ppn``) is not passed
to mpiexec, and mpi mode's warning names the job and its app, once for all the jobs of that app.

Real launcher (mpi mode, default platform, the MPICH ``mpiexec`` of the test environment) and real
server; the drivers' lines themselves are tested in tests/platforms/test_launch_params_reserved.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_mode_names_the_job_and_app_of_a_refused_launch_param_once(new_site, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path = new_site(idle_ttl_sec=2)

    class Hello(ApplicationDefinition):
        site = name
        command_template = "echo hello"

    Hello.sync()
    ids = make_runnable([Hello.submit(workdir=f"hello{i}", launch_params={"ppn": "4"}, save=False)
                         for i in range(3)])
    batch_job = BatchJob.objects.create(site_id=Hello.resolve_site_id(), project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode="mpi", scheduler_id=4243)
    proc = start_launcher(path, "mpi", 1, env={"BALSAM_BATCH_JOB_ID": str(batch_job.id)})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR", "JOB_FINISHED", "FAILED"}, timeout=90)
    assert finish(proc) == 0
    assert {str(j.state) for j in jobs.values()} <= {"RUN_DONE", "JOB_FINISHED"}, jobs
    for i in range(3):
        assert (path / "data" / f"hello{i}" / "job.out").read_text().strip() == "hello"
    log = "\n".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    warned = [line for line in log.splitlines() if "launch param 'ppn'" in line]
    assert len(warned) == 1, warned
    app_id = next(iter(jobs.values())).app_id
    assert any(f"of job {i} (app {app_id}) not passed to mpiexec: balsam sets -ppn 1 itself" in warned[0]
               for i in ids), warned
    assert f"the same for every job of app {app_id} with launch param 'ppn'" in warned[0]
