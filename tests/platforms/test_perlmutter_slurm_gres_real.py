"""The Perlmutter plugin's packed GPU steps on a real Slurm with GPU GRES (slow; skipped without one).

The CI cluster (shared/ci/start-slurm.sh) has no GRES, so this runs only when given one (scripts/test.sh
sets ``BALSAM_TEST_GRES_SLURM=start`` when it started that cluster as root and munged runs):

- ``BALSAM_TEST_GRES_SLURM_CONF=/path/slurm.conf``: a running Slurm whose node ``BALSAM_TEST_GRES_NODE``
  (default ``g1``) has ``Gres=gpu:4`` (and ``craynetwork``, which single-rank steps ask for); or
  The CPU checks use ``BALSAM_TEST_GRES_CPU_NODE`` (skipped unset): a node whose Slurm CPUs are the
  machine's own (one thread per core), as Cpus_allowed_list shows only CPUs that exist;
- ``BALSAM_TEST_GRES_SLURM=start``, as root with slurmctld/slurmd installed and munged running: the
  test starts a private one-node cluster of its own (4 GPUs on char devices it creates, a
  64-core x 2-thread node, ``SlurmctldPort`` 6917 and node port 17101, or
  ``BALSAM_TEST_GRES_PORTS=ctld,node``) and a node ``c1`` of this machine's own CPUs (port node + 1)
  under a temporary directory, and stops them by their pid files.

Inside one ``salloc --exclusive --gpus-per-node=4`` (a Perlmutter GPU site's sbatch request) it runs
the platform's lines for packed jobs concurrently,
each srun with balsam's ``CUDA_VISIBLE_DEVICES`` for its job (as the launcher starts it), and checks
what each task got. The recorded results, and the CI test built on them, are in
test_perlmutter_slurm_gres_recorded.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec
from balsam.scheduler import SubmitRequest
from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform
from balsam_scheduler_slurm import SlurmScheduler

pytestmark = pytest.mark.slow

PROBE = """#!/bin/bash
echo "START $(date +%s.%N) tag=$TAG step=$SLURM_STEP_ID task=$SLURM_PROCID CVD=${CUDA_VISIBLE_DEVICES-unset} \
STEP_GPUS=${SLURM_STEP_GPUS-unset} cpus=$(grep Cpus_allowed_list /proc/self/status | cut -f2)"
sleep 3
echo "END $(date +%s.%N) tag=$TAG"
"""

# Each line of the jobs file: tag, balsam's CUDA_VISIBLE_DEVICES, the srun line (tab-separated).
DRIVER = """#!/bin/bash
while IFS=$'\\t' read -r tag cvd line; do
  ( export TAG=$tag CUDA_VISIBLE_DEVICES=$cvd CUDA_DEVICE_ORDER=PCI_BUS_ID
    eval "$line" </dev/null 2>&1 | sed "s/^/[$tag] /"; echo "RC[$tag]=${PIPESTATUS[0]}" ) &
  sleep 0.2
done < "$1"
wait
"""


def _start_private_cluster(root: Path) -> tuple[Path, str, list[Path]]:
    if os.geteuid() != 0 or not (shutil.which("slurmctld") and shutil.which("slurmd")):
        pytest.skip("BALSAM_TEST_GRES_SLURM=start needs root and slurmctld/slurmd")
    ctld_port, node_port = (os.environ.get("BALSAM_TEST_GRES_PORTS") or "6917,17101").split(",")
    for d in ("state", "spool", "log", "run", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        dev = root / "dev" / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o644 | 0o020000, os.makedev(195, i))  # a char device, as nvidia's
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=balsamgres
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
TmpFS={root}/tmp
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu,craynetwork
MpiDefault=none
ReturnToService=2
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
PlugStackConfig={root}/plugstack.conf
NodeName=g1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_port} Sockets=1 CoresPerSocket=64 ThreadsPerCore=2 CPUs=128 RealMemory=2000 Gres=gpu:4,craynetwork:4 State=UNKNOWN
NodeName=c1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={int(node_port) + 1} Sockets=1 CoresPerSocket={_real_cpus()} ThreadsPerCore=1 CPUs={_real_cpus()} RealMemory=2000 Gres=gpu:4,craynetwork:4 State=UNKNOWN
PartitionName=gpu Nodes=g1,c1 Default=YES MaxTime=INFINITE State=UP
""")
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=g1 Name=gpu File={root}/dev/nvidia[0-3]\n"
                                    f"NodeName=c1 Name=gpu File={root}/dev/nvidia[0-3]\n")
    (root / "plugstack.conf").write_text("")
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    time.sleep(2)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "g1"], check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "c1"], check=True)
    return conf, "g1", [root / "run" / "slurmd-g1.pid", root / "run" / "slurmd-c1.pid", root / "run" / "slurmctld.pid"]


