"""Review of the Python API audit (Dec 7): what its fixes got wrong or left out.

- ``get()`` refused a None filter beside the query's real ones (``filter(app_id=X).get(id=None)``
  is 0.7's one job of app X), and said "None is no filter" for an unknown filter name.
- ``__getattr__`` on Query and Manager (for the Django-name hints) made type checkers take any
  attribute of them, and hid an AttributeError raised inside a property of theirs.
- The hints were the same for every model: ``Site.objects.last`` suggested an ordering Site
  refuses, ``exclude`` a ``state__ne`` filter Site and EventLog do not have.
- A pickled or deep-copied job lost the guard against in-place changes of ``parent_ids``.
- A wait's report logged a WARNING every 10 minutes of any long wait, saw a FAILED parent only
  (not a grandparent), and its read of ``parent_ids`` could break a save() in another thread.
- The missing-parameter warning fired for apps whose preprocess() may set them.
- ``job.transfers["f"] = "alias:/path"`` on a job not created yet broke bulk_create() with an
  AttributeError from the encoder.

Against the live server on SQLite where records are involved."""

from __future__ import annotations

import ast
import copy
import inspect
import logging
import pickle
import re
import textwrap
from typing import Any

import pytest


def _app(site: Any, name: str, **attrs: Any) -> Any:
    from balsam.api import ApplicationDefinition

    return type(name, (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ n }}", **attrs})


def test_get_with_none_beside_real_filters(site: Any) -> None:
    from balsam.api import Job

    app = _app(site, "NoneBeside")
    job = app.submit("w/0", n=1)
    assert Job.objects.filter(app_id=app).get(id=None).id == job.id  # 0.7: None is no filter
    assert Job.objects.filter(app_id=app).get(None).id == job.id
    with pytest.raises(ValueError, match=r"^Job\.objects\.get\(id=None\): a filter given as None is no filter"):
        Job.objects.filter(state=None).get(id=None)  # still no filter at all
    with pytest.raises(Job.DoesNotExist, match=r"^no Job matches app_id=\d+, state='FAILED'$"):
        Job.objects.filter(app_id=app, state="FAILED").get(id=None)
    # An unknown name is said first, None or not.
    with pytest.raises(TypeError, match=r"^Job\.objects\.filter\(\) got an unknown filter 'nosuch'"):
        Job.objects.get(nosuch=None)


