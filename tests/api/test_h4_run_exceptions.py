"""What job.result() raises for a run() that failed: the exception as run() raised it (its chain
too), whatever its size or depth, and which job it came from; for a job that FAILED without a
result, the reason its events give.

The runner used to lose the exception of a run() that hit a RecursionError (tblib's recursive
traceback conversion failed in the runner's except clause: no marker) or whose message quoted a
large value (the payload was over the server's limit: refused), and the exception a run() raised
``from`` another (whose cause is often the real error); ``Job.NoResult`` of a FAILED job said only
"has no result"."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import traceback
from typing import Any

import dill
import pytest
from tblib import Traceback

from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command
from balsam.models import MAX_SERIALIZED_PAYLOAD_CHARS


def _job(params: dict, **fields: Any) -> Any:
    from balsam.api import Job

    return Job._from_api({"id": 7, "workdir": "runs/7", "app_id": 1, "serialized_parameters": codec.serialize(params),
                          **fields})


def _app() -> Any:
    from balsam.api import ApplicationDefinition

    class Failing(ApplicationDefinition):
        site = 1

        def run(self, how):
            if how == "recursion":
                def deeper(n):
                    return deeper(n + 1)
                return deeper(0)
            if how == "huge message":
                raise ValueError("v" * 600_000)
            try:
                {}["missing_key"]
            except KeyError as exc:
                raise RuntimeError("simulation failed") from exc

    Failing.__app_id__ = 96
    return Failing


def _run_exception(how: str) -> str:
    ran = subprocess.run(python_runner_command(_app(), _job({"how": how})), shell=True, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 70, ran.stderr[-2000:]
    value, exc = parse_run_markers(ran.stdout)
    assert value is None and exc is not None, ran.stderr[-2000:]
    return exc


def test_a_recursion_error_in_run_is_reported_with_a_bounded_traceback() -> None:
    payload = _run_exception("recursion")
    with pytest.raises(RecursionError) as raised:
        _job({}, serialized_exception=payload, state="FAILED").result_nowait()
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert "deeper" in {f.name for f in frames}
    assert len(frames) <= codec.TRACEBACK_MAX_FRAMES + 2  # + this test's frames


def test_an_exception_too_long_for_the_server_keeps_its_type_and_a_shortened_message() -> None:
    payload = _run_exception("huge message")
    assert len(payload) <= MAX_SERIALIZED_PAYLOAD_CHARS  # what the server stores
    with pytest.raises(ValueError) as raised:
        _job({}, serialized_exception=payload, state="FAILED").result_nowait()
    assert re.fullmatch(r"v{2000} \.\.\. \[596,000 characters cut\] \.\.\. v{2000}", str(raised.value))
    assert "run" in {f.name for f in traceback.extract_tb(raised.value.__traceback__)}


def test_the_cause_of_a_run_exception_comes_back_with_it() -> None:
    payload = _run_exception("chain")
    with pytest.raises(RuntimeError, match="simulation failed") as raised:
        _job({}, serialized_exception=payload, state="FAILED").result_nowait()
    cause = raised.value.__cause__
    assert isinstance(cause, KeyError) and cause.args == ("missing_key",)
    assert "The above exception was the direct cause" in "".join(traceback.format_exception(raised.value))


def test_an_exception_raised_while_handling_another_keeps_that_context() -> None:
    try:
        try:
            1 / 0
        except ZeroDivisionError:
            raise ValueError("while handling")
    except ValueError as exc:
        payload = codec.serialize_exception(exc, MAX_SERIALIZED_PAYLOAD_CHARS)
    back = codec.deserialize_exception(payload)
    assert isinstance(back, ValueError) and isinstance(back.__context__, ZeroDivisionError)
    assert back.__cause__ is None


def test_a_balsam_07_exception_payload_is_raised_as_its_exception() -> None:
    """Balsam 0.7's runner stored ``dill((exception, tblib.Traceback))``: it read back as a
    RemoteException whose message was the tuple's repr."""
    try:
        {}["k7"]
    except KeyError as exc:
        payload = base64.b64encode(dill.dumps((exc, Traceback(exc.__traceback__)), recurse=True)).decode()
    with pytest.raises(KeyError, match="k7") as raised:
        _job({}, serialized_exception=payload, state="FAILED").result_nowait()
    assert raised.value.__traceback__ is not None
    assert "test_a_balsam_07_exception_payload_is_raised_as_its_exception" in {
        f.name for f in traceback.extract_tb(raised.value.__traceback__)}
    no_traceback = base64.b64encode(dill.dumps((KeyError("k8"), None), recurse=True)).decode()
    assert isinstance(codec.deserialize_exception(no_traceback), KeyError)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes are Python 3.11+")