def _real_cpus() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def gres_slurm(tmp_path_factory):
    """``(env, node, cpu node or None)`` of a Slurm with a 4-GPU node, or a skip."""
    pid_files: list[Path] = []
    cpu_node = os.environ.get("BALSAM_TEST_GRES_CPU_NODE")
    if os.environ.get("BALSAM_TEST_GRES_SLURM_CONF"):
        conf = Path(os.environ["BALSAM_TEST_GRES_SLURM_CONF"])
        node = os.environ.get("BALSAM_TEST_GRES_NODE", "g1")
    elif os.environ.get("BALSAM_TEST_GRES_SLURM") == "start":
        conf, node, pid_files = _start_private_cluster(tmp_path_factory.mktemp("gres"))
        cpu_node = "c1"
    else:
        pytest.skip("no Slurm with GPU GRES (BALSAM_TEST_GRES_SLURM_CONF or BALSAM_TEST_GRES_SLURM=start)")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        for name in filter(None, (node, cpu_node)):
            for _ in range(60):  # the node registers with its GRES
                out = subprocess.run(["sinfo", "-h", "-N", "-n", name, "-o", "%t %G"], env=env, capture_output=True,
                                     text=True)
                if out.returncode == 0 and "gpu:4" in out.stdout and out.stdout.split()[0] in ("idle", "mix"):
                    break
                time.sleep(1)
            else:
                pytest.fail(f"node {name} of {conf} is not idle with gpu:4: {out.stdout.strip()} {out.stderr.strip()}")
        yield env, node, cpu_node
    finally:
        for pid_file in pid_files:  # only the daemons this fixture started
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


# The GPU node's 64 cores x 2 threads are, on a test machine, mostly CPUs it does not have: slurmd
# refuses a --cpu-bind=mask_cpu naming them ("Unable to satisfy cpu bind request"), so the GPU checks
# keep --cpu-bind=cores (a binding in launch params: the old CPU line, the GPU part unchanged); CPU
# placement is checked on the CPU node below.
GPU_CHECK_PARAMS = {"cpu-bind": "cores"}


