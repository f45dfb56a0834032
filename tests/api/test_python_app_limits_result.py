"""A run() whose return value serializes to more than the server takes: the runner reports it as a
raising run() (SerializeError with the size and the limit), so job.result() says why. It printed
the value, the server refused it, the job ended FAILED and result() raised only NoResult."""

from __future__ import annotations

import subprocess

import pytest

from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command
from balsam.models import MAX_SERIALIZED_PAYLOAD_CHARS


def _job(params: dict, **fields):
    from balsam.api import Job

    return Job._from_api({"id": 7, "workdir": "w", "app_id": 1, "serialized_parameters": codec.serialize(params),
                          **fields})


def _app():
    from balsam.api import ApplicationDefinition

    class Sized(ApplicationDefinition):
        site = 1

        def run(self, n):
            return b"x" * n

    Sized.__app_id__ = 98
    return Sized


def _run(n: int) -> subprocess.CompletedProcess:
    return subprocess.run(python_runner_command(_app(), _job({"n": n})), shell=True, capture_output=True, text=True,
                          timeout=120)


def test_a_return_value_over_the_servers_limit_is_a_clear_exception() -> None:
    ran = _run(400_000)  # ~533,000 characters serialized (dill + base64)
    assert ran.returncode == 1, ran.stderr
    value, exc = parse_run_markers(ran.stdout)
    assert value is None and exc is not None, ran.stdout[-500:]
    error = codec.deserialize_exception(exc)
    assert isinstance(error, codec.SerializeError)
    assert "serializes to 533," in str(error) and f"the limit is {MAX_SERIALIZED_PAYLOAD_CHARS:,}" in str(error), error
    assert len(exc) < 10_000  # the exception itself is what the server then stores
    with pytest.raises(codec.SerializeError, match="the limit is 512,000"):
        _job({}, serialized_exception=exc, state="FAILED").result_nowait()


def test_a_return_value_under_the_limit_is_returned() -> None:
    ran = _run(350_000)
    value, exc = parse_run_markers(ran.stdout)
    assert exc is None and ran.returncode == 0, ran.stderr
    assert len(value) <= MAX_SERIALIZED_PAYLOAD_CHARS and codec.deserialize(value) == b"x" * 350_000