def _getattr_guarded(cls: type) -> bool:
    """``cls.__getattr__`` is defined under ``if not TYPE_CHECKING:`` in its class body: a type
    checker skips that block, so an attribute missing from the class is still its error."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return False
        if (isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
                and isinstance(node.test.operand, ast.Name) and node.test.operand.id == "TYPE_CHECKING"):
            if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in node.body):
                return True
    return False


def test_getattr_is_hidden_from_type_checkers() -> None:
    from balsam._api.manager import Manager
    from balsam._api.query import Query
    from balsam.api import Job

    assert _getattr_guarded(Query) and _getattr_guarded(Manager)
    with pytest.raises(AttributeError, match=r"^Job query has no exists\(\)"):
        Job.objects.all().exists  # still there at run time
    with pytest.raises(AttributeError, match=r"^Job\.objects has no exists\(\)"):
        Job.objects.exists


def test_an_attribute_error_inside_a_property_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam._api.model import BalsamModel
    from balsam.api import Job

    def broken(cls: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'api_root' (inside the client's set-up)")

    monkeypatch.setattr(BalsamModel, "_get_client", classmethod(broken))
    with pytest.raises(AttributeError, match=r"^'NoneType' object has no attribute 'api_root' \(inside"):
        Job.objects._client


@pytest.mark.parametrize("model_name", ["Site", "App", "Job", "BatchJob", "Session", "TransferItem", "EventLog"])
def test_django_name_hints_fit_the_model(model_name: str) -> None:
    from balsam._api import models
    from balsam._api.query import NOT_QUERY_METHODS

    model = getattr(models, model_name)
    for name in sorted(NOT_QUERY_METHODS):
        for target in (model.objects, model.objects.all()):
            with pytest.raises(AttributeError) as info:
                getattr(target, name)
            text = str(info.value)
            assert "\n" not in text
            # Every ordering and filter a hint names is one this model takes.
            for field in set(re.findall(r"order_by\('-?(\w+)'\)", text)) - {"FIELD"}:
                assert field in model._orderings, (model_name, name, text)
            for field in re.findall(r"filter\((\w+)=", text):
                assert field in model._filters, (model_name, name, text)
            if not model._orderings:
                assert "order_by" not in text, (model_name, name, text)


def test_django_name_hints_of_site_and_eventlog() -> None:
    from balsam._api import models

    site_last = str(pytest.raises(AttributeError, getattr, models.Site.objects, "last").value)
    assert site_last.endswith("use list(query)[-1] (Site queries take no ordering: they come in id order)")
    # Review round 2: earliest said index 0 was "the highest id".
    for model in (models.Site, models.App, models.Session):  # TransferItem takes order_by("id") (transfer ls -n)
        label = model.__name__
        earliest = str(pytest.raises(AttributeError, getattr, model.objects, "earliest").value)
        latest = str(pytest.raises(AttributeError, getattr, model.objects.all(), "latest").value)
        assert earliest.endswith(f"use list(query)[0] for the lowest id ({label} queries take no ordering: they "
                                 "come in id order)"), earliest
        assert latest.endswith(f"use list(query)[-1] for the highest id ({label} queries take no ordering: they "
                               "come in id order)"), latest
    events_exclude = str(pytest.raises(AttributeError, getattr, models.EventLog.objects, "exclude").value)
    assert events_exclude.endswith("EventLog queries have no negated filter: iterate the query and skip records "
                                   "in Python")
    assert "delete" not in events_exclude.split(":")[0]  # EventLog records cannot be deleted


def test_copies_of_a_job_keep_the_in_place_guard(site: Any) -> None:
    from balsam.api import Job

    app = _app(site, "Copied")
    parent, other = app.submit("p/0", n=0), app.submit("p/1", n=1)
    child = Job.objects.get(id=app.submit("c/0", n=2, parent_ids={parent.id}).id)
    child.parent_ids.add(other.id)
    for copied in (pickle.loads(pickle.dumps(child)), copy.deepcopy(child), copy.copy(child)):
        copied.num_nodes = 2
        with pytest.raises(AttributeError, match=r"^Job\.parent_ids cannot be changed after creation: it was changed "
                                                 r"in place"):
            copied.save()
    assert Job.objects.get(id=child.id).num_nodes == 1
    fresh = pickle.loads(pickle.dumps(Job.objects.get(id=child.id)))  # read, not changed: saves
    fresh.num_nodes = 3
    fresh.save()
    assert Job.objects.get(id=child.id).num_nodes == 3


def test_wait_report_levels_and_failed_ancestors(site: Any, run_jobs: Any, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from balsam._api import models
    from balsam.api import Job

    monkeypatch.setattr(models, "WAIT_REPORT_INTERVAL_S", 0.0)
    app = _app(site, "Levels")
    caplog.set_level(logging.INFO, logger="balsam._api.models")
    plain = app.submit("plain", n=0)
    Job.objects.wait([plain], timeout=0.0)
    lines = [r for r in caplog.records if "still waiting" in r.getMessage()]
    assert lines and all(r.levelno == logging.INFO for r in lines), [(r.levelname, r.getMessage()) for r in lines]

    bad = app.submit("bad", n=1)
    run_jobs(site, [bad], fail=[bad.id])
    child = app.submit("child", n=2, parent_ids={bad.id})
    grandchild = app.submit("grandchild", n=3, parent_ids={child.id})
    caplog.clear()
    Job.objects.wait([grandchild], timeout=0.0)
    lines = [r for r in caplog.records if "still waiting" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING]
    assert (f"1 of them wait for a FAILED parent or earlier ancestor, which keeps them waiting until it is re-run "
            f"(`balsam job modify -i {bad.id} -s RESTART_READY`)") in lines[0].getMessage()
    assert "parent_ids" not in grandchild._snapshots  # the report took no snapshot (see the next test)


def test_save_while_another_thread_reads_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field read in another thread (a wait's report reads ``parent_ids``) adds its snapshot
    while save() walks the snapshots: "dictionary changed size during iteration". Here the read
    happens, deterministically, at the first fingerprint save() takes."""
    from balsam._api import model
    from balsam.api import Job

    raw = {"id": 1, "workdir": "w/1", "app_id": 1, "state": "STAGED_IN", "parent_ids": [5], "tags": {"a": "b"},
           "data": {"k": [1]}, "transfers": {}, "serialized_parameters": "", "last_update": "2026-01-01T00:00:00"}
    job = Job._from_api_many([raw])[0]
    job.tags, job.data  # noqa: B018 - snapshots taken
    real = model._fingerprint
    reads = []

    def fingerprint_with_a_read_beside(value: Any, tp: Any) -> Any:
        if not reads:
            reads.append("parent_ids")
            job.parent_ids  # noqa: B018 - "another thread": a new snapshot mid-iteration
        return real(value, tp)

    monkeypatch.setattr(model, "_fingerprint", fingerprint_with_a_read_beside)
    job.data["k"].append(2)
    assert job._update_payload() == {"data": {"k": [1, 2]}}
    assert reads


def test_no_missing_parameter_warning_for_an_app_with_preprocess(site: Any, caplog: pytest.LogCaptureFixture) -> None:
    def preprocess(self: Any) -> None:
        self.job.parameters = {"n": 1}
        self.job.state = "PREPROCESSED"

    caplog.set_level(logging.WARNING, logger="balsam._api.app")
    _app(site, "Fills", preprocess=preprocess).submit("w/0", save=False)
    assert not caplog.records
    _app(site, "DoesNotFill").submit("w/1", save=False)
    assert [r.getMessage() for r in caplog.records] == [
        "DoesNotFill.submit(): required parameters ['n'] not given: the job fails when it is launched unless its "
        "preprocess() sets them"]


