"""Runs a run() app for one job: ``python -m balsam._api.python_runner <app_id> <n> <app chunks> <job chunks>``.

The launcher builds this command with :func:`balsam._api.app.python_runner_command`; for an app
whose ``python_exe`` is not the launcher's own Python it is ``python -c '<RUNNER_BOOTSTRAP>' <app_id>
...``, a program that runs this module as ``-m`` does (see below). The runner
rebuilds the app class and the job, calls ``run(**parameters)`` and prints on stdout (``job.out``)
``BALSAM-RETURN-VALUE <b64>`` or ``BALSAM-EXCEPTION <b64>`` (rank 0 only under MPI; the exception
in Balsam 0.7's format for an app a 0.7 client synced: see :func:`serialize_exception`); an exception
ends the process with :data:`RAISED_EXIT` (70) after its traceback (RUN_ERROR). A ``SystemExit`` (or another
``BaseException`` that is not an ``Exception``) prints no marker: the exit status tells. A return
value that cannot be serialized, or that serializes to more than the server takes
(``MAX_SERIALIZED_PAYLOAD_CHARS``), is reported as a raising run() (``SerializeError`` saying why). The
processing module reads the markers from job.out with :func:`balsam.site.hooks_runner.read_run_markers`
(the scanner of :mod:`balsam._api.run_markers`; :func:`balsam._api.app.parse_run_markers` runs it over a text).

A runner that cannot set up in the app's ``python_exe`` (a venv or container without dill, tblib or
attrs; another Python minor version than the one that synced the app) prints ONE line on stderr,
``balsam: the run() app cannot run in <interpreter> (Python X.Y.Z): <reason>``, and exits
:data:`CANNOT_RUN_EXIT` (78), with no marker (:func:`cannot_run`). A Python without Balsam at all
(or an older Balsam without this module, such as 0.7, whose runner is
``balsam.site.launcher.python_runner``; or Python 2) never reaches this module: the ``-c`` program
(:data:`balsam._api.app.RUNNER_BOOTSTRAP`) prints the same kind of line, with the reason ``module
'balsam' is not installed there``, ``its Balsam has no module 'balsam._api.python_runner' (an older
Balsam, such as 0.7); install the current Balsam into it`` or ``Balsam needs Python 3``, and exits
78 too (with ``-m``, Python's own "No module named 'balsam'" and exit 1). The program runs this
module as ``-m`` does (``runpy._run_module_as_main``: ``__main__`` and ``sys.argv[0]`` are this
module's to the end, ``sys.path[0]`` the directory it started in).

Neither exit is 1, what Python gives an uncaught exception: 1 is one of serial mode's quick-failure
codes (:data:`balsam.launcher.runner.RETRY_CODES`, Balsam 0.7's), which relaunch a task that exits
with it within 20 s up to 3 times. That rule is for launch hiccups (an MPI or file-system start-up);
an exception the app raised, recorded in job.out, or an interpreter that cannot run the app, comes
back the same on every run: a raising run() ran 4 times (4x its cost, and a first part with side
effects done 4 times), and its RUN_ERROR came after 4 runs (11.1 s median against 2.8 s in a
DeepHyper-style search).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import platform
import sys
from typing import Any, NoReturn

#: The runner's exit status once the app raised (rank 0's exception recorded as the exception marker
#: on stdout; under MPI another rank's shows only in its traceback on stderr and in this status,
#: while rank 0 may have recorded a return value): sysexits' EX_SOFTWARE. Outside the quick-failure codes (see
#: the module docstring), so it is reported at once, never relaunched; ``job.result()`` reads the
#: marker, whatever the status.
RAISED_EXIT = 70
#: The runner's exit status when it cannot set up in this interpreter (:func:`cannot_run`): sysexits'
#: EX_CONFIG (the app's ``python_exe`` is the thing to change). Not relaunched either.
CANNOT_RUN_EXIT = 78


#: The variables that hold this process's MPI rank, first found first (a copy of
#: :data:`balsam._api.app.RANK_VARIABLES`: this module reads them before it can import that one).
#: ``PALS_RANKID``: Aurora's and Polaris' mpiexec and Perlmutter's srun (Slurm's cray_shasta MPI
#: plugin) set no other; every rank printed the cannot-run line, and a result marker.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "ALPS_APP_PE", "PALS_RANKID")


def mpi_rank() -> int:
    if "mpi4py.MPI" in sys.modules:
        try:
            return int(sys.modules["mpi4py.MPI"].COMM_WORLD.Get_rank())
        except Exception:  # noqa: BLE001 - MPI not initialised: treat as a single process
            return 0
    for var in RANK_VARIABLES:
        value = os.environ.get(var)
        if value is not None and value.strip().isdecimal():
            return int(value)
    # srun --mpi=none sets only SLURM_PROCID. It is this process's rank only in the task srun
    # started (SLURM_TASK_PID, which slurmstepd sets to the task's pid; an srun line's wrappers
    # exec): a task of a serial-mode worker that srun started inherited SLURM_PROCID=k (serial mode
    # now drops the step's variables from its tasks; an older launcher, or a task started some other
    # way under a step, may still pass them), and would print no result marker.
    # (SLURM_NTASKS > 1 does not tell them apart: the workers' step has one task per node.) A
    # wrapper that forks instead of exec'ing leaves every task rank 0: one marker each, as before.
    value = os.environ.get("SLURM_PROCID")
    if value is not None and value.strip().isdecimal() and os.environ.get("SLURM_TASK_PID") == str(os.getpid()):
        return int(value)
    return 0


def interpreter() -> str:
    """This interpreter as an error line names it: the app's ``python_exe`` (a venv's, a
    container's) is often not the Python that runs Balsam."""
    return f"{sys.executable or sys.argv[0]} (Python {platform.python_version()})"


