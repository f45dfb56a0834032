"""A job's own ``cpu_bind`` through the real mpi-mode launcher on a faked Polaris and Aurora
allocation (recording ``mpiexec`` first on PATH, real MPICH ranks): a value PALS refuses ends the job
FAILED with its one line (key, job, app id, value) and starts no ``mpiexec``; ``thread``, a keyword
PALS documents that failed jobs before, and a good value with blanks around it run. And a cut-off
``$SLURM_JOB_NODELIST`` of several items stops a real Perlmutter launcher in one line, where the
plugin's own check hung it until walltime."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from platform_harness import finish, start_launcher
from launcher_harness import make_site
from launcher_helpers import make_runnable, wait_for_states

pytestmark = [pytest.mark.mpi]

HOSTS = ["x3001c0s1b0n0", "x3001c0s7b0n0"]


@pytest.mark.parametrize("platform", ["polaris", "aurora"])
def test_a_bad_cpu_bind_fails_its_job_in_one_line_and_good_ones_run(platform: str, balsam_env, fake_machine,
                                                                     tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, EventLog

    name = f"bind-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": platform, "idle_ttl_sec": 2})

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo ran"

    Echo.sync()
    binds = {"typo": "depht", "thread": "thread", "blanks": " verbose,depth "}
    ids = make_runnable([Echo.submit(workdir=w, launch_params={"cpu_bind": b}, save=False) for w, b in binds.items()])
    machine = fake_machine(HOSTS)
    proc = start_launcher(path, "mpi", 10, machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="9.pbs"))
    done = wait_for_states(ids, {"RUN_DONE", "FAILED", "RUN_ERROR"}, timeout=90)
    assert finish(proc) == 0
    by_workdir = {str(j.workdir): j for j in done.values()}
    assert {w: str(j.state) for w, j in by_workdir.items()} == {"typo": "FAILED", "thread": "RUN_DONE",
                                                                "blanks": "RUN_DONE"}
    typo = by_workdir["typo"]
    (reason,) = [(e.data or {}).get("error", "") for e in EventLog.objects.filter(job_id=[typo.id])
                 if str(e.to_state) == "FAILED"]
    assert "\n" not in reason
    assert (f"launch param 'cpu_bind' of job {typo.id} (app {typo.app_id}) is not a PALS --cpu-bind: expected one "
            "of none, core, depth, numa, socket, thread, ") in reason and reason.endswith("got 'depht'"), reason
    # No mpiexec for the refused job: one per job that ran, each with its value as PALS takes it.
    seen = sorted(r["argv"][r["argv"].index("--cpu-bind") + 1] for r in machine.records("mpiexec"))
    assert seen == ["thread", "verbose,depth"]


def test_a_cut_off_nodelist_stops_the_perlmutter_launcher_in_one_line(balsam_env, fake_machine,
                                                                       tmp_path: Path) -> None:
    name = f"pm-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": "perlmutter-gpu", "idle_ttl_sec": 2})
    machine = fake_machine(["nid001234"])
    nodelist = "nid001234,nid001235,nid001236,nid[0014"  # hung the launcher before (40 s and on)
    proc = start_launcher(path, "mpi", 1, machine.env(SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="55"))
    rc = finish(proc, timeout=120)  # a hang: killed, and the test fails with its console
    console = Path(proc.console_path).read_text()
    assert rc != 0
    assert (f"could not discover the nodes: $SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list: "
            "the '[' at character 34 is not closed (a cut-off list?)") in console, console[-2000:]
