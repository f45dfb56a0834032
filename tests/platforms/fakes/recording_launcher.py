"""A recording stand-in for a machine's MPI launcher (PALS ``mpiexec``, ``srun``, ``aprun``, Open MPI
``mpirun``), put first on ``PATH`` by the platform tests.

It parses the command line the way the real launcher does (its options, then the program and its
arguments; an option it does not know is refused with exit status 2, as the real ones do), appends
one JSON line ``{"launcher", "argv", "options", "ranks", "program", "env", "caller_env", "cwd"}`` to
``$FAKE_LAUNCH_LOG``, then runs the ranks on this host with the real MPICH ``mpiexec``
(``$FAKE_REAL_MPIEXEC``), each rank with the rank variables the real launcher sets
(``PALS_RANKID``/``PALS_LOCAL_RANKID``, ``SLURM_PROCID``/``SLURM_LOCALID``, ``ALPS_APP_PE``,
``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_LOCAL_RANK``), so mpi4py programs (the serial-mode
workers) really communicate.

The ranks get the environment the real launcher gives them (:func:`rank_environment`): PALS
``mpiexec`` passes its own environment (``--envall``, its default; ``--envnone``: none; ``--envlist
A,B``: those) and then sets each ``--env NAME=value``, later ones winning; ``srun --export`` (``ALL``
by default, ``NONE``, or ``[ALL,]NAME[=value],...``: without ``ALL`` only the names listed), ``aprun
-e NAME=value`` and Open MPI ``mpirun -x NAME=value`` likewise. ``env`` in the record is what the
ranks got, ``caller_env`` the launcher's own environment (both only the variables platforms set,
:data:`RECORDED_PREFIXES`).

Usage (from a wrapper script): ``python recording_launcher.py FLAVOUR ARGS...``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys

#: flavour -> (options that take a value, options that take none).
FLAVOURS: dict[str, tuple[set[str], set[str]]] = {
    "mpiexec": (
        {"-n", "-np", "--np", "--ppn", "-ppn", "--hosts", "-hosts", "--hostfile", "--cpu-bind", "-d", "--depth",
         "--env", "--envlist", "--mem-bind", "--gpu-bind", "--label-format", "--spindle"},
        {"--envall", "--envnone", "--no-transfer", "--label", "--line-buffer", "-l", "--exclusive", "--verbose"},
    ),
    "srun": (
        {"-n", "--ntasks", "--ntasks-per-node", "--gpus-per-task", "--gpus", "-G", "--nodelist", "-w", "--nodes", "-N",
         "--cpus-per-task", "-c", "--gres", "--cpu-bind", "--gpu-bind", "--constraint", "-C", "--qos", "-q",
         "--export", "--mem", "--distribution", "-m", "--time", "-t", "--job-name", "-J", "--reservation"},
        {"--overlap", "--exclusive", "--label", "-l", "--unbuffered", "-u", "--exact"},
    ),
    "aprun": (
        {"-n", "-N", "-L", "-cc", "-d", "-j", "-e", "-S", "-r", "-p"},
        {"-b", "-q"},
    ),
    "mpirun": (
        {"-hostfile", "--hostfile", "-n", "-np", "-npernode", "--npernode", "-x", "--host", "-H", "--bind-to",
         "--map-by", "-mca", "--mca"},
        {"--oversubscribe", "--allow-run-as-root", "--report-bindings", "--tag-output"},
    ),
}

#: Rank variables each real launcher gives its ranks: (global rank, local rank).
RANK_VARIABLES = {
    "mpiexec": ("PALS_RANKID", "PALS_LOCAL_RANKID"),
    "srun": ("SLURM_PROCID", "SLURM_LOCALID"),
    "aprun": ("ALPS_APP_PE", "ALPS_APP_LOCAL_PE"),
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
}

#: Environment variables recorded (the ones platforms set for jobs).
RECORDED_PREFIXES = ("ZE_", "CUDA_", "OMP_", "BALSAM_JOB_ID", "NVIDIA_", "HIP_", "ROCR_")


def parse(flavour: str, argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(option, value), ...], program argv)``; SystemExit(2) on an unknown option."""
    with_value, without = FLAVOURS[flavour]
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-"):
            break
        name, eq, inline = word.partition("=")
        if name in with_value:
            if eq:
                options.append((name, inline))
                i += 1
            else:
                if i + 1 >= len(argv):
                    sys.exit(f"{flavour}: option {name} needs a value")
                options.append((name, argv[i + 1]))
                i += 2
        elif word in without:
            options.append((word, ""))
            i += 1
        else:
            sys.stderr.write(f"{flavour}: unrecognized option '{word}'\n")
            sys.exit(2)
    program = argv[i:]
    if not program:
        sys.exit(f"{flavour}: no program to run")
    return options, program