def cannot_run(reason: str) -> NoReturn:
    """End the runner with one line on stderr (job.out, and the job's error tail) and status
    :data:`CANNOT_RUN_EXIT`: the job cannot run in this interpreter (its set-up, not the app,
    failed; a relaunch fails the same way). A traceback of
    Balsam's own frames filled job.out and the job's error event (the last lines of job.out)
    ahead of the reason, and the reason did not say which interpreter it was."""
    if mpi_rank() == 0:  # one line, not one per rank
        sys.stderr.write(f"balsam: the run() app cannot run in {interpreter()}: {reason}\n")
        sys.stderr.flush()
    raise SystemExit(CANNOT_RUN_EXIT)


def missing_module_reason(exc: ImportError) -> str:
    """Why the runner's imports failed, in one line: a module that is not there at all
    (ModuleNotFoundError), or one that is there but cannot be used ("cannot import name 'X' from
    'Y'": too old; a broken or foreign build), with Python's own words, which name what is missing.
    Both read "not installed there" before, and the name that was missing went unsaid."""
    needs = ("the python runner needs Balsam with its dependencies (dill, tblib, attrs, cattrs, orjson...) in the "
             "app's python_exe: install them into it, or set python_exe to a Python that has them")
    if isinstance(exc, ModuleNotFoundError):
        return f"module {exc.name or str(exc)!r} is not installed there; {needs}"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    what = f"module {exc.name!r} there cannot be used" if exc.name else "an import failed there"
    return f"{what} (too old, or a broken build): {text}; {needs.replace('install them', 'install current ones')}"


try:
    from ..models import MAX_SERIALIZED_PAYLOAD_CHARS
    from . import codec
    from .app import EXCEPTION_MARKER, RETURN_MARKER, ApplicationDefinition
except ImportError as _exc:
    if __name__ != "__main__":
        raise
    cannot_run(missing_module_reason(_exc))


def _emit(marker: str, payload: str) -> None:
    if mpi_rank() == 0:
        sys.stdout.write(f"\n{marker} {payload}\n")
        sys.stdout.flush()


def serialize_exception(cls: type, exc: BaseException) -> str:
    """The exception marker's payload: in Balsam 0.7's format for an app a 0.7 client synced (its
    class payload is not our envelope), whose ``job.result()`` reads nothing else (our envelope made
    it raise "too many values to unpack"); in ours, which keeps the exception chain, for our apps
    (which a 0.7 client cannot load anyway). Our client reads both."""
    if codec.app_payload_python_version(getattr(cls, "_serialized_class", "") or "") is None:
        return codec.serialize_exception_07(exc, MAX_SERIALIZED_PAYLOAD_CHARS)
    return codec.serialize_exception(exc, MAX_SERIALIZED_PAYLOAD_CHARS)


def load(argv: list[str]) -> tuple[type[ApplicationDefinition], Any]:
    if len(argv) < 4:
        raise SystemExit("usage: python -m balsam._api.python_runner APP_ID N_APP_CHUNKS APP_CHUNK... JOB_CHUNK...")
    app_id = int(argv[0])
    n_app = int(argv[1])
    app_payload = "".join(argv[2 : 2 + n_app])
    job_text = "".join(argv[2 + n_app :])
    # The base64 of the JSON (python_runner_command), or the JSON itself (a line built before).
    job_data = json.loads(job_text if job_text.startswith("{") else base64.b64decode(job_text, validate=True))
    # dill first: a Python without it is the runner's want, not a module the app's code needs
    # (deserialize_app_class words a missing module so); main() says which.
    codec.warm_up()
    # No name given: the payload's own (the job's JSON has the app's id only, which named it "1" here).
    cls = codec.deserialize_app_class(app_payload, app_id=app_id)
    if not (isinstance(cls, type) and issubclass(cls, ApplicationDefinition)):
        raise SystemExit(f"app {app_id} does not hold an ApplicationDefinition")
    cls.__app_id__ = app_id
    cls._serialized_class = app_payload
    from .models import Job

    return cls, Job._from_api(job_data)


