"""The user docs' API examples run as written, and libEnsemble 1.5.0's BalsamExecutor works end to end."""

from __future__ import annotations

import threading
import time

import pytest

# seeds/001 (Balsam on Aurora): balsam_job_ensemble.py, verbatim
SEED_001_ENSEMBLE = '''
from balsam.api import ApplicationDefinition, Job

# Define an application that runs an echo command and takes an input
class EchoHello(ApplicationDefinition):
    site = "test_aurora"
    command_template = "echo Hello, {{ say_hello_to }}! ZE_AFFINITY_MASK=$ZE_AFFINITY_MASK OMP_NUM_THREADS=$OMP_NUM_THREADS"
EchoHello.sync()

# Define an application that runs a compiled executable and is wrapped by the gpu affinity script
class HelloAffinity(ApplicationDefinition):
    site = "test_aurora"
    command_template = "$HOME/GettingStarted/HelperScripts/Aurora/set_affinity_gpu_aurora.sh $HOME/GettingStarted/Examples/Aurora/affinity_gpu/sycl/hello_affinity"
HelloAffinity.sync()

# Create a Balsam job that runs hello_affinity on one node with twelve ranks per node
affinity_job = Job(site_name="test_aurora",
                   app_id="HelloAffinity",
                   workdir=f"demo/hello_affinity",
                   tags={"workflow":"demo"},
                   num_nodes=1,
                   node_packing_count=1,
                   ranks_per_node=12,
                   gpus_per_rank=1)

# This call saves a single Balsam job to the database
affinity_job.save()

# Create many Balsam jobs that run the EchoHello app each on a single tile
echo_jobs = [Job( site_name="test_aurora", 
         app_id="EchoHello", 
         workdir=f"demo/echo_hello{n}", 
         parameters={"say_hello_to": f"world {n}!"},
         tags={"workflow":"demo"}, 
         node_packing_count=12, # this allows for 12 of these jobs to run concurrently on a node
         gpus_per_rank=1,
         ranks_per_node=1,)       
    for n in range(24)
]

# This call saves a list of jobs to the database
echo_jobs = Job.objects.bulk_create(echo_jobs)
'''

# seeds/001: submit_mpi_mode.py, verbatim
SEED_001_SUBMIT = '''
from balsam.api import BatchJob, Site

# Get the site id
site = Site.objects.get("test_aurora")
site_id = site.id

# Submit batch job to PBS
BatchJob.objects.create(
   site_id=site_id,
   num_nodes=2,
   wall_time_min=10,
   job_mode="mpi", # This mode will execute the application with mpiexec
   queue="debug-scaling",
   project="Aurora_deployment", # put your <project_name> here
)
'''


def test_seed_001_examples_run_as_written(balsam_env, tmp_path):
    from balsam.api import App, BatchJob, Job, Site

    Site.objects.create(name="test_aurora", path=str(tmp_path / "test_aurora"))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(SEED_001_ENSEMBLE, "balsam_job_ensemble.py", "exec"), namespace)
    exec(compile(SEED_001_SUBMIT, "submit_mpi_mode.py", "exec"), {"__name__": "__main__"})

    assert sorted(a.name for a in App.objects.all()) == ["EchoHello", "HelloAffinity"]
    assert Job.objects.filter(tags={"workflow": "demo"}).count() == 25
    assert len(namespace["echo_jobs"]) == 24 and all(j.id for j in namespace["echo_jobs"])
    echo = Job.objects.get(workdir__contains="echo_hello3")
    assert echo.node_packing_count == 12 and echo.gpus_per_rank == 1.0
    cmd = namespace["EchoHello"](echo).get_arg_str()
    assert cmd.startswith("echo Hello, 'world 3!'! ZE_AFFINITY_MASK=$ZE_AFFINITY_MASK")
    affinity = Job.objects.get(id=namespace["affinity_job"].id)
    assert affinity.ranks_per_node == 12 and affinity.state.value == "STAGED_IN"
    (bj,) = BatchJob.objects.all()
    assert (bj.num_nodes, bj.queue, bj.project, bj.job_mode.value) == (2, "debug-scaling", "Aurora_deployment", "mpi")


