"""The Aurora guide (reference seeds/001, "Balsam on Aurora") end to end on a faked Aurora.

``balsam site init --platform aurora``, the real site agent, the guide's job script as written (only
the site name changed), then the guide's ``balsam queue submit -n 2 -t 10 -q debug-scaling -A
<project> -j mpi`` (mpi mode) or its ``submit_mpi_mode.py`` with ``job_mode="serial"``. The agent
renders the Aurora job template and submits it to a fake PBS server (tests/fixtures/fake_pbs, the
``balsam.testing.fakebatch`` engine) whose two nodes carry Aurora names; the batch script runs the
real launcher with ``$PBS_NODEFILE`` and a recording PALS ``mpiexec`` first on ``PATH`` that logs its
command line and environment and runs the ranks here with MPICH. CPU ids are scaled to 24 per node
through ``launcher.platform_options.cpu_ids`` (the 12-rank job needs 12).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from balsam.testing.fakebatch import fake_batch_env
from platform_harness import max_sharing, run_spans
from site_test_utils import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]
TILES = [f"{g}.{t}" for g in range(6) for t in range(2)]
#: The same tiles as ZE_AFFINITY_MASK names them in FLAT mode (what `module load frameworks` sets).
FLAT_TILES = [str(i) for i in range(12)]

# The guide's balsam_job_ensemble.py, verbatim but for the site name.
GUIDE_JOBS = '''
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

# The guide's submit_mpi_mode.py, verbatim but for the site name (and the mode of the test).
GUIDE_SUBMIT = '''
from balsam.api import BatchJob, Site

# Get the site id
site = Site.objects.get("test_aurora")
site_id = site.id

# Submit batch job to PBS
batch_job = BatchJob.objects.create(
   site_id=site_id,
   num_nodes=2,
   wall_time_min=10,
   job_mode="mpi", # This mode will execute the application with mpiexec
   queue="debug-scaling",
   project="Aurora_deployment", # put your <project_name> here
)
print(batch_job.id)
'''

# Stand-ins for the ALCF GettingStarted helper (one tile per local rank, from PALS_LOCAL_RANKID)
# and the SYCL hello_affinity program (prints its rank and the tiles it sees).
SET_AFFINITY = """#!/bin/bash
num_gpu=6
num_tile=2
gpu_id=$(( (PALS_LOCAL_RANKID / num_tile) % num_gpu ))
tile_id=$(( PALS_LOCAL_RANKID % num_tile ))
unset EnableWalkerPartition
export ZE_ENABLE_PCI_ID_DEVICE_ORDER=1
export ZE_AFFINITY_MASK=$gpu_id.$tile_id
exec "$@"
"""
HELLO_AFFINITY = """#!/bin/bash
echo "MPI rank $PALS_RANKID local $PALS_LOCAL_RANKID of $PMI_SIZE sees ZE_AFFINITY_MASK=$ZE_AFFINITY_MASK"
"""


def balsam(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, f"balsam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def python(script: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def install_getting_started(home: Path) -> None:
    for rel, text in (("GettingStarted/HelperScripts/Aurora/set_affinity_gpu_aurora.sh", SET_AFFINITY),
                      ("GettingStarted/Examples/Aurora/affinity_gpu/sycl/hello_affinity", HELLO_AFFINITY)):
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)


def job_states(client, site_id: int) -> dict[str, str]:
    from balsam.site.service_client import list_all

    return {row["workdir"]: row["state"] for row in list_all(client, "/jobs/", {"site_id": site_id})}


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_aurora_guide_on_a_faked_aurora(mode: str, client, agent_daemon, fake_machine, tmp_path: Path,
                                       monkeypatch) -> None:
    machine = fake_machine(HOSTS)
    install_getting_started(machine.home)
    # The machine as the site agent and the batch jobs see it: PALS mpiexec first on PATH, and a
    # (fake) PBS server with Aurora's queues and two Aurora nodes, with qsub/qstat on PATH too.
    for key, value in {**machine.env(), **fake_batch_env(FIXTURES / "fake_pbs", tmp_path / "pbs-server",
                                                         FAKE_BATCH_NODES=",".join(HOSTS),
                                                         FAKE_BATCH_QUEUES="debug,debug-scaling,prod")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{machine.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the template exports the ALCF proxy
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")  # as the guide's `module load frameworks` sets it

    name = f"aurora-{uuid.uuid4().hex[:6]}"
    site_path = tmp_path / name
    said = balsam("site", "init", "--platform", "aurora", "-n", name, str(site_path)).stdout
    assert "platform aurora" in said
    settings = yaml.safe_load((site_path / "settings.yml").read_text())
    assert settings["scheduler"]["name"] == "pbs" and "debug-scaling" in settings["scheduler"]["allowed_queues"]
    # Fast test settings, and the CPU ids scaled to 24 per node (the 12-rank job needs 12).
    settings["launcher"].update(idle_ttl_sec=3, delay_sec=1, platform_options={"cpu_ids": "0-23"})
    settings["scheduler"]["sync_period"] = 1
    settings["processing"] = {**(settings.get("processing") or {}), "num_workers": 2}
    (site_path / "settings.yml").write_text(yaml.safe_dump(settings))
    agent_daemon(site_path)

    python(GUIDE_JOBS.replace("test_aurora", name), cwd=site_path)
    site_id = int((site_path / ".balsam-site").read_text().split()[0])
    wait_for(lambda: set(job_states(client, site_id).values()) == {"PREPROCESSED"}, timeout=90,
             what="the agent to preprocess the guide's 25 jobs")
    assert "EchoHello" in balsam("app", "ls", cwd=site_path).stdout
    if mode == "mpi":
        # The guide's command, as written but for the project name.
        balsam("queue", "submit", "-n", "2", "-t", "10", "-q", "debug-scaling", "-A", "Aurora_deployment", "-j", "mpi",
               cwd=site_path)
    else:
        # The guide's submit_mpi_mode.py (Python API), in serial mode.
        python(GUIDE_SUBMIT.replace("test_aurora", name).replace('job_mode="mpi"', 'job_mode="serial"'), cwd=site_path)
    finished_states = {"RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"}

    def echo_done() -> bool:
        states = job_states(client, site_id)
        return all(s == "JOB_FINISHED" for w, s in states.items() if w.startswith("demo/echo_hello"))

    wait_for(echo_done, timeout=180, what="the 24 EchoHello jobs to finish")
    if mode == "mpi":
        wait_for(lambda: job_states(client, site_id)["demo/hello_affinity"] in finished_states, timeout=60,
                 what="the HelloAffinity job")
    wait_for(lambda: "finished" in balsam("queue", "ls", "--history", cwd=site_path).stdout, timeout=90,
             what="the batch job to end (launcher idle exit)")
    (script,) = (site_path / "qsubmit").glob("*.sh")
    assert "#PBS -l select=2\n" in script.read_text() and "system=aurora" not in script.read_text()

    # Every EchoHello job saw exactly one tile, its own, and OMP_NUM_THREADS=1.
    masks: dict[str, str] = {}
    for n in range(24):
        out = (site_path / "data" / f"demo/echo_hello{n}" / "job.out").read_text()
        assert f"Hello, world {n}!!" in out and "OMP_NUM_THREADS=1" in out, out
        mask = out.split("ZE_AFFINITY_MASK=")[1].split()[0]
        assert mask in FLAT_TILES, out  # exactly one tile, by its flat device id
        masks[f"demo/echo_hello{n}"] = mask

    # Two jobs on one tile never run at the same time: from the jobs' RUNNING and RUN_DONE events
    # (the RUNNING report comes after the start, RUN_DONE carries the exit time, so a tile handed
    # on after an exit never looks shared). In mpi mode the recorded mpiexec line names the node.
    spans = run_spans(client, site_id)
    records = machine.records("mpiexec")
    if mode == "mpi":
        host_of = {int(r["env"]["BALSAM_JOB_ID"]): dict(r["options"])["--hosts"] for r in records}
        slots = {w: (host_of[job_id], masks[w]) for w, (job_id, _, _) in spans.items() if w in masks}
        assert max_sharing(spans, slots) == 1
    else:
        slots = {w: masks[w] for w in masks}
        assert max_sharing(spans, slots) <= len(HOSTS)  # the node is not known here: one per node at most

    if mode == "mpi":
        echo = [r for r in records if r["program"][0] == "echo"]
        assert len(echo) == 24
        for r in echo:
            opts = dict(r["options"])
            assert opts["-n"] == "1" and opts["--ppn"] == "1" and opts["--hosts"] in HOSTS and "--envall" in opts
            assert opts["--cpu-bind"].startswith("list:") and r["env"]["ZE_ENABLE_PCI_ID_DEVICE_ORDER"] == "1"
            assert r["env"]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
            assert not any(k.startswith("CUDA_") for k in r["env"])
        (affinity,) = [r for r in records if r["program"][0].endswith("set_affinity_gpu_aurora.sh")]
        opts = dict(affinity["options"])
        assert opts["-n"] == "12" and opts["--ppn"] == "12"
        assert sorted(affinity["env"]["ZE_AFFINITY_MASK"].split(",")) == sorted(FLAT_TILES)
        assert len(opts["--cpu-bind"].split(":")) == 13  # list: + one CPU set per rank
        out = (site_path / "data" / "demo/hello_affinity" / "job.out").read_text()
        masks = sorted(line.split("ZE_AFFINITY_MASK=")[1] for line in out.splitlines() if "MPI rank" in line)
        assert masks == sorted(TILES), out
    else:
        # One mpiexec started the serial workers, one rank per node, unbound; tasks ran without mpiexec.
        (workers,) = records
        opts = dict(workers["options"])
        assert opts["-n"] == "2" and opts["--ppn"] == "1" and opts["--hosts"] == ",".join(HOSTS)
        assert opts["--cpu-bind"] == "none" and "balsam.launcher.modes.serial_worker" in workers["program"]
        assert job_states(client, site_id)["demo/hello_affinity"] == "PREPROCESSED"  # a 12-rank job is mpi work
