"""A run() whose return value cannot be serialized (a generator): the runner reports it as a raising
run() does, so job.result() raises an error naming the type. It used to die outside its try with no
marker: result() said only "has no result"."""

from __future__ import annotations

import subprocess

import pytest

from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command


def _job(params: dict, **fields):
    from balsam.api import Job

    return Job._from_api({"id": 7, "workdir": "w", "app_id": 1, "serialized_parameters": codec.serialize(params),
                          **fields})


def _app():
    from balsam.api import ApplicationDefinition

    class Lazy(ApplicationDefinition):
        site = 1

        def run(self, how):
            print("working")
            if how == "generator":
                return (i for i in range(3))
            raise ValueError("an ordinary failure")

    Lazy.__app_id__ = 97
    return Lazy


def _run(how: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", "-c", python_runner_command(_app(), _job({"how": how})) + "; exit $?"],
                          capture_output=True, text=True, timeout=120)


def test_a_return_value_that_cannot_be_serialized_is_reported_as_a_clear_exception() -> None:
    ran = _run("generator")
    raising = _run("raise")
    assert ran.returncode == raising.returncode == 70, ran.stderr  # the exit of a raising run()
    assert "working" in ran.stdout
    value, exc = parse_run_markers(ran.stdout)
    assert value is None and exc is not None, ran.stdout
    error = codec.deserialize_exception(exc)
    assert isinstance(error, codec.SerializeError) and "generator" in str(error) and "run()" in str(error)
    assert "cannot be serialized" in ran.stderr
    job = _job({}, serialized_exception=exc, state="FAILED")
    with pytest.raises(codec.SerializeError, match="generator"):
        job.result_nowait()