def _drive_like_a_site(site, stop: threading.Event, errors: list) -> None:
    """What the agent and a launcher do, through the API: submit the BatchJob, run jobs, finish them."""
    from balsam.api import BatchJob, Job, Session

    try:
        session = None
        while not stop.is_set():
            for bj in BatchJob.objects.filter(site_id=site.id, state="pending_submission"):
                bj.state = "queued"
                bj.scheduler_id = 4242
                bj.save()
            staged = list(Job.objects.filter(site_id=site.id, state="STAGED_IN"))
            for job in staged:
                job.state = "PREPROCESSED"
            Job.objects.bulk_update(staged)
            session = session or Session.objects.create(site_id=site.id)
            acquired = session.acquire_jobs(max_num_jobs=16)
            for job in acquired:
                job.state = "RUNNING"
                job.state_data = {"num_nodes": 1}
            Job.objects.bulk_update(acquired)
            time.sleep(0.3)
            for job in acquired:
                job.state = "RUN_DONE"
                job.return_code = 0
            Job.objects.bulk_update(acquired)
            for job in acquired:
                job.state = "POSTPROCESSED"
            Job.objects.bulk_update(acquired)
            time.sleep(0.1)
        if session is not None:
            session.delete()
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


@pytest.mark.timeout(300)
def test_libensemble_balsam_executor_end_to_end(balsam_env, tmp_path):
    """seeds/003: register_app, submit_allocation, submit, poll, wait, revoke_allocation."""
    from libensemble.executors.balsam_executor import BalsamExecutor
    from libensemble.executors.executor import Executor

    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job, Site

    site = Site.objects.create(name="my-balsam-site", path=str(tmp_path / "my-balsam-site"))

    class HelloApp(ApplicationDefinition):
        site = "my-balsam-site"
        command_template = "/path/to/hello.app {{ my_name }}"

    exctr = BalsamExecutor()
    try:
        exctr.register_app(HelloApp, app_name="hello")
        allocation = exctr.submit_allocation(
            site_id=site.id,  # corresponds to "my-balsam-site", found via ``balsam site ls``
            num_nodes=4,  # Total number of nodes requested for *all jobs*
            wall_time_min=30,
            queue="debug-queue",
            project="my-project",
        )
        assert isinstance(allocation, BatchJob) and allocation.state.value == "pending_submission"

        args = {"my_name": "World"}
        task = exctr.submit(app_name="hello", app_args=args, num_procs=4, num_nodes=1, procs_per_node=4)
        task2 = exctr.submit(app_name="hello", app_args={"my_name": "Again"}, num_nodes=1, procs_per_node=1,
                             max_tasks_per_node=2, tags={"batch": "2"})
        job = task.process
        assert isinstance(job, Job) and job.id is not None
        assert job.get_parameters() == {"my_name": "World"} and str(job.workdir) == "libe_workflow"
        assert job.ranks_per_node == 4 and task2.process.node_packing_count == 2
        task.poll()
        assert task.state == "WAITING" and not task.finished

        stop, errors = threading.Event(), []
        driver = threading.Thread(target=_drive_like_a_site, args=(site, stop, errors), daemon=True)
        driver.start()
        try:
            task.wait(timeout=120)
            task2.wait(timeout=120)
        finally:
            stop.set()
            driver.join(timeout=60)
        assert not errors, errors
        assert task.finished and task.success and task.state == "FINISHED"
        assert task.runtime >= 0 and task2.success
        assert Job.objects.get(id=job.id).state.value == "JOB_FINISHED"
        assert EventLog.objects.filter(job_id=job.id, to_state="RUNNING").count() == 1
        task.poll()  # polling a finished task is harmless
        assert exctr.revoke_allocation(allocation, timeout=30) is True
        assert BatchJob.objects.get(id=allocation.id).state.value == "pending_deletion"

        killed = exctr.submit(app_name="hello", app_args={"my_name": "Gone"}, num_nodes=1, procs_per_node=1)
        killed_id = killed.process.id
        killed.kill()
        assert killed.state == "USER_KILLED"
        assert not Job.objects.filter(id=killed_id).count()
    finally:
        Executor.executor = None


def test_balsam_util_as_libensemble_uses_it():
    import logging

    from balsam import util

    logger = util.config_root_logger("ERROR")
    assert logger.name == "balsam" and logger.level == logging.ERROR
    util.config_root_logger("debug")
    assert logger.level == logging.DEBUG
    assert len([h for h in logger.handlers if h.get_name() == "balsam-console"]) == 1
    with pytest.raises(ValueError, match="unknown log level"):
        util.config_root_logger("LOUD")
    util.config_root_logger("WARNING")
