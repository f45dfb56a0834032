"""Packed Perlmutter steps run on the cores balsam gave their jobs, against what real Slurm does.

Recorded on a real Slurm 22.05.8 (Debian 12; ``select/cons_tres``, ``CR_Core``, ``task/affinity``), a
node whose Slurm CPUs are the machine's own, inside one ``salloc --exclusive`` (the driver and the
checks with the real launcher are in tests/platforms/test_perlmutter_slurm_gres_real.py). Each task
printed its ``Cpus_allowed_list`` and ``SLURM_CPUS_PER_TASK`` / ``SLURM_CPUS_ON_NODE``:

- two packed ``-n 1 -c 1 --cpu-bind=cores --overlap`` steps running at once (balsam: cores 1 and 0)
  were both bound to CPU 0: Slurm lays an ``--overlap`` step's tasks out from the node's first
  cores whatever other steps hold (the real launcher's 4 one-core jobs, 2 at a time: all on CPU 0);
- ``--cpu-bind=map_cpu:1`` with ``-c 1``: "CPU binding outside of job step allocation, allocated
  CPUs are: 0x1" (the step has only its first ``-n x -c`` CPUs);
- ``-c <the node's CPUs> --cpu-bind=mask_cpu:0x2`` and ``mask_cpu:0x1`` at once: CPUs 1 and 0;
  ``-n 2 -c <node / 2> --cpu-bind=mask_cpu:0x2,0x1``: task 0 on CPU 1, task 1 on CPU 0 (one mask per
  task, local task order), beside other steps; ``-n 3 -c 42`` on 128 CPUs: a step of 126 CPUs
  (``SLURM_CPUS_ON_NODE``), ``-c 43``: "More processors requested than permitted", ``-n 3 -c 128
  --overcommit``: 128;
- in an allocation of 4 CPUs (no ``--exclusive``, the shared QOS): ``-c 128`` "More processors
  requested than permitted" at once (no wait); srun(1): explicit masks are honoured only for a step
  given every CPU of the node, so a shared allocation keeps Slurm's binding;
- a task's ``SLURM_CPUS_PER_TASK`` is the step's ``-c``, ``SLURM_CPUS_ON_NODE`` the step's CPUs on the
  node (``-n x -c``; the node's with ``--overcommit``, which sets ``SLURM_OVERCOMMIT=1`` too); a
  ``--cpu-bind=cores`` step's are whole cores (a node of 2 threads per core, ``-n x -c y: CPUS_ON_NODE``):
  ``1x1: 2``, ``2x1: 2`` (one-CPU tasks share a core), ``1x2: 2``, ``2x2: 4``, ``1x3: 4``, ``2x3: 8``,
  ``2x16: 32`` (:data:`OLD_CPUS_ON_NODE`);
- with ``SelectTypeParameters=CR_Core_Memory``, ``--mem-per-cpu=20`` on a step of ``-c 128`` (the node's
  CPUs): "Memory required by task is not available" (``-c 16``: ran); ``--threads-per-core`` and
  ``--ntasks-per-core`` apply to the step's ``-c`` CPUs too.

The test applies those rules to the platform's lines on a Perlmutter GPU node (64 cores; core c's
second hardware thread is CPU c + 64, and Slurm gives a ``--cpu-bind=cores`` task whole cores, both
threads) and runs the part after ``--overlap`` as the task would be run.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform

CORES, THREADS = 64, 2
#: ``(-n, -c) -> SLURM_CPUS_ON_NODE`` of a ``--cpu-bind=cores`` step, real Slurm 22.05, 2 threads per core.
OLD_CPUS_ON_NODE = {(1, 1): 2, (2, 1): 2, (1, 2): 2, (2, 2): 4, (1, 3): 4, (2, 3): 8, (2, 16): 32}


def slurm_order(cores: range) -> list[int]:
    """The allocation's logical CPUs on the node (its ``cores``) as Slurm lays a step out over them:
    core by core, both threads."""
    return [core + t * CORES for core in cores for t in range(THREADS)]


def step_cpus(args: list[str], cores: range) -> set[int]:
    """The CPUs of an ``--overlap`` step on its node (recorded): the first ``-n x -c`` from core 0,
    whatever other steps hold; all of the allocation's with ``--overcommit``; more than the
    allocation has: refused."""
    options = args[:args.index("--overlap")]
    tasks, per_task = int(options[options.index("-n") + 1]), int(options[options.index("--cpus-per-task") + 1])
    order = slurm_order(cores)
    if per_task > len(order) or ("--overcommit" not in options and tasks * per_task > len(order)):
        raise AssertionError(f"More processors requested than permitted: {shlex.join(args)}")
    return set(order if "--overcommit" in options else order[:tasks * per_task])


def slurm_task_cpus(args: list[str], cores: range = range(CORES)) -> list[set[int]]:
    """Each task's CPU affinity (local task order) as real Slurm 22.05 binds an ``--overlap`` step."""
    options = args[:args.index("--overlap")]
    tasks, per_task = int(options[options.index("-n") + 1]), int(options[options.index("--cpus-per-task") + 1])
    bind = next(o for o in options if o.startswith("--cpu-bind="))[len("--cpu-bind="):]
    allocated = step_cpus(args, cores)
    if bind == "cores":  # each task its -c CPUs, whole cores, in Slurm's order from core 0
        order = slurm_order(cores)
        return [set(order[t * per_task:(t + 1) * per_task]) for t in range(tasks)]
    assert bind.startswith("mask_cpu:"), bind
    masks = [int(m, 16) for m in bind[len("mask_cpu:"):].split(",")]
    assert len(masks) == tasks, bind
    cpus = [{c for c in range(CORES * THREADS) if mask >> c & 1} for mask in masks]
    for mine in cpus:
        if not mine <= allocated:
            raise AssertionError(f"CPU binding outside of job step allocation: {shlex.join(args)}")
    return cpus