def total_ranks(flavour: str, options: list[tuple[str, str]]) -> int:
    values = dict(options)
    for key in ("-n", "-np", "--np", "--ntasks"):
        if key in values:
            return int(values[key])
    return 1


#: Kept for the ranks when the launcher passes none of its environment (``--envnone``, ``srun
#: --export=NONE``): a compute node gives its processes a PATH and HOME of its own, and programs here
#: are found only on this one.
NODE_DEFAULTS = ("PATH", "HOME")


def _assignment(flavour: str, option: str, text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        sys.exit(f"{flavour}: {option} {text!r}: expected NAME=value")
    return name, value


def rank_environment(flavour: str, options: list[tuple[str, str]], environ: dict[str, str]) -> dict[str, str]:
    """The environment the real launcher gives its ranks, from its own ``environ`` and ``options``."""
    if flavour == "mpiexec":  # PALS: --envall (the default) | --envnone | --envlist, then every --env
        names = [name for name, _ in options]
        if "--envnone" in names or "--envlist" in names:
            listed = {n for name, value in options if name == "--envlist" for n in value.split(",") if n}
            base = {k: v for k, v in environ.items() if k in listed or k in NODE_DEFAULTS}
        else:
            base = dict(environ)
        base.update(_assignment(flavour, name, value) for name, value in options if name == "--env")
        return base
    if flavour == "srun":  # --export=ALL (default) | NONE | [ALL,]NAME[=value],...
        exports = [value for name, value in options if name == "--export"]
        if not exports:
            return dict(environ)
        items = [item for item in exports[-1].split(",") if item]
        if "NONE" in items:
            return {k: v for k, v in environ.items() if k in NODE_DEFAULTS or k.startswith("SLURM_")}
        if "ALL" in items:
            base = dict(environ)
        else:  # only the listed names (and Slurm's own variables) reach the tasks
            base = {k: v for k, v in environ.items() if k in NODE_DEFAULTS or k.startswith("SLURM_")}
        for item in items:
            if item == "ALL":
                continue
            name, eq, value = item.partition("=")
            if eq:
                base[name] = value
            elif name in environ:
                base[name] = environ[name]
        return base
    base = dict(environ)  # aprun and mpirun pass their environment
    setter = {"aprun": "-e", "mpirun": "-x"}[flavour]
    for name, value in options:
        if name == setter and "=" in value:  # mpirun -x NAME (no value) forwards NAME: here already
            base.update([_assignment(flavour, name, value)])
    return base


def main() -> int:
    flavour, argv = sys.argv[1], sys.argv[2:]
    options, program = parse(flavour, argv)
    ranks = total_ranks(flavour, options)
    caller = dict(os.environ)
    # The fake's own variables reach the ranks however the options filter the environment (the
    # real launcher needs none of them), and the batch system's node list never does: MPICH's
    # hydra, which runs the ranks here (fork, this host), would take it for its own.
    fake = {k: v for k, v in caller.items() if k.startswith("FAKE_")}
    rank_env = {k: v for k, v in rank_environment(flavour, options, caller).items()
                if not k.startswith(("PBS_", "SLURM_", "COBALT_"))}
    rank_env.update(fake)
    record = {
        "launcher": flavour,
        "argv": argv,
        "options": options,
        "ranks": ranks,
        "program": program,
        "env": {k: v for k, v in rank_env.items() if k.startswith(RECORDED_PREFIXES)},
        "caller_env": {k: v for k, v in caller.items() if k.startswith(RECORDED_PREFIXES)},
        "cwd": os.getcwd(),
    }
    log = os.environ.get("FAKE_LAUNCH_LOG")
    if log:
        with open(log, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
    real = os.environ["FAKE_REAL_MPIEXEC"]
    global_var, local_var = RANK_VARIABLES[flavour]
    shim = f'export {global_var}="$PMI_RANK" {local_var}="$MPI_LOCALRANKID"; exec "$@"'
    # PMI_RANK/MPI_LOCALRANKID (hydra's) become the launcher's own names.
    os.execve(real, [real, "-launcher", "fork", "-n", str(ranks), "/bin/bash", "-c", shim, "rank", *program],
              rank_env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