def run_launcher_in_salloc(path: Path, ids: list, salloc_args: list[str], launcher: list[str],
                           env: dict[str, str]) -> None:
    """Run ``launcher`` (the site's launcher command line) inside ``salloc salloc_args`` until the
    jobs ``ids`` are RUN_DONE, its console in the site's log folder; end it whatever happens."""
    from machine_jobs import wait_for_states
    from platform_harness import finish

    console = open(path / "log" / "launcher-salloc.console", "wb")
    proc = subprocess.Popen(["salloc", *salloc_args, *launcher],
                            env={**os.environ, **env, "BALSAM_SITE_PATH": str(path)}, cwd=path, stdout=console,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.console_path = console.name  # type: ignore[attr-defined]
    console.close()
    try:
        wait_for_states(ids, {"RUN_DONE"}, timeout=150)
    finally:
        finish(proc, timeout=120)


def _packed_lines(node: str, probe: Path, jobs: list[tuple[str, float, tuple[str, ...]]]) -> str:
    platform = PerlmutterGPUPlatform()
    rows = []
    for n, (tag, gpr, ids) in enumerate(jobs):
        spec = LaunchSpec(cmdline=str(probe), hostnames=(node,), ranks_per_node=1, gpus_per_rank=gpr, threads_per_rank=8,
                          cpu_ids=[tuple(range(8 * n, 8 * n + 8))], gpu_ids=[ids], launch_params=GPU_CHECK_PARAMS)
        rows.append(f"{tag}\t{','.join(ids)}\t{platform.mpi_command_line(spec)}\n")
    return "".join(rows)


@pytest.mark.parametrize("jobs", [
    [(f"one{g}", 1, (str(g),)) for g in range(4)],
    [("twoA", 2, ("0", "1")), ("twoB", 2, ("2", "3"))],
    [("halfA", 0.5, ("0",)), ("halfB", 0.5, ("0",)), ("one1", 1, ("1",)), ("one2", 1, ("2",)), ("one3", 1, ("3",))],
], ids=["one-gpu-x4", "two-gpu-x2", "half-and-whole"])
def test_packed_steps_on_real_gres_slurm(gres_slurm, jobs, tmp_path: Path) -> None:
    env, node, _cpu_node = gres_slurm
    probe, driver, lines = tmp_path / "probe.sh", tmp_path / "driver.sh", tmp_path / "jobs.tsv"
    probe.write_text(PROBE)
    driver.write_text(DRIVER)
    probe.chmod(0o755)
    driver.chmod(0o755)
    lines.write_text(_packed_lines(node, probe, jobs))
    done = subprocess.run(["salloc", "-w", node, "-N1", "--exclusive", "--gpus-per-node=4", "-t", "5", str(driver),
                           str(lines)],
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    print(lines.read_text(), out)  # the evidence, with -s
    for tag, _gpr, ids in jobs:
        assert f"RC[{tag}]=0" in out, out
        seen = re.search(rf"START \S+ tag={tag} .*CVD=(\S+)", out)
        assert seen and seen.group(1) == ",".join(ids), (tag, out)


@pytest.mark.parametrize("given, held", [
    # NERSC's usual flags on whole nodes: the driver keeps --gpus-per-node=4 beside them (alone,
    # every single-rank step inherited SLURM_GPUS_PER_TASK=1 and held GPU 0 only).
    ({"sbatch_flags": "--ntasks-per-node=4 --gpus-per-task=1"}, "0,1,2,3"),
    # The shared QOS with its own count: without the default (sbatch refused --gpus=1 beside it).
    ({"exclusive": "no", "sbatch_flags": "--gpus=1"}, "0"),
    # A shared --gres=gpu:2 (no count; beside the default every step failed): the single-rank
    # step's --gres=craynetwork:0 replaces it, so the step holds no GPU (the launcher warns).
    ({"exclusive": "no", "sbatch_flags": "--gres=gpu:2"}, "unset"),
], ids=["whole-gpus-per-task", "shared-gpus", "shared-gres"])
def test_a_batch_jobs_own_gpu_flags_on_real_gres_slurm(gres_slurm, tmp_path: Path, given, held) -> None:
    """A new perlmutter-gpu site's BatchJob with its own GPU flags: inside the allocation the Slurm
    driver asks for, the plugin's own single-rank packed line (``--gres=craynetwork:0``, balsam's
    ``CUDA_VISIBLE_DEVICES=0``) runs, and its step holds the GPUs Slurm gave it (``SLURM_STEP_GPUS``)."""
    env, node, _cpu_node = gres_slurm
    platform = PerlmutterGPUPlatform()
    scheduler = platform.settings_defaults()["scheduler"]
    slurm = SlurmScheduler(user="me", options=scheduler["options"])
    params = {**scheduler["optional_batch_job_params"], **given}
    args = slurm.render_submit(SubmitRequest(script_path=tmp_path / "q.sh", project="m1", queue="regular",
                                             num_nodes=1, wall_time_min=5, optional_params=params)).args
    own = [a for a in args if a.startswith(("--gpus", "--gres", "--exclusive", "--ntasks"))]
    probe = tmp_path / "probe.sh"
    probe.write_text('#!/bin/sh\necho "step STEP_GPUS=${SLURM_STEP_GPUS-unset} CVD=$CUDA_VISIBLE_DEVICES"\n')
    probe.chmod(0o755)
    spec = LaunchSpec(cmdline=str(probe), hostnames=(node,), ranks_per_node=1, gpus_per_rank=1.0, threads_per_rank=1,
                      cpu_ids=[(0,)], gpu_ids=[("0",)], launch_params=GPU_CHECK_PARAMS)
    line = platform.mpi_command_line(spec)
    assert "--gres=craynetwork:0" in line, line
    done = subprocess.run(["salloc", "-w", node, "-N1", "-t", "5", *own, "/bin/sh", "-c", line], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and f"step STEP_GPUS={held} CVD=0" in out, (own, line, out)


# The app: what its step's task got from Slurm (the launcher's shell prints balsam's value first).
APP_PROBE = """#!/bin/bash
echo "task job=$1 CVD=${CUDA_VISIBLE_DEVICES-unset} STEP_GPUS=${SLURM_STEP_GPUS-unset} step=$SLURM_STEP_ID"
sleep 3
"""


@pytest.mark.mpi
def test_real_launcher_packed_gpu_jobs_on_real_gres_slurm(gres_slurm, balsam_env, tmp_path: Path) -> None:
    """The real launcher in mpi mode, started by salloc in a 4-GPU allocation (perlmutter-gpu): 3
    one-GPU and 2 half-GPU jobs run at once, and each task sees the GPU balsam's node manager gave
    its job (the launcher's value, printed by the job's preamble before srun)."""
    import sys

    from balsam.api import ApplicationDefinition
    from machine_jobs import make_runnable, site_for

    env, node, _cpu_node = gres_slurm
    probe = tmp_path / "app.sh"
    probe.write_text(APP_PROBE)
    probe.chmod(0o755)
    name, path = site_for(tmp_path, "perlmutter-gpu")
    attrs = {"site": name, "command_template": f"{probe} {{{{ n }}}}",
             "shell_preamble": lambda self: 'echo "balsam CVD=$CUDA_VISIBLE_DEVICES"'}
    Probe = type("GresProbe", (ApplicationDefinition,), attrs)
    Probe.sync()
    jobs = [Probe.submit(workdir=f"g/{n}", n=n, gpus_per_rank=gpr, threads_per_rank=8, node_packing_count=8, save=False,
                         launch_params=GPU_CHECK_PARAMS) for n, gpr in enumerate([1, 1, 1, 0.5, 0.5])]
    ids = make_runnable(jobs)
    run_launcher_in_salloc(path, ids, ["-w", node, "-N1", "--exclusive", "--gpus-per-node=4", "-t", "5"],
                           [sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "3"], env)
    seen = {}
    for n in range(5):
        out = (path / "data" / f"g/{n}" / "job.out").read_text()
        balsam = re.search(r"balsam CVD=(\S+)", out).group(1)
        task = re.search(r"task job=\d+ CVD=(\S+)", out).group(1)
        print(n, out)
        assert task == balsam, (n, out)
        seen[n] = task
    # The node manager's accounting: each whole GPU to one job, the two halves on one other GPU.
    wholes = {seen[0], seen[1], seen[2]}
    assert len(wholes) == 3 and seen[3] == seen[4] and seen[3] not in wholes, seen


# -- CPU placement of packed steps ------------------------------------------------------------------
# Cpus_allowed_list shows only CPUs the machine has, so these run on the CPU node (its Slurm CPUs are
# this machine's, one thread per core) with the platform told that node's shape: the plugin's own
# line code and (below) the real launcher and node manager, on a node of N one-thread cores.
CPU_PROBE = """#!/bin/bash
echo "task tag=${TAG-$1} t0=$(date +%s.%N) step=$SLURM_STEP_ID rank=$SLURM_LOCALID \
cpus=$(grep Cpus_allowed_list /proc/self/status | cut -f2) CPT=${SLURM_CPUS_PER_TASK-unset} \
OMP=${OMP_NUM_THREADS-unset} CVD=${CUDA_VISIBLE_DEVICES-unset} ON_NODE=${SLURM_CPUS_ON_NODE-unset}"
sleep 3
echo "end tag=${TAG-$1} t1=$(date +%s.%N)"
"""
SHAPE = """import balsam_platform_perlmutter.platform as p
n = int(__import__("os").environ["BALSAM_TEST_NODE_CPUS"])
p.PerlmutterGPUPlatform.logical_cpus, p.PerlmutterGPUPlatform.hardware_threads_per_core = n, 1
p.PerlmutterGPUPlatform.node_cpu_ids = f"0-{n - 1}"
"""


# The jobs file's GPU field is "-" for a CPU-only job (an empty field between tabs would vanish: read
# takes a tab run as one separator): its srun starts without CUDA_VISIBLE_DEVICES.
CPU_DRIVER = DRIVER.replace("export TAG=$tag CUDA_VISIBLE_DEVICES=$cvd CUDA_DEVICE_ORDER=PCI_BUS_ID",
                            'export TAG=$tag; [ "$cvd" = - ] || export CUDA_VISIBLE_DEVICES=$cvd')


def _shaped_platform(cpus: int) -> PerlmutterGPUPlatform:
    shaped = type("Shaped", (PerlmutterGPUPlatform,), {"logical_cpus": cpus, "hardware_threads_per_core": 1,
                                                       "node_cpu_ids": f"0-{cpus - 1}"})
    return shaped()


def _ids(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def test_packed_steps_bound_to_balsams_cores_on_real_slurm(gres_slurm, tmp_path: Path) -> None:
    """Packed 1-rank steps (CPU-only and GPU) on balsam's cores N-1, N-2, ..., 0 (the reverse of
    Slurm's own order) and, where the node has 3 cores or more, a 2-rank step on the last two in
    reverse: every task runs on the cores its rank was given, at once with the others."""
    env, _node, cpu_node = gres_slurm
    if not cpu_node:
        pytest.skip("no CPU node of this machine's CPUs (BALSAM_TEST_GRES_CPU_NODE)")
    n = _real_cpus()
    platform = _shaped_platform(n)
    probe, driver, lines = tmp_path / "probe.sh", tmp_path / "driver.sh", tmp_path / "jobs.tsv"
    probe.write_text(CPU_PROBE)
    driver.write_text(CPU_DRIVER)
    probe.chmod(0o755)
    driver.chmod(0o755)
    assert CPU_DRIVER != DRIVER
    jobs = {}  # tag -> (ranks, cores, gpu ids)
    for k, core in enumerate(reversed(range(n))):
        jobs[f"one{core}"] = (1, (core,), ((str(k % 4),),) if k % 2 else ())
    if n >= 3:
        jobs["two"] = (2, (n - 1, n - 2), ())
    rows = []
    for tag, (ranks, cores, gpus) in jobs.items():
        spec = LaunchSpec(cmdline=str(probe), hostnames=(cpu_node,), ranks_per_node=ranks, threads_per_rank=1,
                          gpus_per_rank=1 if gpus else 0, cpu_ids=[cores], gpu_ids=list(gpus))
        rows.append(f"{tag}\t{','.join(gpus[0]) if gpus else '-'}\t{platform.mpi_command_line(spec)}\n")
    lines.write_text("".join(rows))
    done = subprocess.run(["salloc", "-w", cpu_node, "-N1", "--exclusive", "-t", "5", str(driver), str(lines)],
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    print(lines.read_text(), out)  # the evidence, with -s
    for tag, (ranks, cores, gpus) in jobs.items():
        assert f"RC[{tag}]=0" in out, out
        for rank in range(ranks):
            seen = re.search(rf"task tag={tag} .* rank={rank} cpus=(\S+) CPT=(\S+) .*CVD=(\S+) ON_NODE=(\S+)", out)
            assert seen and _ids(seen.group(1)) == {cores[rank]}, (tag, rank, out)
            # The job's own -c and CPUs on the node, not the step's (the node's CPUs).
            assert seen.group(2) == "1" and seen.group(4) == str(ranks), (tag, out)
            if gpus:
                assert seen.group(3) == ",".join(gpus[0]), (tag, out)


@pytest.mark.mpi
def test_real_launcher_packed_jobs_bound_to_their_cores_on_real_slurm(gres_slurm, balsam_env, tmp_path: Path) -> None:
    """The real launcher in mpi mode on the CPU node (perlmutter-gpu told its shape: N one-thread
    cores): 2N one-core jobs, CPU-only and GPU, N at a time. Jobs that ran at the same time ran on
    different CPUs (before: all on CPU 0), each on one, with the job's SLURM_CPUS_PER_TASK."""
    import sys

    from balsam.api import ApplicationDefinition
    from machine_jobs import make_runnable, site_for

    env, _node, cpu_node = gres_slurm
    if not cpu_node:
        pytest.skip("no CPU node of this machine's CPUs (BALSAM_TEST_GRES_CPU_NODE)")
    n = _real_cpus()
    probe = tmp_path / "app.sh"
    probe.write_text(CPU_PROBE)
    probe.chmod(0o755)
    name, path = site_for(tmp_path, "perlmutter-gpu")
    attrs = {"site": name, "command_template": f"{probe} job{{{{ n }}}}"}
    Probe = type("CpuProbe", (ApplicationDefinition,), attrs)
    Probe.sync()
    jobs = [Probe.submit(workdir=f"c/{k}", n=k, gpus_per_rank=k % 2, threads_per_rank=1, node_packing_count=2 * n,
                         save=False) for k in range(2 * n)]
    ids = make_runnable(jobs)
    launcher = SHAPE + ("import runpy, sys\nsys.argv[0] = 'balsam.launcher'\n"
                        "runpy.run_module('balsam.launcher', run_name='__main__')\n")
    run_launcher_in_salloc(path, ids, ["-w", cpu_node, "-N1", "--exclusive", "-t", "5"],
                           [sys.executable, "-c", launcher, "-j", "mpi", "-t", "3"],
                           {**env, "BALSAM_TEST_NODE_CPUS": str(n)})
    runs = []
    for k in range(2 * n):
        out = (path / "data" / f"c/{k}" / "job.out").read_text()
        print(k, out)
        seen = re.search(r"t0=(\S+) .*cpus=(\S+) CPT=(\S+) OMP=(\S+) CVD=(\S+)", out)
        t1 = re.search(r"t1=(\S+)", out)
        assert seen and t1, (k, out)
        runs.append((float(seen.group(1)), float(t1.group(1)), _ids(seen.group(2))))
        assert len(runs[-1][2]) == 1 and seen.group(3) == "1" and seen.group(4) == "1", (k, out)
    for a in range(len(runs)):
        for b in range(a + 1, len(runs)):
            if runs[a][0] < runs[b][1] and runs[b][0] < runs[a][1]:  # ran at the same time
                assert not runs[a][2] & runs[b][2], (a, b, runs)


def test_packed_step_runs_the_command_as_srun_resolves_it_on_real_slurm(gres_slurm, tmp_path: Path) -> None:
    """A packed step's wrapper (the job's SLURM_CPUS_* set, then the command) in real srun: ``app`` in
    the working directory without ``./`` and ``./run=3/app`` run, as srun runs them itself (an
    ``env`` wrapper: rc 127, and ``run=3/app`` read as an assignment)."""
    env, _node, cpu_node = gres_slurm
    n = _real_cpus()
    if not cpu_node or n < 2:
        pytest.skip("no CPU node of this machine's CPUs with 2 cores or more (BALSAM_TEST_GRES_CPU_NODE)")
    platform = _shaped_platform(n)
    app = '#!/bin/sh\necho "APP $0 [$*] CPT=$SLURM_CPUS_PER_TASK OVC=${SLURM_OVERCOMMIT-unset}"\n'
    for path in (tmp_path / "app", tmp_path / "run=3" / "app"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(app)
        path.chmod(0o755)
    script = []
    for k, cmdline in enumerate(("app x", "./run=3/app y")):
        spec = LaunchSpec(cmdline=cmdline, hostnames=(cpu_node,), threads_per_rank=1, cpu_ids=[(n - 1,)])
        line = platform.mpi_command_line(spec)
        assert "--cpu-bind=mask_cpu:" in line, line  # a packed step, with the job's SLURM_CPUS_* set
        script.append(f"{line}; echo RC{k}=$?")
    done = subprocess.run(["salloc", "-w", cpu_node, "-N1", "--exclusive", "-t", "5", "/bin/bash", "-c",
                           "; ".join(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert "APP ./app [x] CPT=1 OVC=unset" in out and "RC0=0" in out, out
    assert "APP ./run=3/app [y] CPT=1 OVC=unset" in out and "RC1=0" in out, out