def task_env(args: list[str], name: str) -> str:
    """Run what srun runs (the words after ``--overlap``) with Slurm's step variables set, and
    print ``name`` as the app sees it."""
    options = args[:args.index("--overlap")]
    per_task = int(options[options.index("--cpus-per-task") + 1])
    env = {**os.environ, "SLURM_CPUS_PER_TASK": str(per_task),
           "SLURM_CPUS_ON_NODE": str(len(step_cpus(args, range(CORES))))}
    if "--overcommit" in options:
        env["SLURM_OVERCOMMIT"] = "1"
    printer = [sys.executable, "-c", f"import os; print(os.environ.get({name!r}, 'unset'))"]
    done = subprocess.run(args[args.index("--overlap") + 1:] + printer, env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def balsam_rank_cpus(cores: tuple[int, ...], ranks: int) -> list[set[int]]:
    """Each rank's share of the job's cores (in order), with both hardware threads of each core."""
    per = len(cores) // ranks
    return [{c + t * CORES for c in cores[r * per:(r + 1) * per] for t in range(THREADS)} for r in range(ranks)]


# (ranks, threads per rank, gpus per rank, balsam's cores, balsam's GPUs): packed on one node at once.
PACKED = [
    (1, 8, 1, tuple(range(0, 8)), ("0",)),
    (1, 8, 1, tuple(range(8, 16)), ("1",)),
    (1, 8, 0.5, tuple(range(16, 24)), ("2",)),
    (2, 4, 0, tuple(range(24, 32)), ()),
    (3, 2, 0, tuple(range(40, 46)), ()),      # 3 ranks: 128 CPUs do not divide by 3
    (1, 1, 0, (63,), ()),
]


@pytest.mark.parametrize("ranks,threads,gpr,cores,gpus", PACKED, ids=[f"job{n}" for n in range(len(PACKED))])
def test_packed_ranks_run_on_balsams_cores(ranks, threads, gpr, cores, gpus) -> None:
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, threads_per_rank=threads,
                      gpus_per_rank=gpr, cpu_ids=[cores], gpu_ids=[gpus] if gpus else [])
    args = platform.mpi_launch_args(spec)
    assert slurm_task_cpus(args) == balsam_rank_cpus(cores, ranks), shlex.join(args)
    # The app sees its job's own CPU counts (the old line's step), not the step's (the node's).
    job_cpus = platform.cpus_per_task(spec)
    assert task_env(args, "SLURM_CPUS_PER_TASK") == str(job_cpus), shlex.join(args)
    assert task_env(args, "SLURM_CPUS_ON_NODE") == str(OLD_CPUS_ON_NODE.get((ranks, job_cpus), job_cpus * ranks))
    assert task_env(args, "SLURM_OVERCOMMIT") == "unset", shlex.join(args)
    if gpus:
        assert task_env(args, "CUDA_VISIBLE_DEVICES") == ",".join(gpus), shlex.join(args)


