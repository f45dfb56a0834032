"""``job.parameters`` changed in place is saved (6851a6a); what must not come with it:

- the python runner called ``run(**job.get_parameters())`` with the very dict the job keeps, so a
  run() that consumed its arguments and saved ``self.job`` (progress in ``data``) stored the
  consumed arguments (a re-run after a time-out started from them), and one that put something
  unpicklable in them had its save fail. run() now gets a decode of its own.
- a job whose parameters were only read was reported changed: the check wrote a second decode
  again, where a set of objects hashed by id iterates in another order.
- a hook (preprocess, postprocess, handle_timeout) changing ``self.job.parameters`` in place had
  the change dropped: the processing module sends what differs in ``serialized_parameters``.

Against the live server (SQLite and PostgreSQL); the runner runs as the launcher runs it."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest


class Token:
    """Hashed by id (the default): two decodes of a set of these iterate in different orders."""

    def __init__(self, v: int) -> None:
        self.v = v


@pytest.fixture
def site_name(bare_site: Any) -> str:
    return bare_site.name


def _run_runner(cls: type, job_id: int, cwd: Any) -> subprocess.CompletedProcess:
    from balsam._api.app import python_runner_command
    from balsam.api import Job

    cmd = python_runner_command(cls, Job.objects.get(id=job_id))
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(),
                          timeout=120)


def test_run_consuming_its_arguments_and_saving_keeps_the_stored_parameters(site_name: str, tmp_path: Any) -> None:
    from balsam._api.app import parse_run_markers
    from balsam.api import ApplicationDefinition, Job

    def run(self: Any, todo: dict) -> list:
        done = []
        while todo["left"]:
            done.append(todo["left"].pop(0))  # consumes the work list it was given
            todo["cache"] = (i for i in done)  # and keeps something unpicklable there
            self.job.data = {"done": list(done)}  # progress, for the driver
            self.job.save()
        return done

    walker = type("Walker", (ApplicationDefinition,), {"site": site_name, "run": run})
    walker.sync()
    job = walker.submit(workdir="w/0", todo={"left": [1, 2, 3]})
    ran = _run_runner(walker, job.id, tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    value, exc = parse_run_markers(ran.stdout)
    assert exc is None and value is not None, ran.stdout[-2000:]
    stored = Job.objects.get(id=job.id)
    assert stored.data == {"done": [1, 2, 3]}
    assert stored.parameters == {"todo": {"left": [1, 2, 3]}}  # a re-run starts from these


def test_run_changing_self_job_parameters_still_saves_them(site_name: str, tmp_path: Any) -> None:
    """What run() asks for through ``self.job.parameters`` is still saved: only its arguments are its own."""
    from balsam.api import ApplicationDefinition, Job

    def run(self: Any, n: int) -> int:
        self.job.parameters["n"] = n + 1
        self.job.save()
        return n

    bump = type("Bump", (ApplicationDefinition,), {"site": site_name, "run": run})
    bump.sync()
    job = bump.submit(workdir="w/1", n=1)
    ran = _run_runner(bump, job.id, tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert Job.objects.get(id=job.id).parameters == {"n": 2}


def test_parameters_only_read_are_not_changed(site_name: str) -> None:
    from balsam.api import ApplicationDefinition, Job

    app = type("Objs", (ApplicationDefinition,), {"site": site_name, "command_template": "echo {{ n }}"})
    app.sync()
    made = app.submit(workdir="w/2", n=1, objs={Token(i) for i in range(50)})
    job = Job.objects.get(id=made.id)
    stored = job.serialized_parameters
    assert len(job.parameters["objs"]) == 50  # read only
    assert job.dirty_fields == set()
    job.data = {"seen": 1}
    job.save()
    assert Job.objects.get(id=made.id).serialized_parameters == stored
    # A real change is still sent.
    job.parameters["n"] = 5
    assert job.dirty_fields == {"serialized_parameters"}
    job.save()
    assert Job.objects.get(id=made.id).parameters["n"] == 5


def _hook_update(cls: type, job: Any, state: str, tmp_path: Any) -> dict:
    from balsam.serialization import converter
    from balsam.site.hooks_runner import run_hook_on_job

    record = json.loads(json.dumps(converter.unstructure(job._record, type(job._record)), default=str))
    record["state"] = state
    return run_hook_on_job(cls, record, False, tmp_path / "data")


def test_a_hook_changing_parameters_in_place_sends_them(site_name: str, tmp_path: Any) -> None:
    from balsam._api import codec
    from balsam.api import ApplicationDefinition

    def preprocess(self: Any) -> None:
        self.job.parameters["n"] = 2
        self.job.state = "PREPROCESSED"

    hooked = type("Hooked", (ApplicationDefinition,), {"site": site_name, "command_template": "echo {{ n }}",
                                                      "preprocess": preprocess})
    hooked.sync()
    job = hooked.submit(workdir="w/3", n=1)
    update = _hook_update(hooked, job, "STAGED_IN", tmp_path)
    assert update["state"] == "PREPROCESSED"
    assert codec.deserialize(update["serialized_parameters"]) == {"n": 2}


def test_a_hook_reading_parameters_sends_none(site_name: str, tmp_path: Any) -> None:
    from balsam.api import ApplicationDefinition

    def preprocess(self: Any) -> None:
        assert len(self.job.parameters["objs"]) == 50
        self.job.state = "PREPROCESSED"

    reader = type("Reader", (ApplicationDefinition,), {"site": site_name, "command_template": "echo {{ n }}",
                                                      "preprocess": preprocess})
    reader.sync()
    job = reader.submit(workdir="w/4", n=1, objs={Token(i) for i in range(50)})
    update = _hook_update(reader, job, "STAGED_IN", tmp_path)
    assert update["state"] == "PREPROCESSED" and "serialized_parameters" not in update, update


def test_a_hook_putting_unpicklable_parameters_fails_the_job(site_name: str, tmp_path: Any) -> None:
    from balsam.api import ApplicationDefinition

    def preprocess(self: Any) -> None:
        self.job.parameters["gen"] = (i for i in range(3))
        self.job.state = "PREPROCESSED"

    bad = type("BadHook", (ApplicationDefinition,), {"site": site_name, "command_template": "echo {{ n }}",
                                                    "preprocess": preprocess})
    bad.sync()
    job = bad.submit(workdir="w/5", n=1)
    update = _hook_update(bad, job, "STAGED_IN", tmp_path)
    assert update["state"] == "FAILED", update
    assert "preprocess" in update["state_data"]["message"]
    assert "cannot store its parameters" in update["state_data"]["error"]
    assert "serialized_parameters" not in update