def test_a_reraised_run_exception_names_its_job() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        payload = codec.serialize_exception(exc)
    job = _job({}, serialized_exception=payload, state="FAILED")
    with pytest.raises(RuntimeError) as raised:
        job.result_nowait()
    assert str(raised.value) == "boom"  # the note is shown under the traceback, not in the message
    assert raised.value.__notes__ == [
        "raised by run() of Job(id=7, workdir='runs/7'); its output is job.out in that workdir (`balsam job show 7`)"]


def test_result_of_a_job_failed_without_a_result_gives_the_reason(site: Any) -> None:
    """A run() app whose class cannot load on the site never runs: the agent sets FAILED with the
    reason in the event. result() said only "Job(id=..) in state FAILED has no result"."""
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class NeverLoads(ApplicationDefinition):
        site = site_name

        def run(self, x):
            return x

    job = NeverLoads.submit(workdir="never/1", x=1)
    job.state = "FAILED"
    job.state_data = {"message": "An exception occurred while loading the app",
                      "error": "cannot load App(id=5, name=NeverLoads): its code needs module 'h4_missing'"}
    job.save()
    reader = Job.objects.get(id=job.id)
    client = Job._get_client()
    before = sum(client.request_counts.values())
    with pytest.raises(Job.NoResult) as nowait:
        reader.result_nowait()
    assert sum(client.request_counts.values()) == before  # no request: callers loop over many jobs
    assert str(nowait.value).startswith(f"Job(id={job.id}, workdir='never/1') in state FAILED has no result")
    assert f"balsam job show {job.id}" in str(nowait.value)
    with pytest.raises(Job.NoResult, match="its code needs module 'h4_missing'") as waited:
        reader.result(timeout=5)
    assert isinstance(waited.value, ValueError)  # as in Balsam 0.7
    pending = NeverLoads.submit(workdir="never/2", x=2)
    with pytest.raises(Job.NoResult, match=r"in state STAGED_IN has no result yet$"):
        pending.result_nowait()


def test_a_result_this_python_cannot_load_names_its_job_and_the_missing_module(tmp_path: Any) -> None:
    """A run() returning an object of a module the compute node has and the driver lacks (a torch
    tensor ...): result() said only "cannot deserialize payload: ModuleNotFoundError: ...", without
    the job, in a loop over hundreds of results."""
    module = tmp_path / "h4_node_only.py"
    module.write_text("class Tensor:\n    def __init__(self, v):\n        self.v = v\n")
    made = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import h4_node_only; "
         "from balsam._api import codec; print(codec.serialize(h4_node_only.Tensor(3)))", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True)
    payload = made.stdout.strip()
    job = _job({}, serialized_return_value=payload, state="JOB_FINISHED")
    with pytest.raises(codec.DeserializeError) as raised:
        job.result_nowait()
    assert str(raised.value).startswith("Job(id=7, workdir='runs/7'): cannot read the return value of run() here:")
    assert "No module named 'h4_node_only'" in str(raised.value)
    listed = _job({}, serialized_parameters=payload)
    with pytest.raises(codec.DeserializeError, match=r"^Job\(id=7, workdir='runs/7'\): cannot read its parameters"):
        listed.get_parameters()
