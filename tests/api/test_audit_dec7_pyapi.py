"""Python API audit (Dec 7): three faults a user of the 0.7 API met.

- ``Site.objects.get(path=<a site's exact path>)`` raised MultipleObjectsReturned when another
  site's path starts with it (``/proj/site`` and ``/proj/site2``): the ``path`` filter is a
  substring (as in 0.7), and ``get()`` did not prefer the site whose path is the value.
- A run() job whose app did not load on the node said ``cannot load App(id=7, name=7)``: the
  runner gave the app's id as its name, the payload's own name unread.
- Django query methods (``exclude``, ``exists``, ``values_list``...), which Balsam queries do not
  have, raised Python's bare AttributeError; ``order_by("state", "-id")`` Python's argument count.
  Each now says what to use instead, in one line.

Against the live server on SQLite and PostgreSQL where records are involved."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path
from typing import Any

import pytest


def test_site_get_by_exact_path_with_a_sibling_site(env: Any, tmp_path: Path) -> None:
    from balsam.api import Site

    first = Site.objects.create(name=f"s-{tmp_path.name[-12:]}-a", path=str(tmp_path / "proj" / "site"))
    second = Site.objects.create(name=f"s-{tmp_path.name[-12:]}-b", path=str(tmp_path / "proj" / "site2"))
    assert Site.objects.get(path=str(tmp_path / "proj" / "site")).id == first.id
    assert Site.objects.get(path=tmp_path / "proj" / "site2").id == second.id  # a Path, as 0.7 took
    assert Site.objects.filter(path=str(tmp_path / "proj" / "site")).get().id == first.id
    # A fragment of both paths names neither exactly: still an error, as in 0.7.
    with pytest.raises(Site.MultipleObjectsReturned, match="2 Site records match"):
        Site.objects.get(path=str(tmp_path / "proj"))
    # filter() keeps 0.7's substring match.
    assert Site.objects.filter(path=str(tmp_path / "proj" / "site")).count() == 2


def test_runner_error_names_the_app_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam._api import codec, python_runner

    # An app serialized by another Python version: the runner cannot load it.
    envelope = {codec.APP_ENVELOPE_KEY: 1, "python": "2.7", "name": "Simulation", "class": b""}
    payload = base64.b64encode(pickle.dumps(envelope, protocol=4)).decode()
    job = json.dumps({"id": 3, "app_id": 7, "workdir": "w/3"})
    with pytest.raises(codec.DeserializeError) as info:
        python_runner.load(["7", "1", payload, job])
    assert "App(id=7, name=Simulation)" in str(info.value)


@pytest.mark.parametrize("method, hint", [
    ("exclude", r"use filter\(state__ne=STATE\) to leave out a state \(the only negated filter\)"),
    ("exists", r"use bool\(query\) or query\.count\(\)"),
    ("values_list", r"iterate the query and read the fields \(job\.id, job\.state\)"),
    ("last", r"use order_by\('-id'\)\.first\(\)"),
])
def test_django_query_methods_say_what_to_use(balsam_env: Any, method: str, hint: str) -> None:
    from balsam.api import Job

    with pytest.raises(AttributeError, match=rf"^Job query has no {method}\(\) .*: {hint}$") as info:
        getattr(Job.objects.filter(state="RUNNING"), method)
    assert "\n" not in str(info.value)
    with pytest.raises(AttributeError, match=rf"^Job\.objects has no {method}\(\) .*: {hint}$"):
        getattr(Job.objects, method)
    # Other missing names: Python's own error; hasattr() stays False for the Django ones.
    with pytest.raises(AttributeError, match=r"^'Query' object has no attribute 'nosuch'$"):
        Job.objects.all().nosuch
    assert not hasattr(Job.objects.all(), method)
    with pytest.raises(TypeError, match=r"order_by\(\) takes one field name, got 2 \('state', '-id'\)"):
        Job.objects.order_by("state", "-id")
    with pytest.raises(TypeError, match=r"order_by\(\) takes one field name, got 2"):
        Job.objects.all().order_by("state", "-id")


def test_wait_on_a_child_of_a_failed_parent_says_so(bare_site: Any, run_jobs: Any, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """``job.result()`` / ``wait()`` / ``as_completed()`` without a timeout on a job that waits for a
    FAILED parent polled for ever and said nothing. A line is now logged every
    ``WAIT_REPORT_INTERVAL_S`` (made 0 here: at every poll) naming what the jobs wait for, and the
    FAILED parents holding them (one bulk read of the parents at each line)."""
    import concurrent.futures
    import logging

    from balsam._api import models
    from balsam.api import ApplicationDefinition, Job

    monkeypatch.setattr(models, "WAIT_REPORT_INTERVAL_S", 0.0, raising=False)
    app = type("Dag", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo {{ n }}"})
    ok, bad = app.submit("p/ok", n=1), app.submit("p/bad", n=2)
    run_jobs(bare_site, [ok, bad], fail=[bad.id])
    child = app.submit("c/1", n=3, parent_ids={ok.id, bad.id})
    other = app.submit("c/2", n=4)
    assert child.state.value == "AWAITING_PARENTS"

    caplog.set_level(logging.WARNING, logger="balsam._api.models")
    done, not_done = Job.objects.wait([child, other], timeout=0.2, poll_interval=0.05)
    assert not done and len(not_done) == 2
    lines = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "2 of 2 jobs" in lines[0] and "1 AWAITING_PARENTS" in lines[0] and "1 STAGED_IN" in lines[0]
    assert (f"1 of them wait for a FAILED parent, which keeps them waiting until it is re-run "
            f"(`balsam job modify -i {bad.id} -s RESTART_READY`)") in lines[0]
    assert "\n" not in lines[0]

    caplog.clear()
    with pytest.raises(concurrent.futures.TimeoutError):
        child.result(timeout=0.2)
    assert any(f"-i {bad.id} -s RESTART_READY" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with pytest.raises(concurrent.futures.TimeoutError):
        list(Job.objects.as_completed([child], timeout=0.2, poll_interval=0.05))
    assert any("still waiting" in r.getMessage() and "FAILED parent" in r.getMessage() for r in caplog.records)


def test_submit_without_a_required_parameter_warns_once(bare_site: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A job submitted without a required app parameter was created silently and failed only when
    a launcher rendered it ("missing required parameters"), maybe hours later in a queue. It is
    still created (0.7 did; a preprocess() hook may set them), and submit() warns once per app."""
    import logging

    from balsam.api import ApplicationDefinition

    shell = type("Needs", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo {{ x }} {{ y }}",
                                                     "parameters": {"y": {"required": False, "default": 2}}})

    def run(self: Any, a: int, b: int = 2) -> int:
        return a + b

    py = type("NeedsPy", (ApplicationDefinition,), {"site": bare_site.name, "run": run})
    caplog.set_level(logging.WARNING, logger="balsam._api.app")
    shell.submit("w/0", y=1)
    shell.submit("w/1")
    job = py.submit("w/2", b=3)
    assert job.id is not None and job.get_parameters() == {"b": 3}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Needs.submit(): required parameters ['x'] not given: the job fails when it is launched unless its "
        "preprocess() sets them",
        "NeedsPy.submit(): required parameters ['a'] not given: the job fails when it is launched unless its "
        "preprocess() sets them",
    ]
    caplog.clear()
    shell.submit("w/3", x=1)
    py.submit("w/4", a=1)
    assert not caplog.records