def _other_version_reason(argv: list[str]) -> "str | None":
    """Why an app synced from another Python minor version cannot run here, or None. The codec's
    advice ("or re-sync the app from Python 3.12") does not hold for a runner: the launcher loaded
    the app (to build this command line) in the Python that synced it, so only python_exe can change."""
    try:
        payload = "".join(argv[2 : 2 + int(argv[1])])
        envelope = pickle.loads(base64.b64decode(payload))  # the envelope: builtins only, any version reads it
        version = str(envelope["python"])
        label = f"App(id={int(argv[0])}, name={envelope['name']})"
    except Exception:  # noqa: BLE001 - not our envelope (a 0.7 payload): the codec's own words
        return None
    if version == codec.PYTHON_VERSION:
        return None
    return (f"{label} was synced from Python {version}, and dill cannot load its code in Python "
            f"{codec.PYTHON_VERSION}: set the app's python_exe to a Python {version} that has Balsam (the "
            f"launcher, which loads the app as well, runs Python {version})")


def main(argv: "list[str] | None" = None) -> int:
    try:
        cls, job = load(list(sys.argv[1:] if argv is None else argv))
    except ImportError as exc:  # dill, or the job model's own imports (cattrs ...)
        cannot_run(missing_module_reason(exc))
    except codec.DeserializeError as exc:
        # Another Python minor version than the one that synced the app, a module the app's code
        # needs: the reason in one line, with the interpreter it happened in.
        cannot_run(_other_version_reason(argv if argv is not None else sys.argv[1:]) or str(exc))
    app = cls(job)
    try:
        # A decode of its own, not the dict the job keeps: a run() that consumes its arguments and
        # saves self.job (progress in data) would store the consumed ones (a re-run after a
        # time-out started from them), or fail the save on something unpicklable it put there.
        result = app.run(**job._decode_parameters())  # type: ignore[misc]
    except Exception as exc:
        # Only an Exception is the job's result, as in Balsam 0.7. SystemExit (a ported script's
        # sys.exit), KeyboardInterrupt ... end the process with their exit status and no marker:
        # re-raised by job.result() in the user's driver, a SystemExit slipped past its
        # ``except Exception`` and ended it. With no marker, result() raises Job.NoResult.
        _emit(EXCEPTION_MARKER, serialize_exception(cls, exc))
        raise
    try:
        payload = codec.serialize(result)
    except Exception as exc:
        # A return value dill cannot pickle (a generator, an open file, a lock...): reported like a
        # raising run(), so job.result() raises an error that names the type (without this the
        # runner died outside the try above with no marker, and result() said only "has no result").
        error = codec.SerializeError(f"the return value of run() cannot be serialized: {exc}")
        _emit(EXCEPTION_MARKER, serialize_exception(cls, error))
        raise error from None
    if len(payload) > MAX_SERIALIZED_PAYLOAD_CHARS:
        # The server refuses a result this long: the job ended FAILED and result() said only "has
        # no result". Reported like a raising run(), the reason reaches result().
        error = codec.SerializeError(
            f"the return value of run() serializes to {len(payload):,} characters; the limit is "
            f"{MAX_SERIALIZED_PAYLOAD_CHARS:,}")
        _emit(EXCEPTION_MARKER, serialize_exception(cls, error))
        raise error
    _emit(RETURN_MARKER, payload)
    return 0


def run_main() -> NoReturn:
    """:func:`main`, its exit status the process's. An Exception out of it (the app's, recorded by
    its marker; a return value that cannot be reported, recorded the same way) is printed as an
    uncaught one is (``sys.excepthook``: the job's error tail stays the traceback) and ends the
    process with :data:`RAISED_EXIT`, not 1. A BaseException that is no Exception (the app's
    ``sys.exit(n)``, a KeyboardInterrupt, :func:`cannot_run`) ends it as it always did."""
    try:
        code = main()
    except Exception:
        sys.excepthook(*sys.exc_info())
        sys.stderr.flush()
        code = RAISED_EXIT
    sys.exit(code)


if __name__ == "__main__":
    run_main()