def test_packed_jobs_share_no_cpu() -> None:
    platform = PerlmutterGPUPlatform()
    seen: set[int] = set()
    for ranks, threads, gpr, cores, gpus in PACKED:
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, threads_per_rank=threads,
                          gpus_per_rank=gpr, cpu_ids=[cores], gpu_ids=[gpus] if gpus else [])
        mine = set().union(*slurm_task_cpus(platform.mpi_launch_args(spec)))
        assert not mine & seen, (cores, sorted(mine & seen))
        seen |= mine


def test_shared_qos_allocation_keeps_slurms_binding() -> None:
    """An allocation of 32 cores of the node (shared QOS, SLURM_JOB_CPUS_PER_NODE=64): srun(1) honours
    explicit masks only for a step given every CPU of the node, and the allocation's CPUs need not
    start at 0 (balsam's ids there are 0-31 whatever the node's are): the line stays the one before
    masks, the job's own -c and --cpu-bind=cores."""
    platform = PerlmutterGPUPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": "nid001234", "SLURM_JOB_CPUS_PER_NODE": "64"})
    assert len(nodes[0].cpu_ids) == 32
    for cores, ranks in (((0, 1, 2, 3), 1), ((4, 5, 6, 7), 2), ((8, 9, 10), 3)):
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks,
                          threads_per_rank=len(cores) // ranks, cpu_ids=[cores])
        args = platform.mpi_launch_args(spec)
        assert "--cpu-bind=cores" in args and "--overcommit" not in args, shlex.join(args)
        assert not any(a.startswith("--cpu-bind=mask_cpu") or a.startswith("SLURM_CPUS") for a in args), shlex.join(args)
        assert int(args[args.index("--cpus-per-task") + 1]) == platform.cpus_per_task(spec), shlex.join(args)


def test_jobs_with_their_nodes_or_their_own_binding_keep_the_line() -> None:
    platform = PerlmutterGPUPlatform()
    whole = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=4, gpus_per_rank=1,
                       threads_per_rank=8, cpu_ids=[tuple(range(64))], gpu_ids=[("0", "1", "2", "3")], whole_nodes=True)
    assert platform.mpi_command_line(whole) == (
        "srun -n 4 --ntasks-per-node 4 --gpus-per-task 1 --nodelist nid001234 --nodes 1 --cpus-per-task 32 "
        "--cpu-bind=cores --overlap ./app")
    multi = LaunchSpec(cmdline="./app", hostnames=("nid001234", "nid001235"), ranks_per_node=2, threads_per_rank=4)
    assert platform.mpi_command_line(multi) == (
        "srun -n 4 --ntasks-per-node 2 --nodelist nid001234,nid001235 --nodes 2 --cpus-per-task 64 "
        "--cpu-bind=cores --overlap ./app")
    for params in ({"cpu-bind": "cores"}, {"--cpu-bind": "threads"}, {"c": "8"}):
        spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), threads_per_rank=4, cpu_ids=[(4, 5, 6, 7)],
                          launch_params=params)
        assert "mask_cpu" not in platform.mpi_command_line(spec) and platform.mpi_launch_args(spec)[-1] == "--overlap"


@pytest.mark.parametrize("params", [
    {"mem-per-cpu": "2G"}, {"--mem-per-cpu": "2G"}, {"--mem-per-cpu=2G": ""}, {"threads-per-core": "1"},
    {"--ntasks-per-core": "1"}])
def test_params_scaling_with_cpus_per_task_keep_the_jobs_own_c(params) -> None:
    """On the widened step (-c of the node's CPUs) real Slurm refused --mem-per-cpu (CR_Core_Memory:
    "Memory required by task is not available"), and --threads-per-core / --ntasks-per-core count
    the step's -c: such a job keeps the line before masks, as one giving cpus-per-task does."""
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=2, threads_per_rank=4,
                      cpu_ids=[tuple(range(8, 16))], launch_params=params)
    args = platform.mpi_launch_args(spec)
    assert "--cpu-bind=cores" in args and "--overcommit" not in args and args[-1] == "--overlap", shlex.join(args)
    assert args[args.index("--cpus-per-task") + 1] == str(platform.cpus_per_task(spec)) == "8", shlex.join(args)
    name = next(iter(params)).lstrip("-").split("=")[0]
    assert any(a.lstrip("-").startswith(name) for a in args), shlex.join(args)  # still passed to srun


