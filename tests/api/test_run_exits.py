"""A ``run()`` that ends the process instead of returning or raising an Exception: ``sys.exit``
(a script ported to a run() app), KeyboardInterrupt. The real runner
(``python -m balsam._api.python_runner``, the command line a launcher runs) and ``Job.result_nowait``."""

from __future__ import annotations

import subprocess

import pytest

from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command


def _job(params: dict, **fields):
    """A Job record as a launcher gets it (not saved)."""
    from balsam.api import Job

    return Job._from_api({"id": 7, "workdir": "w", "app_id": 1, "serialized_parameters": codec.serialize(params),
                          **fields})


def _ending_app():
    from balsam.api import ApplicationDefinition

    class Ending(ApplicationDefinition):
        site = 1

        def run(self, how):
            import sys

            print("working")
            if how == "exit0":
                sys.exit(0)
            if how == "exit3":
                sys.exit(3)
            if how == "interrupt":
                raise KeyboardInterrupt
            raise ValueError("an ordinary failure")

    Ending.__app_id__ = 98
    return Ending


@pytest.mark.parametrize("how, returncode, exception", [
    # A KeyboardInterrupt ends Python by SIGINT (130 through bash): not 0, so RUN_ERROR.
    ("exit0", 0, None), ("exit3", 3, None), ("interrupt", 130, None), ("raise", 70, ValueError),
])
def test_only_an_exception_is_a_runs_result(how: str, returncode: int, exception: type | None) -> None:
    """As in Balsam 0.7, only an Exception is serialized as the run's result: a SystemExit (or a
    KeyboardInterrupt) ends the runner with its exit status and no marker. Serialized, it was
    re-raised by job.result() in the user's driver, past its ``except Exception``."""
    app = _ending_app()
    ran = subprocess.run(["/bin/bash", "-c", python_runner_command(app, _job({"how": how})) + "; exit $?"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == returncode and "working" in ran.stdout, ran.stderr
    value, exc = parse_run_markers(ran.stdout)
    assert value is None
    if exception is None:
        assert exc is None, codec.deserialize_exception(exc)
    else:
        assert isinstance(codec.deserialize_exception(exc), exception)


def test_result_nowait_never_raises_a_system_exit_an_earlier_runner_stored() -> None:
    """A job whose stored exception is a SystemExit (the runner used to serialize one): result()
    raises an Exception that names it, which the caller's ``except Exception`` catches."""
    try:
        raise SystemExit(0)
    except SystemExit as exc:
        stored = codec.serialize_exception(exc)
    job = _job({}, serialized_exception=stored, state="JOB_FINISHED")
    with pytest.raises(Exception, match="SystemExit") as raised:
        job.result_nowait()
    assert isinstance(raised.value, codec.RemoteException)
