"""The Slurm driver against the real Slurm of the CI host (shared/ci/start-slurm.sh)."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from balsam.scheduler import SchedulerError, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_slurm import SlurmScheduler

from fake_env import ended, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PARTITION = "debug"
ACCOUNT = "root"


@pytest.fixture
def slurm(monkeypatch) -> SlurmScheduler:
    # a user's own formats and filters must change nothing
    monkeypatch.setenv("SQUEUE_FORMAT", "%i %u")
    monkeypatch.setenv("SQUEUE_STATES", "PD")
    monkeypatch.setenv("SACCT_FORMAT", "jobid")
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")
    return SlurmScheduler(user=getpass.getuser())


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.sh"
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return path


def _request(script: Path, **kw) -> SubmitRequest:
    fields = dict(script_path=script, project=ACCOUNT, queue=PARTITION, num_nodes=2, wall_time_min=5,
                  job_name=script.stem)
    fields.update(kw)
    return SubmitRequest(**fields)


def test_submit_poll_history(slurm, tmp_path):
    script = _script(tmp_path, "qlaunch00001", 'echo "job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST"; sleep 3')
    jobid = slurm.submit(_request(script, optional_params={"sbatch_flags": "--comment=balsam-test"}))
    status = wait_for(lambda: slurm.get_statuses().get(jobid), 20, "the job in squeue")
    assert status.num_nodes == 2 and status.queue == PARTITION and status.project == ACCOUNT
    assert status.wall_time_min == 5
    histories = wait_for(lambda: (h := slurm.get_histories({jobid: script})) and ended(h[jobid]) and h, 60,
                         "sacct to record the end")
    history = histories[jobid]
    assert history.state is BatchJobState.finished and history.native_state == "COMPLETED"
    assert history.start_time is not None and history.end_time >= history.start_time
    assert jobid not in slurm.get_statuses()
    output = script.with_suffix(".output").read_text()
    assert f"job={jobid} nodes=node[" in output


def test_refused_submission_keeps_slurms_reason(slurm, tmp_path):
    script = _script(tmp_path, "qlaunch00002", "true")
    with pytest.raises(SchedulerError, match="Invalid partition name specified") as info:
        slurm.submit(_request(script, queue="nosuchpartition"))
    assert info.value.permanent
    with pytest.raises(SchedulerError, match="Invalid .*reservation|Requested reservation is invalid"):
        slurm.submit(_request(script, optional_params={"reservation": "nosuchreservation"}))


def test_an_earlier_submission_is_found_by_name_and_script(slurm, tmp_path):
    """What the agent asks after an interrupted sbatch: the job of that name from that script, not
    another directory's job of the same name; also once it has ended (squeue --states=all)."""
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-b").mkdir()
    script = _script(tmp_path / "site-a", "qlaunch00004", "sleep 120")
    other = _script(tmp_path / "site-b", "qlaunch00004", "sleep 120")
    assert slurm.find_submitted(_request(script, num_nodes=1)) == []
    jobid = slurm.submit(_request(script, num_nodes=1))
    other_id = slurm.submit(_request(other, num_nodes=1))
    assert slurm.find_submitted(_request(script, num_nodes=1)) == [jobid]
    assert slurm.find_submitted(_request(other, num_nodes=1)) == [other_id]
    slurm.delete_job(jobid)
    slurm.delete_job(other_id)
    wait_for(lambda: jobid not in slurm.get_statuses(), 30, "the cancelled job to leave the queue")
    assert slurm.find_submitted(_request(script, num_nodes=1)) == [jobid]


def test_delete_running_job(slurm, tmp_path):
    script = _script(tmp_path, "qlaunch00003", "sleep 120")
    jobid = slurm.submit(_request(script, num_nodes=1))
    wait_for(lambda: (s := slurm.get_statuses().get(jobid)) and s.state is BatchJobState.running, 30, "the job to run")
    slurm.delete_job(jobid)
    history = wait_for(lambda: ended(slurm.get_history(jobid, script)), 60, "the cancelled job's record")
    assert history.native_state.startswith("CANCELLED") and history.state is BatchJobState.finished
    assert history.start_time is not None
    slurm.delete_job(jobid)  # already gone: not an error


def test_a_job_wider_than_the_partition_is_said_to_never_start(slurm, tmp_path):
    """8 nodes in the 4-node partition (what allowed_queues max_nodes 8 let through): Slurm keeps
    it pending with PartitionConfig for ever, and the driver says so (the elastic queue then counts
    it as no capacity)."""
    script = _script(tmp_path, "qlaunch00009", "true")
    jobid = slurm.submit(_request(script, num_nodes=8))
    try:
        status = wait_for(lambda: (s := slurm.get_statuses().get(jobid)) and s.message and s, 30,
                          "squeue to give the job a pending reason")
        assert status.state is BatchJobState.queued and status.num_nodes == 8, status
        assert status.message in ("PartitionConfig", "PartitionNodeLimit") and slurm.never_starts(status), status
    finally:
        slurm.delete_job(jobid)


