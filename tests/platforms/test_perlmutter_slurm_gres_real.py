"""The Perlmutter plugin's packed GPU steps on a real Slurm with GPU GRES (slow; skipped without one).

The CI cluster (shared/ci/start-slurm.sh) has no GRES, so this runs only when given one:

- ``BALSAM_TEST_GRES_SLURM_CONF=/path/slurm.conf``: a running Slurm whose node ``BALSAM_TEST_GRES_NODE``
  (default ``g1``) has ``Gres=gpu:4`` (and ``craynetwork``, which single-rank steps ask for); or
- ``BALSAM_TEST_GRES_SLURM=start``, as root with slurmctld/slurmd installed and munged running: the
  test starts a private one-node cluster of its own (4 GPUs on char devices it creates, a
  64-core x 2-thread node, ``SlurmctldPort`` 6917 and node port 17101, or
  ``BALSAM_TEST_GRES_PORTS=ctld,node``) under a temporary directory, and stops it by its pid files.

Inside one ``salloc --exclusive --gpus=4`` it runs the platform's lines for packed jobs concurrently,
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
from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform

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
PartitionName=gpu Nodes=g1 Default=YES MaxTime=INFINITE State=UP
""")
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=g1 Name=gpu File={root}/dev/nvidia[0-3]\n")
    (root / "plugstack.conf").write_text("")
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    time.sleep(2)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "g1"], check=True)
    return conf, "g1", [root / "run" / "slurmd-g1.pid", root / "run" / "slurmctld.pid"]


@pytest.fixture(scope="module")
def gres_slurm(tmp_path_factory):
    """``(slurm.conf, node)`` of a Slurm with a 4-GPU node, or a skip."""
    pid_files: list[Path] = []
    if os.environ.get("BALSAM_TEST_GRES_SLURM_CONF"):
        conf = Path(os.environ["BALSAM_TEST_GRES_SLURM_CONF"])
        node = os.environ.get("BALSAM_TEST_GRES_NODE", "g1")
    elif os.environ.get("BALSAM_TEST_GRES_SLURM") == "start":
        conf, node, pid_files = _start_private_cluster(tmp_path_factory.mktemp("gres"))
    else:
        pytest.skip("no Slurm with GPU GRES (BALSAM_TEST_GRES_SLURM_CONF or BALSAM_TEST_GRES_SLURM=start)")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        for _ in range(60):  # the node registers with its GRES
            out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t %G"], env=env, capture_output=True,
                                 text=True)
            if out.returncode == 0 and "gpu:4" in out.stdout and out.stdout.split()[0] in ("idle", "mix"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"node {node} of {conf} is not idle with gpu:4: {out.stdout.strip()} {out.stderr.strip()}")
        yield env, node
    finally:
        for pid_file in pid_files:  # only the daemons this fixture started
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def _packed_lines(node: str, probe: Path, jobs: list[tuple[str, float, tuple[str, ...]]]) -> str:
    platform = PerlmutterGPUPlatform()
    rows = []
    for n, (tag, gpr, ids) in enumerate(jobs):
        spec = LaunchSpec(cmdline=str(probe), hostnames=(node,), ranks_per_node=1, gpus_per_rank=gpr, threads_per_rank=8,
                          cpu_ids=[tuple(range(8 * n, 8 * n + 8))], gpu_ids=[ids])
        rows.append(f"{tag}\t{','.join(ids)}\t{platform.mpi_command_line(spec)}\n")
    return "".join(rows)


@pytest.mark.parametrize("jobs", [
    [(f"one{g}", 1, (str(g),)) for g in range(4)],
    [("twoA", 2, ("0", "1")), ("twoB", 2, ("2", "3"))],
    [("halfA", 0.5, ("0",)), ("halfB", 0.5, ("0",)), ("one1", 1, ("1",)), ("one2", 1, ("2",)), ("one3", 1, ("3",))],
], ids=["one-gpu-x4", "two-gpu-x2", "half-and-whole"])
def test_packed_steps_on_real_gres_slurm(gres_slurm, jobs, tmp_path: Path) -> None:
    env, node = gres_slurm
    probe, driver, lines = tmp_path / "probe.sh", tmp_path / "driver.sh", tmp_path / "jobs.tsv"
    probe.write_text(PROBE)
    driver.write_text(DRIVER)
    probe.chmod(0o755)
    driver.chmod(0o755)
    lines.write_text(_packed_lines(node, probe, jobs))
    done = subprocess.run(["salloc", "-w", node, "-N1", "--exclusive", "--gpus=4", "-t", "5", str(driver), str(lines)],
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    print(lines.read_text(), out)  # the evidence, with -s
    for tag, _gpr, ids in jobs:
        assert f"RC[{tag}]=0" in out, out
        seen = re.search(rf"START \S+ tag={tag} .*CVD=(\S+)", out)
        assert seen and seen.group(1) == ",".join(ids), (tag, out)


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
    from machine_jobs import make_runnable, site_for, wait_for_states
    from platform_harness import finish

    env, node = gres_slurm
    probe = tmp_path / "app.sh"
    probe.write_text(APP_PROBE)
    probe.chmod(0o755)
    name, path = site_for(tmp_path, "perlmutter-gpu")
    attrs = {"site": name, "command_template": f"{probe} {{{{ n }}}}",
             "shell_preamble": lambda self: 'echo "balsam CVD=$CUDA_VISIBLE_DEVICES"'}
    Probe = type("GresProbe", (ApplicationDefinition,), attrs)
    Probe.sync()
    jobs = [Probe.submit(workdir=f"g/{n}", n=n, gpus_per_rank=gpr, threads_per_rank=8, node_packing_count=8, save=False)
            for n, gpr in enumerate([1, 1, 1, 0.5, 0.5])]
    ids = make_runnable(jobs)
    console = open(path / "log" / "launcher-salloc.console", "wb")
    proc = subprocess.Popen(["salloc", "-w", node, "-N1", "--exclusive", "--gpus=4", "-t", "5",
                             sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "3"],
                            env={**os.environ, **env, "BALSAM_SITE_PATH": str(path)}, cwd=path, stdout=console,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.console_path = console.name  # type: ignore[attr-defined]
    console.close()
    try:
        wait_for_states(ids, {"RUN_DONE"}, timeout=150)
    finally:
        finish(proc, timeout=120)
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