def test_unserializable_parameter_is_named() -> None:
    """``submit(n=1, stream=<generator>)`` said "cannot serialize dict: TypeError: cannot pickle
    'generator' object", naming no parameter; the error now names it (no request is sent)."""
    from balsam._api.codec import SerializeError
    from balsam.api import Job

    with pytest.raises(SerializeError, match=r"^Job parameter 'stream' cannot be serialized: cannot serialize "
                                             r"generator: TypeError: cannot pickle 'generator' object$"):
        Job(workdir="w/0", app_id=1, parameters={"n": 1, "stream": (x for x in range(3))})
    job = Job(workdir="w/1", app_id=1, parameters={"n": 1})
    with pytest.raises(SerializeError, match=r"^Job parameter 'stream' cannot be serialized"):
        job.set_parameters({"stream": (x for x in range(3))})
    assert job.get_parameters() == {"n": 1}


def test_get_with_every_filter_none_is_refused(bare_site: Any) -> None:
    """``Job.objects.get(id=job_id)`` with ``job_id`` None returned the site's only job (a filter
    given as None is no filter, as in 0.7): a silent wrong answer. Refused, in one line, when the
    query has no other filter; a None beside a real filter is still no filter (0.7's optional
    filters), in get() as in a filter() before it."""
    from balsam.api import ApplicationDefinition, Job

    app = type("One", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo {{ n }}"})
    job = app.submit("w/0", n=1)
    with pytest.raises(ValueError, match=r"^Job\.objects\.get\(id=None\): a filter given as None is no filter, so "
                                         r"this would return any one record: pass a value \(or get\(\) with no "
                                         r"filter for that\)$"):
        Job.objects.get(id=None)
    # Beside the query's real filters, a None is no filter, as in 0.7: the one job of the app.
    assert Job.objects.filter(app_id=app).get(None, tags=None).id == job.id
    with pytest.raises(ValueError, match=r"^Job\.objects\.get\(tags=None, id=None\)"):
        Job.objects.filter(state=None).get(None, tags=None)
    assert Job.objects.get(id=job.id, tags=None).id == job.id
    assert Job.objects.get().id == job.id


def test_in_place_change_of_a_fixed_field_is_not_dropped_silently(bare_site: Any) -> None:
    """``job.parent_ids.add(7); job.save()`` sent the job's other changes and dropped that one with
    no word (``job.parent_ids = {7}`` raises; in-place changes of updatable fields are sent). It
    now raises as the assignment does, in save() and bulk_update(), before any request."""
    from balsam.api import ApplicationDefinition, Job

    app = type("Fixed", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo {{ n }}"})
    parent, other = app.submit("p/0", n=0), app.submit("p/1", n=1)
    child = app.submit("c/0", n=2, parent_ids={parent.id})
    child = Job.objects.get(id=child.id)
    child.parent_ids.add(other.id)
    child.num_nodes = 2
    message = (r"^Job\.parent_ids cannot be changed after creation: it was changed in place, and save\(\) cannot "
               r"store that \(refresh_from_db\(\) restores the stored value\)$")
    with pytest.raises(AttributeError, match=message):
        child.save()
    with pytest.raises(AttributeError, match=message):
        Job.objects.bulk_update([child])
    stored = Job.objects.get(id=child.id)
    assert stored.parent_ids == {parent.id} and stored.num_nodes == 1
    child.refresh_from_db()
    child.num_nodes = 2
    child.save()
    assert Job.objects.get(id=child.id).num_nodes == 2
