"""A job read by several threads while one of them polls it (DeepHyper's pattern): ``wait()`` leaves
every polled job unstructured (lazy) at each poll, so a field read in one thread and the record
built in another (repr, ==, save(), setting a field) meet at every poll.

Each test puts the other thread's work exactly where a thread switch would put it, through a hook
at that point, so the interleaving is the same at every run."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from balsam._api import model as model_module
from balsam._api.model import BalsamModel


def _evaluate_app(site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    site_name = site.name

    class Evaluate(ApplicationDefinition):
        site = site_name

        def run(self, x):
            return x

    return Evaluate


def _in_thread(target: Any) -> threading.Thread:
    errors: list = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_a_field_read_meets_the_record_built_by_another_thread(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Field.__get__ found the record unbuilt; before _lazy_value read it, another thread built it
    (repr of the job in a log line): the read failed with an AssertionError."""
    from balsam.api import Job

    job = _evaluate_app(site).submit(workdir="eval/0", x=1, tags={"step": "1"})
    Job.objects.wait([job], timeout=0)  # a poll: the job is left unstructured
    assert job._rec is None and job._raw is not None
    real = BalsamModel._lazy_value
    switched = []

    def switch_then_read(self: Any, fld: Any) -> Any:
        if not switched:  # the thread switch, once: another thread builds the whole record
            switched.append(fld.name)
            other = _in_thread(lambda: repr(job))
            other.join()
            assert other.errors == []  # type: ignore[attr-defined]
        return real(self, fld)

    monkeypatch.setattr(BalsamModel, "_lazy_value", switch_then_read)
    state = job.state
    assert switched == ["state"] and job._rec is not None
    assert state == Job.objects.get(id=job.id).state
    assert job.workdir.as_posix() == "eval/0" and job.tags == {"step": "1"}


def test_a_mutable_field_read_while_another_thread_builds_the_record_is_the_records(
        site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread structured ``tags`` from the JSON while another built the record from the same JSON:
    the reader got one dict, the record kept another, and an in-place change through the
    reader's dict was lost at save()."""
    from balsam.api import Job

    job = _evaluate_app(site).submit(workdir="eval/1", x=1, tags={"step": "1"})
    fresh = Job.objects.get(id=job.id)  # an unstructured record, as a poll leaves it
    assert fresh._rec is None

    class SwitchingJSON(dict):
        """The record's JSON: reading ``tags`` from it is where the thread switch happens."""

        builder: Any = None

        def get(self, key: Any, default: Any = None) -> Any:
            if key == "tags" and self.builder is None:
                # Another thread builds the whole record (``job == other``, save(), a log line).
                # It runs to its end, unless it has to wait for this read to finish (the lock that
                # fixes the race, held here by this thread): then it is joined after the read.
                type(self).builder = _in_thread(lambda: fresh._record)
                lock = getattr(model_module, "_LAZY_LOCK", None)
                if lock is None or not lock._is_owned():
                    self.builder.join()
            return super().get(key, default)

    fresh._raw = SwitchingJSON(fresh._raw.items())
    tags = fresh.tags  # read lazily while the record is being built
    SwitchingJSON.builder.join()
    assert SwitchingJSON.builder.errors == []
    assert fresh._rec is not None
    assert fresh._rec.tags is tags  # one dict: the record's
    tags["step"] = "2"  # an in-place change through the dict read, as scripts do
    fresh.save()
    assert Job.objects.get(id=job.id).tags == {"step": "2"}