def test_backfill_and_projects(slurm):
    windows = slurm.get_backfill_windows()
    assert set(windows) <= {PARTITION} and all(w.num_nodes >= 1 for ws in windows.values() for w in ws)
    assert ACCOUNT in slurm.discover_projects()


def test_site_defaults_discover_the_partition_and_the_account(slurm):
    defaults = slurm.site_defaults()["scheduler"]
    assert defaults["name"] == "slurm"
    assert defaults["allowed_queues"][PARTITION]["max_nodes"] == 4  # node[1-4]
    assert ACCOUNT in defaults["allowed_projects"]


def test_queue_flag_qos_submits_the_queue_as_a_qos(tmp_path):
    """NERSC-style sites: the BatchJob's queue is a QOS name (settings.yml scheduler.options)."""
    qos = SlurmScheduler(user=getpass.getuser(), options={"queue_flag": "--qos"})
    script = _script(tmp_path, "qlaunch00004", "sleep 2")
    jobid = qos.submit(_request(script, queue="normal", num_nodes=1))
    # squeue's %q: the job is listed under its QOS, the name the BatchJob's queue has (not the partition)
    status = wait_for(lambda: qos.get_statuses().get(jobid), 20, "the job in squeue")
    assert status.queue == "normal", status
    history = wait_for(lambda: ended(qos.get_history(jobid, script)), 60, "the job's record")
    assert history.native_state == "COMPLETED"
    # (this Slurm does not enforce QOS names: AccountingStorageEnforce=none, so no refusal case here)


def test_a_named_cluster_is_asked_by_every_command(tmp_path):
    """A site whose jobs go to named clusters (`clusters` option, `-x cluster=`): sbatch, squeue,
    scancel, sacct and the lookup of an earlier submission all name them (this host's cluster is
    `ci`); squeue's `CLUSTER: ci` line and column header are read, not taken for jobs."""
    slurm = SlurmScheduler(user=getpass.getuser(), options={"clusters": ["ci"]})
    assert slurm.get_statuses() is not None  # an empty or busy queue of cluster ci, not "nothing readable"
    script = _script(tmp_path, "qlaunch00005", "sleep 120")
    request = _request(script, num_nodes=1, optional_params={"cluster": "ci"})
    jobid = slurm.submit(request)
    assert slurm.find_submitted(request) == [jobid]
    wait_for(lambda: (s := slurm.get_statuses().get(jobid)) and s.state is BatchJobState.running, 30, "the job to run")
    assert slurm.last_poll.clusters[jobid] == "ci"
    slurm.delete_job(jobid)
    history = wait_for(lambda: ended(slurm.get_history(jobid, script)), 60, "the cancelled job's record")
    assert history.native_state.startswith("CANCELLED") and history.start_time is not None
    with pytest.raises(SchedulerError, match="cluster 'elsewhere'"):
        slurm.submit(_request(script, num_nodes=1, optional_params={"cluster": "elsewhere"}))


def test_two_batch_jobs_get_disjoint_whole_nodes(slurm, tmp_path):
    """On this cons_tres/CR_Core cluster, sbatch without --exclusive put two 2-node BatchJobs on
    the same node[1-2] (each asks 1 CPU per node) while node3 and node4 stayed idle, and both
    launchers ran whole-node jobs there. The driver asks for whole nodes by default."""
    jobs = [slurm.submit(_request(_script(tmp_path, f"qlaunch0001{i}", "sleep 120"))) for i in (1, 2)]
    try:
        wait_for(lambda: all((s := slurm.get_statuses().get(j)) and s.state is BatchJobState.running for j in jobs),
                 60, "both BatchJobs to run")
        nodes = []
        for jobid in jobs:
            # --states: the fixture's SQUEUE_STATES=PD (a user's own filter) would hide running jobs
            listed = subprocess.run(["squeue", "--noheader", "--states", "all", "--jobs", str(jobid), "--format", "%N"],
                                    capture_output=True, text=True, check=True).stdout.strip()
            names = subprocess.run(["scontrol", "show", "hostnames", listed], capture_output=True, text=True,
                                   check=True).stdout.split()
            nodes.append(set(names))
        assert all(len(n) == 2 for n in nodes) and not nodes[0] & nodes[1], nodes
    finally:
        for jobid in jobs:
            slurm.delete_job(jobid)


