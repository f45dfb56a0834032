"""Perlmutter (NERSC): HPE Cray EX, Slurm, ``srun``.

- ``perlmutter-gpu``: one 64-core AMD EPYC 7763 (128 hardware threads) and four NVIDIA A100 per node
  (``--constraint=gpu``);
- ``perlmutter-cpu``: two 64-core AMD EPYC 7763 (256 hardware threads) per node (``--constraint=cpu``).

Nodes come from ``$SLURM_JOB_NODELIST`` (``nid[001234-001236,001240]``); when the launcher's
environment sets ``CUDA_VISIBLE_DEVICES`` (the shared QOS, ``--gpus=1|2``), jobs get only the GPU
ids it lists, and when ``$SLURM_JOB_CPUS_PER_NODE`` gives a node fewer logical CPUs than the whole
node (an allocation without ``--exclusive``: the shared QOS), only that many cores
(:func:`allocated_cores`). NERSC's queues are Slurm QOS names (regular, debug, ...), so the site's Slurm
scheduler is set to pass the queue as ``--qos`` (``scheduler.options.queue_flag``). Runs are
Slurm job steps, Balsam 0.7's ``PerlmutterRun`` line::

    srun [--gres=craynetwork:0] -n N --ntasks-per-node R [--gpus-per-task G] --nodelist h1,h2 --nodes n
         --cpus-per-task C --cpu-bind=cores [--key value ...] --overlap CMD

(``--overlap`` so that packed steps may share the allocation's nodes; a packed GPU job asks for no
GPU and runs ``/bin/sh -c TASK_SCRIPT sh CUDA_VISIBLE_DEVICES=<its ids> -- CMD``: real Slurm gave
every ``--overlap`` step the first GPUs, see ``PerlmutterGPUPlatform._balsam_gpus``; the wrapper,
:data:`TASK_SCRIPT`, runs CMD as srun would). ``C`` counts logical CPUs
(hardware threads), as srun does (NERSC: ``-c`` is 2 x the cores a task needs): the cores of one rank,
``ceil(threads_per_rank / threads_per_core)``, times the node's 2 hardware threads per core; 0.7 passed
``threads_per_rank``, which gave a rank of 8 threads 4 cores. ``--cpu-bind=cores`` (NERSC's advice)
unless the job's launch_params bind otherwise. A job packed on part of a node is bound to the cores
balsam gave it instead (real Slurm bound every packed step to the node's first cores), unless its
launch params set ``-c`` or scale with it (:data:`CPU_SCALED_PARAMS`)::

    srun ... --nodes 1 [--overcommit] --cpus-per-task <allocation's CPUs on the node / R>
         --cpu-bind=mask_cpu:<one mask per rank> --overlap /bin/sh -c TASK_SCRIPT sh
         SLURM_CPUS_PER_TASK=C SLURM_CPUS_ON_NODE=<the old step's> [SLURM_OVERCOMMIT] -- CMD

(see ``PerlmutterGPUPlatform._packed_cpu_masks``).

At the launcher's stop (:meth:`PerlmutterGPUPlatform.signal_runs`): srun does not forward a SIGTERM
to its step's tasks ("forcing job termination": they get SIGKILL, exit 0:9 in sacct), so the SIGTERM
that lets an app save a checkpoint goes through Slurm instead: one ``scontrol --oneliner show step``
call lists the allocation's steps with the pid of each step's srun (``SrunHost:Pid``), the job each
srun runs is read from its environment (``BALSAM_JOB_ID``, which the launcher sets for every job),
and one ``scancel --signal=TERM <job>.<step> ...`` signals those steps (not the batch step, where the
launcher runs, nor the steps of another launcher).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import attrs

from balsam.builtin.default_platform import HostlistError, expand_hostlist
from balsam.options import OptionsError, option
from balsam.platform import (
    LaunchSpec, NodeInfo, Platform, cpu_bind_list, cpu_ids_beyond_cores_errors, cpu_ids_errors, cuda_visible_only,
    format_id_ranges, hardware_thread_ids,
    launch_param_args, launch_option_name, launch_param_value, launch_params_to_pass, leading_job_number,
    parse_id_ranges,
)

logger = logging.getLogger("balsam.platform.perlmutter")

#: srun options the platform computes -> the launch_params keys that replace the computed value
#: (as written in settings and jobs: bare, with dashes, or the short letter). An empty value
#: leaves the option out (``{"gpus-per-task": ""}``: no GPU request); srun has no bare form of them.
OVERRIDES = {
    "gres": ("gres", "--gres"),
    "gpus-per-task": ("gpus-per-task", "--gpus-per-task"),
    "cpus-per-task": ("cpus-per-task", "--cpus-per-task", "c", "-c"),
    "cpu-bind": ("cpu-bind", "--cpu-bind", "cpu_bind"),
}
#: srun options the line sets from balsam's placement (names without dashes, any spelling of a
#: launch_params key) -> the option of the line. A launch param naming one is not passed (warned once
#: per app and key): given twice, srun takes the last one, and the step's ranks are not laid out on
#: the nodes and cores balsam accounted for (a packed step could land on another step's cores).
RESERVED_OPTIONS = {
    "n": "-n", "ntasks": "-n",
    "ntasks-per-node": "--ntasks-per-node",
    "N": "--nodes", "nodes": "--nodes",
    "w": "--nodelist", "nodelist": "--nodelist", "F": "--nodelist", "nodefile": "--nodelist",
}
#: NERSC's shared QOS (part of one node, up to 48 hours), which the BatchJobs of ``-x exclusive=no``
#: are for (docs/platforms/perlmutter.md): without it in a new site's allowed_queues, the documented
#: ``balsam queue submit -q shared -x exclusive=no ...`` was refused ("queue 'shared' is not in the
#: site's allowed_queues (debug, regular)").
SHARED_QOS = {"shared": {"max_nodes": 1, "max_walltime": 2880, "max_queued_jobs": 5000}}
#: Seconds one scontrol or scancel call may take at the launcher's stop (the grace is short).
SLURM_CALL_TIMEOUT_SEC = 5.0
#: Flags the line has already: a launch param naming one is dropped without a warning.
DUPLICATE_FLAGS = ("overlap",)
#: Launch params (any spelling) that ask Slurm for GPUs or bind them: a job giving one keeps
#: Slurm's GPU placement (:meth:`PerlmutterGPUPlatform._balsam_gpus`).
GPU_REQUEST_PARAMS = ("gpus", "G", "gpus-per-node", "gpus-per-socket", "gpu-bind", "gpus-per-task")
#: What Slurm sets in a job that asked for GPUs by count (--gpus-per-node, --gpus, --gpus-per-task,
#: --gpus-per-socket); its steps inherit it as their own request. A job with none of them (only
#: --exclusive, or --gres=gpu:N) gave a step asking for no GPU, or for ``--gres=craynetwork:0``,
#: none (real Slurm 22.05): packed and fractional GPU jobs ran without a GPU.
GPU_COUNT_VARIABLES = ("SLURM_GPUS_PER_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_SOCKET")
#: The binding of a step whose launch_params name none (NERSC's recommended ``--cpu-bind=cores``).
DEFAULT_CPU_BIND = "cores"
#: Launch params (any spelling) whose effect scales with the step's ``-c`` or lays tasks out by
#: core: a job giving one keeps the line before masks (its own ``-c``, like a ``cpus-per-task``
#: param). On the widened packed step (``-c`` of the node's CPUs) real Slurm refused
#: ``--mem-per-cpu`` ("Memory required by task is not available", ``CR_Core_Memory``), and
#: ``--threads-per-core`` / ``--ntasks-per-core`` apply to the node's CPUs, not the job's.
CPU_SCALED_PARAMS = ("mem-per-cpu", "threads-per-core", "ntasks-per-core")
#: The packed step's task: ``/bin/sh -c TASK_SCRIPT sh VAR=value... [NAME...] -- CMD...`` exports
#: each ``VAR=value`` and unsets each bare ``NAME``, then runs the command's words as srun(1)
#: resolves an executable ("EXECUTABLE PATH RESOLUTION": a name starting with ``.`` relative to the
#: working directory, ``/`` absolute, else through ``PATH``, else in the working directory);
#: ``env VAR=.. CMD`` searched ``PATH`` only (``app`` in the workdir: rc 127) and took a first word
#: holding ``=`` (``./run=3/app``) as an assignment. ``exec``: the app is the task's process (Slurm's
#: signals reach it, no shell is left behind). The same script for every job; its words are
#: positional parameters, so the launcher's ``/bin/bash -c "<line>"`` passes them as written.
TASK_SCRIPT = ('while [ "$1" != -- ]; do case $1 in *=*) export "$1" ;; *) unset "$1" ;; esac; shift; done; '
               'shift; p=$1; shift; case $p in /*|*/*) ;; .*) p=./$p ;; *) f=; set -f; IFS=:; '
               'for d in $PATH; do [ -f "${d:-.}/$p" ] && [ -x "${d:-.}/$p" ] && f=1 && break; done; '
               'unset IFS; set +f; [ -n "$f" ] || [ ! -e "$p" ] || p=./$p ;; esac; exec "$p" "$@"')


def task_wrapper(variables: Mapping[str, str], unset: Sequence[str] = ()) -> list[str]:
    """The words before a packed step's command (:data:`TASK_SCRIPT`) that export ``variables`` and
    unset ``unset`` in the task, or ``[]`` when there is neither."""
    if not variables and not unset:
        return []
    return ["/bin/sh", "-c", TASK_SCRIPT, "sh", *(f"{k}={v}" for k, v in variables.items()), *unset, "--"]


def parse_cpus_per_node(text: str) -> list[int]:
    """Slurm's ``SLURM_JOB_CPUS_PER_NODE`` (``"32(x2),16"``) as one count per node, in node list
    order (``[32, 32, 16]``); ValueError for another form."""
    counts: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"not a count of CPUs per node: {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def allocated_cores(nodes: Sequence[NodeInfo], env: Mapping[str, str], hardware_threads_per_core: int,
                    cores_per_node: int, own_cpus: Optional[set[int]] = None) -> list[NodeInfo]:
    """``nodes`` with only as many cores as the allocation has on each (``SLURM_JOB_CPUS_PER_NODE``,
    logical CPUs: divided by ``hardware_threads_per_core``; at least one). Slurm without
    ``--exclusive`` (``-x exclusive=no``, the shared QOS) gives a job part of a node: one with all of
    the node's cores packed steps whose ``srun --cpus-per-task`` Slurm refused ("More processors
    requested than permitted"). Unset, a whole node, or a list that does not fit the nodes: ``nodes``
    as they are. The core ids kept are the allocation's own on the launcher's node
    (``SLURMD_NODENAME``; ``own_cpus``: its CPU affinity, logical CPU ``c`` is core
    ``c % cores_per_node``) when they are among the node's, else the node's first ones. Logged in
    one line when it narrows anything."""
    text = env.get("SLURM_JOB_CPUS_PER_NODE")
    if not text or not nodes:
        return list(nodes)
    try:
        counts = parse_cpus_per_node(text)
    except ValueError as exc:
        logger.warning("SLURM_JOB_CPUS_PER_NODE=%s: %s; jobs get every core of the nodes", text, exc)
        return list(nodes)
    if len(counts) != len(nodes):
        logger.warning("SLURM_JOB_CPUS_PER_NODE=%s gives %d nodes' counts for %d nodes; jobs get every core of the nodes",
                       text, len(counts), len(nodes))
        return list(nodes)
    own = env.get("SLURMD_NODENAME", "")
    narrowed: list[NodeInfo] = []
    for node, logical in zip(nodes, counts):
        cores = max(1, logical // max(1, hardware_threads_per_core))
        if cores >= len(node.cpu_ids):
            narrowed.append(node)
            continue
        kept = tuple(node.cpu_ids[:cores])
        if own_cpus and node.hostname == own:
            mine = sorted({c % cores_per_node for c in own_cpus} & set(node.cpu_ids))
            if len(mine) == cores:
                kept = tuple(mine)
        narrowed.append(attrs.evolve(node, cpu_ids=kept))
    changed = [(old, new) for old, new in zip(nodes, narrowed) if new is not old]
    if changed:
        old, new = changed[0]
        logger.info("SLURM_JOB_CPUS_PER_NODE=%s: the allocation has part of the nodes' CPUs; jobs get only its cores "
                    "(%s: %d of %d cores, %s)%s", text, new.hostname, len(new.cpu_ids), len(old.cpu_ids),
                    format_id_ranges(new.cpu_ids), f"; {len(changed)} nodes narrowed" if len(changed) > 1 else "")
    return narrowed


def _override(params: dict[str, Any], option: str) -> tuple[bool, Any]:
    """``(given, value)`` of the launch param that replaces srun's ``option``; every alias of it, in
    any spelling (:func:`balsam.platform.launch_option_name`: ``"--cpu-bind=cores"`` too, its value
    read from the key), is taken out of ``params`` (the first one given wins)."""
    names = {launch_option_name(k) for k in OVERRIDES[option]}
    given, value = False, None
    for key in [k for k in params if launch_option_name(k) in names]:
        found = launch_param_value(key, params.pop(key))
        if not given:
            given, value = True, found
    return given, value


def _own_cpus() -> Optional[set[int]]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity support on this OS
        return None


def parse_steps(text: str) -> list[tuple[str, str, int]]:
    """``scontrol --oneliner show step`` as ``(step id, srun host, srun pid)`` per numbered step; lines
    without both fields, or whose step is not a number (``.batch``, ``.extern``, a pending ``.TBD``),
    are skipped."""
    steps: list[tuple[str, str, int]] = []
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        step_id, srun = fields.get("StepId"), fields.get("SrunHost:Pid")
        host, _, pid = (srun or "").rpartition(":")
        # A step not started yet (``<job>.TBD``) has no number scancel takes.
        if step_id and step_id.rpartition(".")[2].isdecimal() and host and pid.isdecimal():
            steps.append((step_id, host, int(pid)))
    return steps


def _balsam_job_of(pid: int) -> Optional[int]:
    """The ``BALSAM_JOB_ID`` in the environment of process ``pid`` (an srun the launcher started for
    a job), or None (no such variable, or the process is gone or not ours)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"BALSAM_JOB_ID="):
            value = item.partition(b"=")[2]
            return int(value) if value.decode("ascii", "replace").isdecimal() else None  # bytes have no isdecimal
    return None


