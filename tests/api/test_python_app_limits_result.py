"""A run() whose return value serializes to more than the server takes: the runner reports it as a
raising run() (SerializeError with the size and the limit), so job.result() says why. It printed
the value, the server refused it, the job ended FAILED and result() raised only NoResult."""

from __future__ import annotations

import base64
import json
import shlex
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
    assert ran.returncode == 70, ran.stderr
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


def _job_words(command: str) -> tuple[list[str], list[str]]:
    """``(every argv word, the job chunks)`` of a runner line, as bash hands them to the runner."""
    words = shlex.split(command)
    n_app = int(words[4])  # python -m module app_id n_app app-chunks... job-chunks...
    return words, words[5 + n_app:]


def test_a_small_jobs_line_carries_its_raw_json_as_older_runners_read_it() -> None:
    """An older Balsam under the app's python_exe does ``json.loads`` on the joined job chunks:
    base64 for every job failed every run() job in that mix; raw JSON as before, while it fits."""
    _words, job_chunks = _job_words(python_runner_command(_app(), _job({"n": 3})))
    data = json.loads("".join(job_chunks))  # the older runner's reading
    assert data["id"] == 7 and data["workdir"] == "w"
    ran = _run(3)
    assert ran.returncode == 0, ran.stderr
    assert codec.deserialize(parse_run_markers(ran.stdout)[0]) == b"xxx"


def test_a_line_over_one_arguments_cap_carries_base64_words() -> None:
    command = python_runner_command(_app(), _job({"n": 3, "pad": "p'{$}" * 40_000}))
    words, job_chunks = _job_words(command)
    assert len(job_chunks) >= 2 and max(len(w.encode()) for w in words) < 131_072
    text = "".join(job_chunks)
    assert not text.startswith("{") and json.loads(base64.b64decode(text, validate=True))["id"] == 7
