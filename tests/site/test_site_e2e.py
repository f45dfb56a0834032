"""End to end: a real uvicorn server, the real site agent daemon, real launchers started by the local
scheduler from the job template, real mpiexec (MPICH) with mpi4py.

- the seed's Aurora example (seeds/001) adapted to a local site, driven through the CLI;
- a dependency DAG;
- a timeout re-queued and re-run;
- an error ending FAILED with the tail of its output;
- a refused BatchJob explained in ``balsam queue ls -v``;
- the site agent restarted in the middle of a campaign;
- the main job (``balsam demo``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from site_test_utils import all_done, batch_job, create_batch_job, events, job_rows, state_counts, state_path, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def balsam(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"balsam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_seed_aurora_example_on_a_local_site(make_site, agent_daemon, client) -> None:
    """seeds/001 ("Balsam on Aurora"), with the local scheduler and an mpi4py hello instead of hello_affinity."""
    from balsam.api import ApplicationDefinition, BatchJob, Job, Site

    site = make_site(name="test_local")
    site_path = Path(site.site_path)
    agent_daemon(site)

    class EchoHello(ApplicationDefinition):
        site = "test_local"
        command_template = "echo Hello, {{ say_hello_to }}! OMP_NUM_THREADS=$OMP_NUM_THREADS"

    EchoHello.sync()

    class HelloAffinity(ApplicationDefinition):
        site = "test_local"
        command_template = f"{sys.executable} -m mpi4py.bench helloworld"

    HelloAffinity.sync()

    affinity_job = Job(site_name="test_local", app_id="HelloAffinity", workdir="demo/hello_affinity",
                       tags={"workflow": "demo"}, num_nodes=1, node_packing_count=1, ranks_per_node=2)
    affinity_job.save()
    echo_jobs = [
        Job(site_name="test_local", app_id="EchoHello", workdir=f"demo/echo_hello{n}",
            parameters={"say_hello_to": f"world {n}!"}, tags={"workflow": "demo"}, node_packing_count=12,
            ranks_per_node=1)
        for n in range(24)
    ]
    echo_jobs = Job.objects.bulk_create(echo_jobs)

    apps = balsam("app", "ls", cwd=site_path).stdout
    assert "EchoHello" in apps and "HelloAffinity" in apps
    assert "demo/echo_hello3" in balsam("job", "ls", cwd=site_path).stdout

    # "balsam queue submit -n 2 -t 10 -q debug-scaling -A <project_name> -j mpi", on our local queue
    balsam("queue", "submit", "-n", "1", "-t", "10", "-q", "local", "-A", "local", "-j", "mpi", cwd=site_path)
    assert "local" in balsam("queue", "ls", cwd=site_path).stdout
    wait_for(lambda: all_done(client, 25, site_id=site.site_id), timeout=120, what="the 25 seed jobs")
    assert state_counts(client, site_id=site.site_id) == {"JOB_FINISHED": 25}

    outputs = {p.parent.name: p.read_text() for p in (site_path / "data" / "demo").glob("*/job.out")}
    assert "Hello, world 3!!" in outputs["echo_hello3"]
    assert "I am process 0 of 2" in outputs["hello_affinity"] and "I am process 1 of 2" in outputs["hello_affinity"]

    # The BatchJob through the Python API as in the seed's submit_mpi_mode.py, then the history listing
    assert Site.objects.get(name="test_local").id == site.site_id
    made = BatchJob.objects.create(site_id=site.site_id, num_nodes=1, wall_time_min=10, job_mode="mpi",
                                   queue="local", project="local")
    wait_for(lambda: batch_job(client, made.id)["state"] in ("queued", "running", "finished"), timeout=30,
             what="the API BatchJob to be submitted")
    history = balsam("queue", "ls", "--history", cwd=site_path).stdout
    assert "finished" in history or "running" in history


def test_dag_children_wait_for_their_parents(make_site, agent_daemon, client) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id
    agent_daemon(site)

    class Step(ApplicationDefinition):
        site = site_id
        command_template = "sleep 0.2; echo {{ name }} > out.txt; cat ../*/out.txt 2>/dev/null | wc -l"

    roots = Job.objects.bulk_create([Job(f"dag/a{i}", Step, parameters={"name": f"a{i}"}, tags={"dag": "1"})
                                     for i in range(3)])
    (middle,) = Job.objects.bulk_create([Job("dag/b", Step, parameters={"name": "b"}, tags={"dag": "1"},
                                             parent_ids={j.id for j in roots})])
    leaves = Job.objects.bulk_create([Job(f"dag/c{i}", Step, parameters={"name": f"c{i}"}, tags={"dag": "1"},
                                          parent_ids={middle.id}) for i in range(2)])
    assert {r["state"] for r in job_rows(client, id=[middle.id] + [j.id for j in leaves])} == {"AWAITING_PARENTS"}
    create_batch_job(client, site.site_id, "serial", filter_tags={"dag": "1"})
    wait_for(lambda: all_done(client, 6, site_id=site.site_id), timeout=120, what="the DAG")
    assert state_counts(client, site_id=site.site_id) == {"JOB_FINISHED": 6}

    def first(job_id: int, state: str) -> str:
        return min(e["timestamp"] for e in events(client, job_id=job_id) if e["to_state"] == state)

    roots_done = max(first(j.id, "JOB_FINISHED") for j in roots)
    assert first(middle.id, "RUNNING") > roots_done
    for leaf in leaves:
        assert first(leaf.id, "RUNNING") > first(middle.id, "JOB_FINISHED")


def test_timeout_is_requeued_and_rerun(make_site, agent_daemon, client) -> None:
    """A BatchJob ends under a running job (here: the user deletes it) -> RUN_TIMEOUT -> the default
    handle_timeout re-queues it (RESTART_READY) -> the next BatchJob runs it to the end."""
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id
    agent_daemon(site)

    class SlowOnce(ApplicationDefinition):
        site = site_id
        # mpi mode puts `mpiexec ...` in front of the command: a compound command needs its own shell
        command_template = "bash -c 'if [ -e ran_once ]; then echo second run; else touch ran_once; echo first run; sleep 300; fi'"

    job = Job("slow/once", SlowOnce)
    job.save()
    first_bj = create_batch_job(client, site.site_id, "mpi")
    wait_for(lambda: job_rows(client, id=job.id)[0]["state"] == "RUNNING", timeout=60, what="the first run")
    client.put(f"/batch-jobs/{first_bj['id']}", json={"state": "pending_deletion"})
    # The agent's next poll sees the deletion, the local scheduler signals the launcher, which ends
    # the run: a few seconds alone, longer on a loaded CI machine (a bound, not a measurement).
    try:
        wait_for(lambda: job_rows(client, id=job.id)[0]["state"] == "RESTART_READY", timeout=150,
                 what="RUN_TIMEOUT -> RESTART_READY")
    except AssertionError as exc:  # say where the job went instead
        raise AssertionError(f"{exc}; the job went {state_path(events(client, job_id=job.id))}") from None
    wait_for(lambda: batch_job(client, first_bj["id"])["state"] == "finished", timeout=30, what="the deleted BatchJob")
    create_batch_job(client, site.site_id, "mpi")
    wait_for(lambda: job_rows(client, id=job.id)[0]["state"] == "JOB_FINISHED", timeout=60, what="the re-run")
    path = state_path(events(client, job_id=job.id))
    assert path[path.index("RUNNING"):] == ["RUNNING", "RUN_TIMEOUT", "RESTART_READY", "RUNNING", "RUN_DONE",
                                            "POSTPROCESSED", "JOB_FINISHED"]
    out = (Path(site.data_path) / "slow/once/job.out").read_text()
    assert "second run" in out


def test_error_ends_failed_with_its_tail(make_site, agent_daemon, client) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    site_id = site.site_id
    agent_daemon(site)

    class Crash(ApplicationDefinition):
        site = site_id
        command_template = "for i in $(seq 1 20); do echo step $i; done; echo 'bad thing happened' >&2; exit 3"

    job = Job("crash/0", Crash)
    job.save()
    create_batch_job(client, site.site_id, "serial")
    wait_for(lambda: job_rows(client, id=job.id)[0]["state"] == "FAILED", timeout=90, what="FAILED")
    evts = events(client, job_id=job.id)
    assert state_path(evts)[-2:] == ["RUN_ERROR", "FAILED"]
    failed = evts[-1]["data"]
    assert failed["error"].splitlines()[-1] == "bad thing happened"
    assert "step 20" in failed["error"] and "step 1\n" not in failed["error"]  # the tail, not everything
    out = balsam("job", "ls", "--state", "failed", cwd=Path(site.site_path)).stdout
    assert "crash/0" in out


def test_refused_batch_job_is_explained(make_site, agent_daemon, client) -> None:
    site = make_site()
    site_id = site.site_id
    agent_daemon(site)
    refused = create_batch_job(client, site.site_id, "mpi", queue="debug-scaling")
    wait_for(lambda: batch_job(client, refused["id"])["state"] == "submit_failed", timeout=30, what="the refusal")
    reason = batch_job(client, refused["id"])["status_info"]["error"]
    assert "queue 'debug-scaling' is not in the site's allowed_queues" in reason
    verbose = balsam("queue", "ls", "-v", "--history", cwd=Path(site.site_path)).stdout
    assert "debug-scaling" in verbose and "allowed_queues" in verbose


def test_agent_restart_mid_campaign(make_site, agent_daemon, client) -> None:
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.site_ops import start_agent, stop_agent

    site = make_site()
    site_id = site.site_id
    site_path = Path(site.site_path)
    agent_daemon(site)

    class Tick(ApplicationDefinition):
        site = site_id
        command_template = "sleep 0.05; echo tick {{ i }}"

    total = 150
    Job.objects.bulk_create([Job(f"ticks/{i:03d}", Tick, parameters={"i": i}) for i in range(total)])
    create_batch_job(client, site.site_id, "serial")
    wait_for(lambda: state_counts(client, site_id=site.site_id)["JOB_FINISHED"] >= 10, timeout=90,
             what="the campaign to start")
    assert stop_agent(site_path, timeout=30) is not None
    time.sleep(1.0)  # the launcher keeps running jobs meanwhile; their RUN_DONE waits for processing
    start_agent(site_path)
    wait_for(lambda: all_done(client, total, site_id=site.site_id), timeout=180, what="the whole campaign")
    assert state_counts(client, site_id=site.site_id) == {"JOB_FINISHED": total}
    runs = [e for e in events(client, to_state="RUNNING") if e["job_id"] in {r["id"] for r in job_rows(client, site_id=site.site_id)}]
    assert len(runs) == total  # every job ran exactly once
    assert len(list((site_path / "log").glob("agent_*.log"))) >= 2


def test_main_job_demo(balsam_env, tmp_path) -> None:
    """`balsam demo` (what scripts/demo.sh runs after bootstrap) on the test server's login."""
    site_path = tmp_path / "demo-site"
    proc = subprocess.run(
        [sys.executable, "-c", "from balsam.cli import main; main()", "demo", "--num-jobs", "150",
         "--site-path", str(site_path), "--stop-agent", "--timeout", "240"],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "==> Summary" in out and "JOB_FINISHED" in out and "FAILED" not in out.split("==> Summary")[1]
    assert "DAG: 1^2 + 2^2 + 3^2 + 4^2 = 30" in out
    assert "Python run() results: 0^2 = 0, 1^2 = 1, 2^2 = 4" in out
    assert "jobs/s" in out
    assert (site_path / ".balsam-site").exists() and not (site_path / "balsam-service.pid").exists()