def _slurm_run(args: list[str], timeout: float) -> Optional[subprocess.CompletedProcess]:
    """Run a Slurm command (``scontrol``, ``scancel``; found on PATH) for at most ``timeout`` seconds;
    None with a warning when it is missing, cannot run or takes longer (its exit status unread)."""
    program = shutil.which(args[0])
    if program is None:
        logger.warning("%s is not on PATH: the runs get the launcher's stop signal through srun (a SIGKILL)", args[0])
        return None
    if timeout <= 0:
        logger.warning("%s not run: the stop's grace is spent; the runs get the launcher's stop signal through srun "
                       "(a SIGKILL)", shlex.join(args))
        return None
    try:
        return subprocess.run([program, *args[1:]], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("%s failed (%s): the runs get the launcher's stop signal through srun (a SIGKILL)",
                       shlex.join(args), exc)
        return None


def _slurm_call(args: list[str], timeout: float = SLURM_CALL_TIMEOUT_SEC) -> Optional[str]:
    """:func:`_slurm_run`'s output, or None with a warning when it did not exit 0 either."""
    done = _slurm_run(args, timeout)
    if done is None:
        return None
    if done.returncode != 0:
        logger.warning("%s exited %s (%s): the runs get the launcher's stop signal through srun (a SIGKILL)",
                       shlex.join(args), done.returncode, (done.stderr or done.stdout or "").strip()[:300])
        return None
    return done.stdout


def _delivered_despite(done: subprocess.CompletedProcess, steps: Mapping[str, tuple[int, int]]) -> set[int]:
    """The jobs of ``steps`` (step id -> ``(job id, srun pid)``) that a ``scancel --signal`` exiting
    non-zero signalled all the same. scancel signals each step on its own and exits with the worst
    error of them; a step that ended meanwhile is an error too, printed only with ``-v`` (Slurm's
    scancel.c: "already done" is forgiven only for SIGKILL), so one ended run made it exit 1 while
    the others got the signal. The steps its error lines name were not signalled, nor a step whose
    srun is gone (ended); the others were. An error naming no step (a bad option, no controller):
    none."""
    errors = [line for line in (done.stderr or "").splitlines() if line.strip()]
    failed = {step for step in steps if any(re.search(rf"\b{re.escape(step)}\b", line) for line in errors)}
    if any(not any(re.search(rf"\b{re.escape(step)}\b", line) for step in steps) for line in errors):
        logger.warning("scancel exited %s (%s): the runs get the launcher's stop signal through srun (a SIGKILL)",
                       done.returncode, "; ".join(errors)[:300])
        return set()
    delivered = {job_id for step, (job_id, pid) in steps.items() if step not in failed and _balsam_job_of(pid) == job_id}
    logger.info("scancel exited %s (%s): %d of %d runs' steps signalled (the others ended or failed)",
                done.returncode, "; ".join(errors)[:300] or "a step had ended", len(delivered), len(steps))
    return delivered


def _gpus_steps_get(nodes: list[NodeInfo], env: Mapping[str, str]) -> list[NodeInfo]:
    """``nodes`` with the GPUs the job's steps get: the N GPUs Slurm lists first on each node
    (lowest ids), where the job asked for N per node (``SLURM_GPUS_PER_NODE``; ``SLURM_GPUS``
    without it, which every step inherits as its own total) and holds more. With ``--exclusive``
    Slurm gives the job the node's 4 GPUs (``CUDA_VISIBLE_DEVICES=0,1,2,3``) but its steps inherit
    the count: under ``--exclusive --gpus-per-node=2``, ``--gpus=2`` (and ``-N2 --gpus=2``, on
    each node) every single-node step, ``--gpus-per-task 1`` and ``--gres=craynetwork:0`` ones too,
    got GPUs 0,1 (real Slurm 22.05), so a packed job balsam gave GPU 2 or 3 ran on a GPU its step
    does not hold."""
    count = (env.get("SLURM_GPUS_PER_NODE") or "").strip()
    total = "" if count else (env.get("SLURM_GPUS") or "").strip().rsplit(":", 1)[-1]
    if total.isdecimal() and len(nodes) > 1:
        # Each step asks for the job's total: a multi-node step for that many over its nodes (real
        # Slurm 22.05, -N2 --gpus=4: 3 GPUs on one node, 1 on the other; --gpus=2: refused), a
        # step on one node for that many there (-N2 --gpus=8: every one refused).
        refused = any(int(total) > len(node.gpu_ids) for node in nodes)
        (logger.error if refused else logger.warning)(
            "this Slurm job asked for --gpus=%s over %d nodes (no per-node count): every srun step asks for the "
            "job's %s GPUs, %s; multi-node jobs get an uneven share or are refused: ask for a count per node "
            "(-x gpus_per_node=N, or --gpus-per-node=N instead of --gpus)", total, len(nodes), total,
            "so a step on one node is refused ('Invalid generic resource (gres) specification')" if refused
            else f"so a step on one node holds its first {total}")
    count = (count or total).rsplit(":", 1)[-1]  # [type:]N
    if not count.isdecimal() or not any(len(node.gpu_ids) > int(count) for node in nodes):
        return nodes
    listed = [g.strip() for g in (env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if g.strip()]
    kept_nodes = []
    for node in nodes:
        # Slurm gives a step its first GPUs in its own (index) order: the job's CUDA_VISIBLE_DEVICES
        # order, else the lowest ids (not gpu_ids' order, which may be '3,2,1,0').
        order = [g for g in listed if g in node.gpu_ids] or sorted(
            node.gpu_ids, key=lambda g: (not g.isdecimal(), int(g) if g.isdecimal() else 0, g))
        held = set(order[:int(count)])
        kept = tuple(g for g in node.gpu_ids if g in held)
        groups = tuple(part for part in (tuple(g for g in group if g in kept) for group in node.gpu_groups) if part)
        kept_nodes.append(attrs.evolve(node, gpu_ids=kept, gpu_groups=groups,
                                       gpu_cpus=tuple((g, cpus) for g, cpus in node.gpu_cpus if g in kept)))
    logger.warning("the job holds GPUs %s of %s but asked for %s per node (its steps get only the first %s): jobs get "
                   "GPUs %s; a BatchJob of whole nodes should ask for all their GPUs, one asking for fewer for -x "
                   "exclusive=no (the shared QOS)",
                   ",".join(nodes[0].gpu_ids), nodes[0].hostname, count, count, ",".join(kept_nodes[0].gpu_ids))
    return kept_nodes


@attrs.frozen
class PerlmutterOptions:
    cpu_ids: str = option("", "CPU (core) ids of one node, as ranges; empty: the node type's (0-63 GPU, 0-127 CPU).")
    gpu_ids: str = option("", "GPU ids of one node; empty: the node type's (0,1,2,3 on GPU nodes, none on CPU nodes).")
    srun: str = option("srun", "The Slurm srun command.")
    single_rank_gres: str = option(
        "craynetwork:0",
        "--gres of single-rank steps (Balsam 0.7: craynetwork:0, so that many one-rank steps do not "
        "exhaust the network resource); empty: none.",
    )

    def validate(self) -> dict[str, str]:
        # Beyond 127 is a hardware thread on either node type (a GPU node's 64-127 are checked
        # when the platform starts: the options do not say which node type they are for).
        return cpu_ids_errors(self.cpu_ids or "0") or cpu_ids_beyond_cores_errors(self.cpu_ids or "0", 128)


class PerlmutterGPUPlatform(Platform):
    name = "perlmutter-gpu"
    description = "NERSC Perlmutter GPU nodes: 64 cores and 4 NVIDIA A100 per node, Slurm (--qos), srun"
    default_scheduler = "slurm"
    mpirun_allows_node_packing = True
    options_schema = PerlmutterOptions
    constraint = "gpu"
    node_cpu_ids = "0-63"
    node_gpu_ids = "0,1,2,3"
    #: Logical CPUs of a node: what one serial-mode worker per node asks srun for.
    logical_cpus = 128
    #: Hardware threads per core (srun's --cpus-per-task counts them); core c's second is c + cores.
    hardware_threads_per_core = 2

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.cpu_ids = parse_id_ranges(self.options.cpu_ids or self.node_cpu_ids, where="launcher.platform_options.cpu_ids")
        # The node's logical CPUs (0-127 on a GPU node, as lscpu lists them) counted every core
        # twice: steps packed on a core and its second thread, serial tasks pinned to CPUs 128-191.
        cores = self.logical_cpus // self.hardware_threads_per_core
        for name, problem in cpu_ids_beyond_cores_errors(self.options.cpu_ids, cores).items():
            # OptionsError: the launcher reports it in one line (it is a ValueError too).
            raise OptionsError(f"launcher.platform_options.{name} on {self.name} nodes: {problem}")
        gpus = self.options.gpu_ids or self.node_gpu_ids
        self.gpu_ids = tuple(g.strip() for g in gpus.split(",") if g.strip())
        #: Logical CPUs of the allocation on its smallest node, once discover_nodes has read them
        #: (0: not known, the whole node).
        self.allocated_logical_cpus = 0

    # -- inside an allocation -------------------------------------------------------------------
    def discover_nodes(self, env: Mapping[str, str]) -> list[NodeInfo]:
        variable = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
        nodelist = env.get(variable)
        if not nodelist:
            raise RuntimeError("$SLURM_JOB_NODELIST is not set: not inside a Slurm job")
        try:
            # The core's parser, which reads a host list as Slurm does (commas and blanks between
            # items, empty items skipped) and stops in one line at a cut-off or backwards one (they
            # gave wrong or no hosts). This plugin's own regular expression check backtracked
            # exponentially on a cut-off list of a few items: the launcher hung, silently, until
            # walltime. Each host once, as on the default platform: one named twice is not two nodes.
            hosts = list(dict.fromkeys(expand_hostlist(nodelist)))
        except HostlistError as exc:
            # The core's one line: ~80 characters around the fault (a 10,000-node list is ~100,000).
            raise RuntimeError(exc.in_variable(variable)) from None
        nodes = [NodeInfo(node_id=host, hostname=host, cpu_ids=self.cpu_ids, gpu_ids=self.gpu_ids) for host in hosts]
        # The shared QOS (--gpus=1|2) and partial-node allocations: Slurm names the job's GPUs there,
        # and counts the job's CPUs on each node.
        cores_per_node = self.logical_cpus // self.hardware_threads_per_core
        nodes = allocated_cores(nodes, env, self.hardware_threads_per_core, cores_per_node, _own_cpus())
        self.allocated_logical_cpus = min(len(n.cpu_ids) for n in nodes) * self.hardware_threads_per_core if nodes else 0
        nodes = cuda_visible_only(nodes, env)
        if self.gpu_ids and (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")):
            given = {name for name in GPU_COUNT_VARIABLES if (env.get(name) or "").strip()}
            if not given:
                logger.warning(
                    "this Slurm job asked for no GPU count (none of %s is set; --gres=gpu:N sets none): Slurm gives "
                    "its steps that ask for no GPU (or give their own --gres, as single-rank steps do) none, so packed "
                    "and fractional GPU jobs run without one: ask for a count (-x gpus_per_node=N; a BatchJob of "
                    "whole nodes may keep --gres=gpu:N beside it, a shared one should ask for it instead of "
                    "--gres=gpu:N); sites made "
                    "before Balsam asked for it lack the key: add gpus_per_node: '%d' under "
                    "scheduler.optional_batch_job_params in settings.yml and run balsam site sync",
                    ", ".join(GPU_COUNT_VARIABLES), len(self.gpu_ids))
            elif given == {"SLURM_GPUS_PER_TASK"}:
                logger.warning(
                    "this Slurm job asked for GPUs only per task (SLURM_GPUS_PER_TASK=%s): every srun step inherits "
                    "it, so a single-rank packed step holds only the first %s GPU(s) of its node whatever GPU Balsam "
                    "gives it (real Slurm 22.05: all held GPU 0): ask for the node's GPUs beside it (on whole "
                    "nodes -x gpus_per_node=%d, with --ntasks-per-node x --gpus-per-task making %d, or -n N)",
                    env["SLURM_GPUS_PER_TASK"].strip(), env["SLURM_GPUS_PER_TASK"].strip(), len(self.gpu_ids),
                    len(self.gpu_ids))
            nodes = _gpus_steps_get(nodes, env)
        return nodes

    def scheduler_id(self, env: Mapping[str, str]) -> Optional[int]:
        return leading_job_number(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "")

    # -- MPI ------------------------------------------------------------------------------------
    def cpus_per_task(self, spec: LaunchSpec) -> int:
        """srun's ``--cpus-per-task``: logical CPUs (NERSC's rule), so a rank's share of cores
        (``threads_per_rank / threads_per_core``) times the hardware threads of a core, rounded up
        only once: ranks that share a core (one thread each at 2 threads per core) get one logical
        CPU each, as the node manager counts them; rounding the cores up first asked srun for twice
        the node's CPUs.

        A job that owns whole nodes (several nodes, a node it occupies whole, ``LaunchSpec.whole_nodes``,
        or every core of its node) gets at least NERSC's
        ``2 * floor(cores / tasks_per_node)``: srun lays the tasks out from core 0, ``-c`` CPUs
        each, so 4 one-thread GPU ranks at ``-c 2`` all sat in the first NUMA domain, far from 3 of
        their 4 GPUs. Packed steps on part of a node keep the computed count."""
        threads_per_core = min(max(1, spec.threads_per_core), self.hardware_threads_per_core)
        logical = max(1, spec.threads_per_rank) * self.hardware_threads_per_core
        computed = max(1, -(-logical // threads_per_core))
        cores = len(self.cpu_ids)
        if 0 < self.allocated_logical_cpus < self.logical_cpus:
            # An allocation of part of each node: srun refuses more CPUs than it has there.
            cores = min(cores, self.allocated_logical_cpus // self.hardware_threads_per_core)
        if self._holds_its_nodes(spec):
            return max(computed, self.hardware_threads_per_core * (cores // max(1, spec.ranks_per_node)))
        return computed

    def _holds_its_nodes(self, spec: LaunchSpec) -> bool:
        """The job has its nodes to itself: several nodes, a node it occupies whole
        (``LaunchSpec.whole_nodes``), or every core the allocation has on its node."""
        cores = len(self.cpu_ids)
        if 0 < self.allocated_logical_cpus < self.logical_cpus:
            cores = min(cores, self.allocated_logical_cpus // self.hardware_threads_per_core)
        assigned = spec.cpu_ids[0] if spec.cpu_ids else ()
        return spec.num_nodes > 1 or spec.whole_nodes or len(set(assigned)) >= cores

    def _old_step_cpus_on_node(self, cpus: int, ranks: int) -> int:
        """``SLURM_CPUS_ON_NODE`` of the line before masks (``-n ranks -c cpus --cpu-bind=cores``):
        Slurm gives a step whole cores. Real Slurm 22.05 (2 threads per core): -n1 -c1 2, -n2 -c1 2
        (one-CPU tasks share a core), -n1 -c2 2, -n1 -c3 4, -n2 -c3 8, -n2 -c16 32."""
        per_core = self.hardware_threads_per_core
        cpus, ranks = max(1, cpus), max(1, ranks)
        if cpus < per_core:
            cores = -(-ranks // (per_core // cpus))
        else:
            cores = ranks * -(-cpus // per_core)
        return cores * per_core

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        params = dict(spec.launch_params)
        args = [*shlex.split(self.options.srun)]
        given, gres = _override(params, "gres")
        if not given and spec.num_ranks == 1:
            gres = self.options.single_rank_gres
        if gres:
            args.append(f"--gres={gres}")
        args += ["-n", str(spec.num_ranks), "--ntasks-per-node", str(max(1, spec.ranks_per_node))]
        given, gpus = _override(params, "gpus-per-task")
        visible = self._balsam_gpus(spec, given or "gpu" in str(gres or ""), params)
        if not given and not visible and spec.gpus_per_rank >= 1 and float(spec.gpus_per_rank).is_integer():
            # A fraction of a GPU, or a packed job (balsam's ids set in the task): no srun GPU request.
            gpus = int(spec.gpus_per_rank)
        if gpus not in (None, ""):
            args += ["--gpus-per-task", str(gpus)]
        args += ["--nodelist", ",".join(spec.hostnames), "--nodes", str(spec.num_nodes)]
        given_cpus, cpus = _override(params, "cpus-per-task")
        given_bind, bind = _override(params, "cpu-bind")
        if not given_cpus:
            cpus = self.cpus_per_task(spec)
        elif str(cpus) == str(self.logical_cpus) and 0 < self.allocated_logical_cpus < self.logical_cpus:
            # The whole node (serial mode's workers: serial_mode_startup_params) is, in an allocation
            # of part of the nodes, what the allocation has there: srun refuses more.
            cpus = self.allocated_logical_cpus
        if not given_bind:
            bind = DEFAULT_CPU_BIND
        variables: dict[str, str] = {}
        unset: list[str] = []
        scaled = any(launch_option_name(k) in CPU_SCALED_PARAMS for k in params)
        masks = "" if given_cpus or given_bind or scaled else self._packed_cpu_masks(spec)
        if masks:
            # A packed step is bound to balsam's cores (see _packed_cpu_masks); its tasks' -c spans
            # the allocation's CPUs on the node so that the masks lie in the step's CPUs, and the app
            # sees the job's own counts again, as the old line's step had them (OMP_* are balsam's).
            ranks = max(1, spec.ranks_per_node)
            variables["SLURM_CPUS_PER_TASK"] = str(cpus)
            variables["SLURM_CPUS_ON_NODE"] = str(self._old_step_cpus_on_node(int(cpus), ranks))
            node_cpus = self._node_logical_cpus()
            cpus = node_cpus // ranks
            if node_cpus % ranks:
                # -c node/ranks left the node's last CPUs out of the step (3 ranks of -c 42 got 126
                # of 128; -c 43 was refused): a mask there fell outside. --overcommit lets every
                # task's -c be the node's CPUs (real Slurm 22.05: 3 tasks of -c 128 -O started);
                # the task's SLURM_OVERCOMMIT=1 is the step's, not the job's: unset.
                cpus = node_cpus
                args.append("--overcommit")
                unset.append("SLURM_OVERCOMMIT")
            bind = f"mask_cpu:{masks}"
        if cpus not in (None, ""):
            args += ["--cpus-per-task", str(cpus)]
        if bind not in (None, ""):
            args.append(f"--cpu-bind={bind}")
        passed = launch_params_to_pass(spec, args, RESERVED_OPTIONS, params=params, duplicates=DUPLICATE_FLAGS)
        # slurmstepd writes the step's CUDA_VISIBLE_DEVICES over the one srun was started with, so
        # the GPUs balsam gave a packed job are set again in the task, after Slurm (the wrapper's
        # sh exports them and execs the app).
        if visible:
            variables["CUDA_VISIBLE_DEVICES"] = visible
        return args + launch_param_args(passed) + ["--overlap"] + task_wrapper(variables, unset)

    def _node_logical_cpus(self) -> int:
        """Logical CPUs the allocation has on a node: the whole node's, or fewer in an allocation of
        part of it (the shared QOS: ``SLURM_JOB_CPUS_PER_NODE``, read by discover_nodes)."""
        if 0 < self.allocated_logical_cpus < self.logical_cpus:
            return self.allocated_logical_cpus
        return self.logical_cpus

    def _packed_cpu_masks(self, spec: LaunchSpec) -> str:
        """``--cpu-bind=mask_cpu``'s masks (one per task, in local task order: ``0xff000000ff,...``)
        binding a packed job's ranks to the cores balsam's node manager gave it, or ``""``: the job
        has its node to itself (several nodes, a whole node, every core) and keeps
        ``--cpu-bind=cores``.

        Slurm (22.05, real) lays an ``--overlap`` step's tasks out from the node's first cores
        whatever other steps hold: two packed ``-c 1 --cpu-bind=cores`` steps (balsam: cores 0 and
        1) were both bound to CPU 0, and ``--cpu-bind=map_cpu:1`` failed ("CPU binding outside of
        job step allocation, allocated CPUs are: 0x1"). A step whose tasks' ``-c`` covers the
        allocation's CPUs on the node may be bound anywhere there, and ``--overlap`` lets it share
        them with the other steps: two such steps with ``mask_cpu:0x1`` and ``0x2`` ran at once on
        CPUs 0 and 1. Each rank gets its share of the job's cores as :func:`cpu_bind_list` cuts them,
        with both hardware threads of each core (what ``--cpu-bind=cores`` gave a task)."""
        assigned = spec.cpu_ids[0] if spec.cpu_ids else ()
        ranks = max(1, spec.ranks_per_node)
        cores = len(self.cpu_ids)
        if 0 < self.allocated_logical_cpus < self.logical_cpus:
            # Part of a node (the shared QOS): srun(1) honours explicit masks only for a step given
            # every CPU of the node, and balsam's ids there (0..n-1, from SLURM_JOB_CPUS_PER_NODE)
            # are not the node's CPUs the allocation holds: Slurm's --cpu-bind=cores binds.
            return ""
        if (not assigned or spec.num_nodes != 1 or spec.whole_nodes or len(set(assigned)) >= cores
                or ranks > self._node_logical_cpus()):
            return ""
        offset = self.logical_cpus // self.hardware_threads_per_core
        whole_cores = attrs.evolve(spec, threads_per_core=self.hardware_threads_per_core)
        per_rank = cpu_bind_list(whole_cores, assigned, hyperthread_offset=offset,
                                 max_threads_per_core=self.hardware_threads_per_core)
        masks = []
        for part in per_rank.removeprefix("list:").split(":"):
            masks.append(hex(sum(1 << cpu for cpu in set(parse_id_ranges(part, where="cpu_bind_list")))))
        return ",".join(masks)

    def _balsam_gpus(self, spec: LaunchSpec, slurm_gpus: bool, params: Mapping[str, Any]) -> str:
        """The ``CUDA_VISIBLE_DEVICES`` a packed job's step runs its app with (the GPU ids balsam
        gave it, those of its first node as the launcher's job environment has them), or ``""``:
        Slurm's GPUs are kept.

        Slurm (22.05, real GRES) places a step's GPUs itself and sets the task's
        ``CUDA_VISIBLE_DEVICES`` over the one srun inherits: ``--overlap`` steps share GRES, so
        every ``--gpus-per-task 1`` step of a packed node got GPU 0 while 1-3 sat idle (and more
        steps than GPUs all started there), and a fractional job's step (no GPU request) got all
        the allocation's GPUs. A packed job's step therefore asks srun for no GPU (it has the
        allocation's GPUs, visible under a device cgroup too) and sets balsam's ids again. A job
        that has its nodes to itself (several nodes, one whole, every core of it) or every GPU of
        its node keeps ``--gpus-per-task``: Slurm's GPUs are free there (no other step holds one),
        and it binds each rank to its own (4 ranks of a packed job holding the node's 4 GPUs all saw
        ``0,1,2,3`` under balsam's ids). A GPU request in the
        job's launch params (``gpus-per-task``, ``gpus``, ``gpus-per-node``, ``gpu-bind``, a
        ``gres`` naming gpu: ``slurm_gpus``) leaves the GPUs to Slurm as asked."""
        ids = spec.gpu_ids[0] if spec.gpu_ids else ()
        if not ids or slurm_gpus or self._holds_its_nodes(spec) or set(map(str, ids)) >= set(self.gpu_ids):
            return ""
        for key, value in params.items():
            name = launch_option_name(key)
            if name in GPU_REQUEST_PARAMS or (name == "tres-per-task" and "gpu" in str(value)):
                return ""
        return ",".join(map(str, ids))

    # -- ending runs ----------------------------------------------------------------------------
    def signal_runs(self, job_ids: Sequence[int], sig: int, timeout: Optional[float] = None) -> set[int]:
        """Send ``sig`` to the steps of these jobs' runs with ``scancel --signal`` (srun would turn
        a SIGTERM to its process group into a SIGKILL of the step's tasks). The steps of this
        allocation (``$SLURM_JOB_ID``) come from one ``scontrol --oneliner show step`` call, each with
        its srun's host and pid; a step whose srun runs here and carries ``BALSAM_JOB_ID`` of one
        of ``job_ids`` in its environment is that job's. Returns the jobs whose steps were
        signalled: those scancel did not name in an error when it exited non-zero, their srun
        still there (:func:`_delivered_despite`); none, with a warning, when scontrol or scancel
        fails or does not answer in time. Each call gets at most :data:`SLURM_CALL_TIMEOUT_SEC`,
        both together at most ``timeout`` (the launcher's grace)."""
        allocation = (os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID") or "").strip()
        if not allocation or not job_ids:
            return set()
        deadline = time.monotonic() + (2 * SLURM_CALL_TIMEOUT_SEC if timeout is None else timeout)

        def time_left() -> float:
            return min(SLURM_CALL_TIMEOUT_SEC, deadline - time.monotonic())

        out = _slurm_call(["scontrol", "--oneliner", "show", "step", allocation], time_left())
        if out is None:
            return set()
        wanted = {int(j) for j in job_ids}
        here = socket.gethostname().split(".")[0]
        steps: dict[str, tuple[int, int]] = {}
        for step_id, host, pid in parse_steps(out):
            if not step_id.startswith(f"{allocation}.") or host.split(".")[0] != here or pid <= 0:
                continue
            job_id = _balsam_job_of(pid)
            if job_id in wanted:
                steps[step_id] = (job_id, pid)
        if not steps:
            return set()
        name = signal.Signals(sig).name.removeprefix("SIG")
        done = _slurm_run(["scancel", f"--signal={name}", *steps], time_left())
        if done is None:
            return set()
        if done.returncode != 0:
            return _delivered_despite(done, steps)
        return {job_id for job_id, _pid in steps.values()}

    # -- serial mode ----------------------------------------------------------------------------
    def unbound_serial_worker_params(self) -> Optional[dict[str, str]]:
        # srun binds a task to its --cpus-per-task logical CPUs: the worker gets them all (those
        # of the allocation when it has part of the node: mpi_launch_args).
        return {"cpus-per-task": str(self.logical_cpus)}

    #: CPU ids are cores: a job at threads_per_core N needs 1/N of its threads in ids (task_cpu_ids and
    #: the binding add the siblings).
    cpu_ids_are_cores = True

    def task_cpu_ids(self, cpu_ids: Sequence[int], threads_per_core: int) -> tuple[int, ...]:
        # The CPU ids are cores 0..N-1; core c's second hardware thread is c + N (N = logical_cpus / 2).
        offset = self.logical_cpus // self.hardware_threads_per_core
        return tuple(hardware_thread_ids(cpu_ids, threads_per_core, offset,
                                         max_threads_per_core=self.hardware_threads_per_core))

    # -- site init ------------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, hostname: str, env: Mapping[str, str]) -> bool:
        # Login nodes are loginNN; NERSC sets NERSC_HOST. Which node type to use is the user's call.
        return env.get("NERSC_HOST") == "perlmutter" and cls.constraint == "gpu"

    def queues(self) -> dict[str, dict[str, int]]:
        return {
            "regular": {"max_nodes": 1536, "max_walltime": 720, "max_queued_jobs": 5000},
            "debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 5},
            **SHARED_QOS,
        }

    def settings_defaults(self) -> dict[str, Any]:
        return {
            "launcher": {
                "platform": self.name,
                "mpirun_allows_node_packing": True,
                # One serial-mode worker per node gets the whole node (it pins its own tasks).
                "serial_mode_startup_params": {"cpus-per-task": str(self.logical_cpus)},
            },
            "scheduler": {
                "name": "slurm",
                "options": {"queue_flag": "--qos"},
                "allowed_queues": self.queues(),
                # exclusive "": the Slurm driver's --exclusive stays, and a BatchJob of the shared
                # QOS (part of a node) turns it off with -x exclusive=no, accepted out of the box.
                # sbatch_flags: split and appended to sbatch by the Slurm driver (-x sbatch_flags="--mail-type=END").
                "optional_batch_job_params": self.batch_job_params(),
            },
        }

    def batch_job_params(self) -> dict[str, str]:
        """``scheduler.optional_batch_job_params`` of a new site. GPU nodes: ``gpus_per_node`` (sbatch
        ``--gpus-per-node``, the node's GPUs, as Balsam 0.7's template asked): an allocation that
        asks for no GPU holds them only implicitly (``--exclusive``), and Slurm gives a step that asks
        for none of them no GPU (real Slurm 22.05: ``CUDA_VISIBLE_DEVICES`` unset in the step, and a
        device cgroup denies them), so packed GPU jobs (whose steps ask for no GPU) and fractional
        ones ran without one; serial-mode workers ask for the node's GPUs (``--gpus-per-task 4``)
        and had them. Not ``--gres=gpu:4``: a single-rank step's ``--gres=craynetwork:0`` replaced
        it (no GPU again); ``--gpus-per-node`` reaches every step as ``SLURM_GPUS_PER_NODE``
        (docs/platforms/perlmutter.md has the table). ``-x exclusive=no -x gpus_per_node=1`` for a
        shared-QOS BatchJob; the Slurm driver leaves the key out of a BatchJob whose own flags ask
        for GPUs (``-x sbatch_flags=--gpus=1``). Sites made before this lack the key: the launcher
        warns (:meth:`discover_nodes`)."""
        params = {"constraint": self.constraint}
        if self.node_gpu_ids:
            params["gpus_per_node"] = str(len([g for g in self.node_gpu_ids.split(",") if g.strip()]))
        return {**params, "reservation": "", "exclusive": "", "sbatch_flags": ""}

    def job_template(self) -> Optional[str]:
        return resources.files(__package__).joinpath("job-template.sh").read_text().replace("@CONSTRAINT@", self.constraint)


class PerlmutterCPUPlatform(PerlmutterGPUPlatform):
    name = "perlmutter-cpu"
    description = "NERSC Perlmutter CPU nodes: 2 x 64 cores per node, Slurm (--qos), srun"
    constraint = "cpu"
    node_cpu_ids = "0-127"
    node_gpu_ids = ""
    logical_cpus = 256

    def queues(self) -> dict[str, dict[str, int]]:
        return {
            "regular": {"max_nodes": 3072, "max_walltime": 720, "max_queued_jobs": 5000},
            "debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 5},
            **SHARED_QOS,
        }