def test_a_running_jobs_start_is_slurms_own(slurm, tmp_path):
    """StatusPoll.start_times holds Slurm's StartTime of a running job (not the poll's time), read
    through the user's own SLURM_TIME_FORMAT=relative (the fixture's); a job held for a begin time an
    hour ahead, whose %S is only Slurm's estimate, has none."""
    request = _request(_script(tmp_path, "qlaunch00001", "sleep 60"), num_nodes=1)
    running = slurm.submit(request)
    later = slurm.submit(attrs.evolve(request, optional_params={"begin": "now+3600"}))
    try:
        wait_for(lambda: (s := slurm.get_statuses().get(running)) is not None and s.state is BatchJobState.running,
                 30, "the job to run")
        statuses = slurm.get_statuses()
        polled = slurm.last_poll
        shown = subprocess.run(["scontrol", "-o", "show", "job", str(running)], capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "TZ": "UTC", "SLURM_TIME_FORMAT": "standard"},
                               check=True).stdout
        start = next(w.split("=", 1)[1] for w in shown.split() if w.startswith("StartTime="))
        assert polled.start_times[running] == dt.datetime.fromisoformat(start).replace(tzinfo=dt.timezone.utc)
        assert polled.start_times[running] <= polled.time
        assert statuses[later].state is BatchJobState.queued and later not in polled.start_times
    finally:
        subprocess.run(["scancel", str(running), str(later)], check=False)


#: A serial-mode task (with the environment the worker gives it: the worker's drop, and the
#: launcher's SLURM_* put back from the job script's, as serial mode's launcher passes them) on
#: worker 1 of a 2-node worker step in a 3-node allocation; it runs srun as a job script would.
SERIAL_TASK = """
import json, os, subprocess, sys
from balsam.launcher.modes.serial_worker import drop_rank_bootstrap_environment
if os.environ["SLURM_PROCID"] != "1":
    sys.exit(0)
env = dict(os.environ)
drop_rank_bootstrap_environment(env)
probe = ["sh", "-c", 'echo "$SLURMD_NODENAME $SLURM_PROCID/$SLURM_NTASKS"']
seen = {n: env.get(n) for n in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID", "PMI_RANK")}
runs = {}
for name, line in (("bare", ["srun", "--overlap"]), ("n2", ["srun", "--overlap", "-n", "2"])):
    run = subprocess.run(line + probe, env=env, capture_output=True, text=True, timeout=60)
    runs[name] = [run.returncode, sorted(run.stdout.split(chr(10))[:-1]), run.stderr]
json.dump({"seen": seen, "runs": runs}, open(sys.argv[1], "w"))
"""


def test_a_serial_task_has_no_rank_of_its_worker_and_its_own_srun_uses_the_allocation(tmp_path):
    """Every serial-mode worker under Slurm is a task of an srun step. Before, a task of worker 1
    saw SLURM_PROCID=1 SLURM_NTASKS=2, and its bare ``srun`` ran 2 processes (the workers' step's
    count, read back from SLURM_NTASKS/SLURM_NNODES); with those only dropped, it ran one per node
    (3) where the job script's (``--ntasks-per-node 2``) runs 6. It must run what the job script's does."""
    worker = tmp_path / "task.py"
    worker.write_text(SERIAL_TASK)
    result = tmp_path / "result.json"
    carrier = (f"{sys.executable} -c 'from balsam.launcher.modes.serial_worker import launcher_slurm_environment as f; "
               "print(f())'")
    script = _script(tmp_path, "serial_env", "\n".join([
        f"srun --overlap sh -c 'echo \"$SLURMD_NODENAME $SLURM_PROCID/$SLURM_NTASKS\"' > {tmp_path}/job_srun.txt",
        # what serial mode's launcher (run from the job script) passes to its workers
        f'export BALSAM_LAUNCHER_SLURM_ENV="$({carrier})"',
        f"srun -N 2 -n 2 --ntasks-per-node 1 --overlap {sys.executable} {worker} {result}",
    ]))
    # salloc, not sbatch -W: the same allocation and job-script environment, and it returns when
    # the script ends (sbatch -W took 5 s more to notice here).
    ran = subprocess.run(["salloc", "-p", PARTITION, "-A", ACCOUNT, "-N", "3", "--ntasks-per-node", "2", "--exclusive",
                          "-t", "2", str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    jobid = [line.split()[-1] for line in ran.stderr.splitlines() if "Granted job allocation" in line][0]
    report = json.loads(result.read_text())
    # the job script's (salloc's shell has no SLURM_PROCID or step id; its SLURM_NTASKS is 3 x 2)
    assert report["seen"] == {"SLURM_PROCID": None, "SLURM_NTASKS": "6", "SLURM_STEP_ID": None,
                              "SLURM_JOB_ID": jobid, "PMI_RANK": None}
    job_lines = sorted((tmp_path / "job_srun.txt").read_text().splitlines())
    rc, lines, err = report["runs"]["bare"]
    # two processes on each node of the allocation (whichever 3 of node[1-4] it got), as the job script's
    assert rc == 0 and lines == job_lines, (lines, job_lines, err)
    assert sorted(line.split()[1] for line in lines) == [f"{i}/6" for i in range(6)], lines
    assert len({line.split()[0] for line in lines}) == 3, lines
    rc, lines, err = report["runs"]["n2"]
    assert rc == 0 and [line.split()[1] for line in lines] == ["0/2", "1/2"], (lines, err)