@pytest.mark.parametrize("ranks,threads,tpc", [(1, 1, 2), (2, 1, 2), (1, 1, 1), (2, 1, 1), (1, 3, 2), (2, 3, 2),
                                               (2, 8, 1)])
def test_packed_app_sees_the_old_steps_cpus_on_node(ranks, threads, tpc) -> None:
    """The old line's step had whole cores (recorded: -n1 -c1 gave 2, -n1 -c3 4, -n2 -c1 2)."""
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=("nid001234",), ranks_per_node=ranks, threads_per_rank=threads,
                      threads_per_core=tpc, cpu_ids=[tuple(range(20, 20 + -(-ranks * threads // tpc)))])
    args = platform.mpi_launch_args(spec)
    c = platform.cpus_per_task(spec)
    assert any(a.startswith("--cpu-bind=mask_cpu:") for a in args), shlex.join(args)
    assert task_env(args, "SLURM_CPUS_PER_TASK") == str(c)
    assert task_env(args, "SLURM_CPUS_ON_NODE") == str(OLD_CPUS_ON_NODE[(ranks, c)]), shlex.join(args)


APP = """#!/usr/bin/env python3
import os, signal, sys, time
if os.environ.get("APP_WAIT"):  # before the line below: the test signals as soon as it reads it
    signal.signal(signal.SIGTERM, lambda *a: (print("TERM", flush=True), sys.exit(0)))
print("APP", sys.argv[0], sys.argv[1:], os.environ.get("FOO", "unset"), os.environ.get("X", "unset"),
      os.environ.get("SLURM_CPUS_PER_TASK"), os.getpid(), flush=True)
if os.environ.get("APP_WAIT"):
    time.sleep(60)
"""


def packed_task(cmdline: str) -> str:
    """What the launcher's ``/bin/bash -c <line>`` runs on the node for a packed job: the line's
    words after ``--overlap`` (srun's program and its arguments) and the job's command line."""
    spec = LaunchSpec(cmdline=cmdline, hostnames=("nid001234",), threads_per_rank=4, gpus_per_rank=1,
                      cpu_ids=[(4, 5, 6, 7)], gpu_ids=[("2",)])
    line = PerlmutterGPUPlatform().mpi_command_line(spec)
    assert " --overlap /bin/sh -c " in line, line
    return line.split(" --overlap ", 1)[1]


@pytest.fixture
def workdir(tmp_path):
    for path in (tmp_path / "app", tmp_path / "run=3" / "app", tmp_path / ".hidden"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(APP)
        path.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("cmdline,expected", [
    # srun(1) "EXECUTABLE PATH RESOLUTION": not on PATH, then the working directory (env: rc 127)
    ("app x", "APP ./app ['x'] unset 1 8"),
    ("./run=3/app y", "APP ./run=3/app ['y'] unset 1 8"),  # env took run=3/app as an assignment
    ("./app 'a b' \"c'd\"", "APP ./app ['a b', \"c'd\"] unset 1 8"),
    ("X=1 ./app", None),                       # srun's program is X=1 (not an assignment): not found
    ("env -u X FOO=2 ./app", "APP ./app [] 2 unset 8"),
    (".hidden", "APP ./.hidden [] unset 1 8"),  # starts with '.': the working directory, not PATH
])
def test_packed_task_runs_the_command_as_srun_resolves_it(workdir, cmdline, expected) -> None:
    env = {**os.environ, "X": "1", "SLURM_CPUS_PER_TASK": "128"}
    done = subprocess.run(["/bin/bash", "-c", packed_task(cmdline)], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=60)
    if expected is None:
        assert done.returncode == 127 and "APP" not in done.stdout, (done.returncode, done.stdout, done.stderr)
        return
    assert done.returncode == 0, done.stderr
    # The app's argv[0], arguments, FOO, X, SLURM_CPUS_PER_TASK (the job's, not the step's 128); its pid left out.
    assert done.stdout.strip().rsplit(" ", 1)[0] == expected, (done.stdout, done.stderr)


def test_packed_task_is_the_app_itself(workdir) -> None:
    """The wrapper execs the app: a signal to the task's process (Slurm's scancel --signal) reaches
    it, and no shell stays behind."""
    env = {**os.environ, "APP_WAIT": "1"}
    proc = subprocess.Popen(["/bin/bash", "-c", packed_task("app")], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline().split()
        assert first[:2] == ["APP", "./app"] and int(first[-1]) == proc.pid, first
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == [], children
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "TERM" and proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