def test_transfers_set_in_place_before_creation(site: Any) -> None:
    from balsam.api import Job, TransferItem

    slots = {"inp": {"required": False, "direction": "in", "local_path": "in.txt"},
             "out": {"required": False, "direction": "out", "local_path": "out.txt"}}
    app = _app(site, "Mover", transfers=slots)
    jobs = [app.submit(f"t/{i}", n=i, save=False) for i in range(3)]
    jobs[0].transfers["inp"] = "laptop:/data/in.txt"
    jobs[1].transfers["out"] = {"location_alias": "laptop", "path": "/data/out.txt"}
    jobs[2].transfers = {"inp": "laptop:/data/2.txt"}  # assigned, as the constructor takes them
    made = Job.objects.bulk_create(jobs)
    items = {(i.job_id, i.direction.value): str(i.remote_path) for i in TransferItem.objects.filter(
        job_id=[j.id for j in made])}
    assert items == {(made[0].id, "in"): "/data/in.txt", (made[1].id, "out"): "/data/out.txt",
                     (made[2].id, "in"): "/data/2.txt"}
    single = app.submit("t/single", n=9, save=False)
    single.transfers["inp"] = "laptop:/data/single.txt"
    single.save()
    assert [str(i.remote_path) for i in TransferItem.objects.filter(job_id=single.id)] == ["/data/single.txt"]

    bad = app.submit("t/bad", n=1, save=False)
    bad.transfers["inp"] = "no-colon"
    before = Job.objects.count()
    with pytest.raises(ValueError, match=r"^Job\(workdir='t/bad'\): transfer inp='no-colon': expected "
                                         r"'location_alias:/absolute/path'$"):
        Job.objects.bulk_create([app.submit("t/ok", n=2, save=False), bad])
    assert Job.objects.count() == before  # refused before any request


def test_a_wait_report_on_many_chains_reads_a_bounded_number_of_ancestors(site: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Review round 2: a report walked the ancestors of every AWAITING_PARENTS job (12,500 leaves of
    8-deep chains: ~200 GETs, ~100,000 rows per report, inside the poll loop). It now walks those of
    a turn of them (the next ones at each report) and reads a bounded number of ancestor ids,
    saying so. Scaled down (60 chains of 4, 10 ids a GET); requests counted, not timed."""
    from balsam._api import models
    from balsam._api.query import Query
    from balsam.api import Job

    monkeypatch.setattr(Query, "filter_chunk_size", 10)
    monkeypatch.setattr(models, "WAIT_REPORT_INTERVAL_S", 0.0)
    monkeypatch.setattr(models, "WAIT_REPORT_ANCESTOR_JOBS", 10)
    monkeypatch.setattr(models, "WAIT_REPORT_ANCESTOR_IDS", 30)
    app = _app(site, "Chains")
    generation = Job.objects.bulk_create([app.submit(f"g0/{i}", n=i, save=False) for i in range(60)])
    roots = generation
    for depth in range(1, 4):
        generation = Job.objects.bulk_create([app.submit(f"g{depth}/{i}", n=i, save=False, parent_ids={parent.id})
                                              for i, parent in enumerate(generation)])
    leaves = sorted(Job.objects.filter(id=[job.id for job in generation]), key=lambda job: job.id)
    assert {job.state.value for job in leaves} == {"AWAITING_PARENTS"}
    Job.objects.filter(id=[roots[0].id, roots[15].id]).update(state="FAILED")

    client = Job._get_client()
    lines: list[tuple[int, str]] = []
    monkeypatch.setattr(models.logger, "log", lambda level, msg, *args: lines.append((level, msg % args)))
    report = models._WaitReport(Job.objects, len(leaves))
    gets = []
    for _ in range(2):  # leaves 0-9, then 10-19 (chain 15's root FAILED)
        before = client.request_counts["GET /jobs/"]
        report(leaves)
        gets.append(client.request_counts["GET /jobs/"] - before)
    # 30 ids a report: one GET per generation of the 10 leaves' chains, not 18 for all 60.
    assert gets == [3, 3]
    for (level, line), root in zip(lines, (roots[0], roots[15])):
        assert level == logging.WARNING
        assert line.endswith(f"1 of them wait for a FAILED parent or earlier ancestor, which keeps them waiting "
                             f"until it is re-run (`balsam job modify -i {root.id} -s RESTART_READY`) (ancestors of "
                             f"10 of the 60 AWAITING_PARENTS jobs checked)"), line
    lines.clear()
    report(leaves)  # leaves 20-29: no FAILED root among theirs
    assert len(lines) == 1 and lines[0][0] == logging.INFO
    assert lines[0][1].endswith("no FAILED ancestor found (ancestors of 10 of the 60 AWAITING_PARENTS jobs checked)")
    # Fewer ids than their ancestors: the report reads that many and says so.
    monkeypatch.setattr(models, "WAIT_REPORT_ANCESTOR_IDS", 25)
    lines.clear()
    before = client.request_counts["GET /jobs/"]
    report(leaves)
    assert client.request_counts["GET /jobs/"] - before == 3
    assert lines[0][1].endswith("(ancestors of 10 of the 60 AWAITING_PARENTS jobs checked, up to 25 ancestors)")
