"""libEnsemble 1.5.0's BalsamExecutor against the whole stack, with nobody driving job states by hand.

A real uvicorn server, a real site (default platform, local scheduler) with its agent daemon; the
executor registers an app, asks for an allocation, submits tasks and waits for them. The agent's
scheduler module submits the BatchJob to the local scheduler, the launcher started from the job
template runs the jobs under real MPICH ``mpiexec`` with mpi4py, the processing module finishes them,
and ``revoke_allocation`` ends the BatchJob through the scheduler module. A second test revokes an
allocation whose launcher already left on its own (Balsam 0.7 accepted that; it must not raise).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from site_test_utils import batch_job, events, job_rows, state_path, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

SQUARE_SCRIPT = """\
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
x = int(sys.argv[1])
ranks = comm.gather(comm.Get_rank(), root=0)
if comm.Get_rank() == 0:
    print(f"square of {x} is {x * x} on {comm.Get_size()} ranks {sorted(ranks)}", flush=True)
"""


@pytest.mark.timeout(180)
def test_balsam_executor_runs_tasks_on_a_real_site(make_site, agent_daemon, client, tmp_path: Path) -> None:
    from libensemble.executors.balsam_executor import BalsamExecutor, BalsamTask
    from libensemble.executors.executor import Executor

    from balsam.api import ApplicationDefinition, BatchJob, Job

    # A launcher that outlives its idle tasks, so revoke_allocation has a running allocation to end.
    site = make_site(name="libe-site", overrides={"launcher": {"idle_ttl_sec": 120}})
    agent_daemon(site)
    script = tmp_path / "square.py"
    script.write_text(textwrap.dedent(SQUARE_SCRIPT))

    class SquareApp(ApplicationDefinition):
        site = "libe-site"
        command_template = f"{sys.executable} {script} {{{{ x }}}}"

    exctr = BalsamExecutor()
    try:
        exctr.register_app(SquareApp, app_name="square")
        allocation = exctr.submit_allocation(site_id=site.site_id, num_nodes=1, wall_time_min=10, job_mode="mpi",
                                             queue="local", project="local")
        assert isinstance(allocation, BatchJob) and allocation.id is not None

        tasks: list[BalsamTask] = []
        for x in range(1, 5):
            ranks = 2 if x % 2 == 0 else 1
            tasks.append(exctr.submit(app_name="square", app_args={"x": x}, num_nodes=1, procs_per_node=ranks,
                                      max_tasks_per_node=4, workdir=f"square{x}"))
        assert {str(t.process.workdir) for t in tasks} == {f"libe_workflow/square{x}" for x in range(1, 5)}

        # poll() until the first task is done, wait() for the rest: both must see the real site's progress
        seen_states = set()

        def first_done() -> bool:
            tasks[0].poll()
            seen_states.add(tasks[0].state)
            return tasks[0].finished

        wait_for(first_done, timeout=60, interval=0.2, what="the first task through poll()")
        for task in tasks[1:]:
            task.wait(timeout=60)

        for task in tasks:
            assert task.finished and task.success and task.state == "FINISHED", (task.name, task.state)
            assert task.runtime >= 0
        assert seen_states <= {"WAITING", "RUNNING", "FINISHED"} and "FINISHED" in seen_states

        # The processing module carries every job on to JOB_FINISHED (RUN_DONE is enough for libEnsemble).
        ids = [t.process.id for t in tasks]
        wait_for(lambda: {r["state"] for r in job_rows(client, id=ids)} == {"JOB_FINISHED"}, timeout=30,
                 what="JOB_FINISHED for every task")
        for task in tasks:
            job = Job.objects.get(id=task.process.id)
            assert job.batch_job_id == allocation.id, "the job ran outside the allocation the executor asked for"
            path = state_path(events(client, job_id=job.id))
            assert path[path.index("RUNNING"):] == ["RUNNING", "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"]

        data = Path(site.data_path)
        for x, task in zip(range(1, 5), tasks):
            ranks = [0, 1] if x % 2 == 0 else [0]
            out = (data / "libe_workflow" / f"square{x}" / "job.out").read_text()
            assert f"square of {x} is {x * x} on {len(ranks)} ranks {ranks}" in out, out

        # The BatchJob's state follows the scheduler's listing, one sync period behind the launcher.
        wait_for(lambda: batch_job(client, allocation.id)["state"] == "running", timeout=15,
                 what="the allocation to show running")
        assert exctr.revoke_allocation(allocation, timeout=30) is True
        wait_for(lambda: batch_job(client, allocation.id)["state"] == "finished", timeout=30,
                 what="the revoked allocation to finish")
        assert BatchJob.objects.get(id=allocation.id).state.value == "finished"
    finally:
        Executor.executor = None


@pytest.mark.timeout(120)
def test_revoking_an_allocation_that_already_ended(make_site, agent_daemon, client, tmp_path: Path) -> None:
    """libEnsemble revokes its allocation when the ensemble is done; by then the launcher may have left
    on its own (idle, wall time). Balsam 0.7 accepted that revoke; it must not raise, and the BatchJob
    stays finished."""
    from libensemble.executors.balsam_executor import BalsamExecutor
    from libensemble.executors.executor import Executor

    from balsam.api import ApplicationDefinition, BatchJob

    site = make_site(name="libe-idle-site")  # launchers leave after 3 idle seconds
    agent_daemon(site)

    class EchoApp(ApplicationDefinition):
        site = "libe-idle-site"
        command_template = "echo hello {{ name }}"

    exctr = BalsamExecutor()
    try:
        exctr.register_app(EchoApp, app_name="echo")
        allocation = exctr.submit_allocation(site_id=site.site_id, num_nodes=1, wall_time_min=10, job_mode="serial",
                                             queue="local", project="local")
        task = exctr.submit(app_name="echo", app_args={"name": "libE"}, workdir="echo")
        task.wait(timeout=60)
        assert task.finished and task.success and task.state == "FINISHED"
        out = (Path(site.data_path) / "libe_workflow" / "echo" / "job.out").read_text()
        assert "hello libE" in out

        wait_for(lambda: batch_job(client, allocation.id)["state"] == "finished", timeout=40,
                 what="the idle launcher to leave and the allocation to finish")
        ended = batch_job(client, allocation.id)
        assert exctr.revoke_allocation(allocation, timeout=10) is True
        after = BatchJob.objects.get(id=allocation.id)
        assert after.state.value == "finished"
        assert batch_job(client, allocation.id)["end_time"] == ended["end_time"]
    finally:
        Executor.executor = None
