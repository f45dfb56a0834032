"""A pool broken by a hook timeout's kill: the hooks the kill ended in its other workers are queued
again in chunks (not suspects), also when the pool's chunks are harvested in two cycles, or when
the hung hook's result arrives as its worker is killed.

The pool the module broke itself was found anew at each harvest, from the tasks running then (a
task whose running job had timed out). It was lost once the hung job's chunk had been harvested
(the pool fails its futures one by one, each waking the module: the others come a cycle later) or
once the hung hook's result had been read (its job no longer "timed out"): the other workers' hooks
then went the way of an unexplained death, "run again, each alone" (one at a time in the isolation
worker). The module now records the pool when it kills the worker, until the pool's last task is
harvested.

Real server and site (the module's client); the pool and its futures are stand-ins.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process
import json
import logging
from typing import Any

import attrs
import pytest

from balsam.site.modules.processing import ProcessingModule, _HookTask

TIMEOUT = 100.0
NOT_A_PID = 4_000_000_123  # the stand-in pool has no processes: nothing is killed


@pytest.fixture
def mod(make_site: Any, client: Any) -> Any:
    site = make_site()
    config = attrs.evolve(site.settings.processing, num_workers=2, hook_timeout_sec=TIMEOUT)
    m = ProcessingModule(site, config, client)
    yield m
    m.backlog.clear(); m.pending.clear(); m.tasks.clear(); m.results_files.clear(); m.alone.clear()
    m.close()


class FakePool:
    """A broken pool whose workers are gone."""

    _processes: dict = {}


def _broke(future: cf.Future) -> None:
    future.set_exception(cf.process.BrokenProcessPool("A process in the process pool was terminated abruptly"))


def _two_chunks(mod: Any, tmp_path: Any) -> tuple[dict, dict, cf.Future, cf.Future]:
    """Two chunks of one pool, in two workers: H's hook (to hang) and J's, both started."""
    pool = FakePool()
    hung = {"id": 10**9 + 1, "state": "STAGED_IN", "app_id": 1, "workdir": "t/h"}
    other = {"id": 10**9 + 2, "state": "STAGED_IN", "app_id": 1, "workdir": "t/j"}
    fh, fj = cf.Future(), cf.Future()
    for fut, job, name in ((fh, hung, "h"), (fj, other, "j")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"start": job["id"], "pid": NOT_A_PID}) + "\n")
        mod.pending[fut] = [job]
        mod.results_files[fut] = path
        since = 0.0 if job is hung else TIMEOUT  # J's hook started long after H's
        mod.tasks[fut] = _HookTask(pool, running=job["id"], pid=NOT_A_PID, since=since)  # type: ignore[arg-type]
    mod.clock = lambda: 0.0
    return hung, other, fh, fj


def _time_out(mod: Any, hung: dict) -> None:
    """H's hook runs past the timeout: the module kills its worker (_watch_hooks)."""
    mod.clock = lambda: TIMEOUT + 1.0
    mod._watch_hooks()
    assert hung["id"] in mod.timed_out


def _requeued_not_alone(mod: Any, job: dict) -> None:
    assert job["id"] not in mod.alone, "the job the module's own kill ended is run alone, as a suspect"
    assert job in mod.backlog


def test_chunks_harvested_in_two_cycles(mod: Any, tmp_path: Any, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="balsam.site.modules.processing")
    hung, other, fh, fj = _two_chunks(mod, tmp_path)
    _time_out(mod, hung)
    _broke(fh)
    updates = mod._harvest()  # the hung job's chunk first: FAILED with the reason
    assert [(u["id"], u["state"]) for u in updates] == [(hung["id"], "FAILED")]
    _broke(fj)
    mod._harvest()  # the other worker's chunk, a cycle later
    _requeued_not_alone(mod, other)
    assert not any("each alone" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert getattr(mod, "timeout_pools", {}) == {}, "forgotten with the pool's last task"


def test_the_hung_hooks_result_arrives_as_its_worker_is_killed(mod: Any, tmp_path: Any) -> None:
    hung, other, fh, fj = _two_chunks(mod, tmp_path)
    _time_out(mod, hung)
    # the hook returned just as its worker was killed: its result is in the results file
    with open(mod.results_files[fh], "a") as f:
        f.write(json.dumps({"id": hung["id"], "state": "PREPROCESSED"}) + "\n")
    _broke(fh); _broke(fj)
    updates = mod._harvest()
    assert [(u["id"], u["state"]) for u in updates] == [(hung["id"], "PREPROCESSED")]  # kept, not FAILED
    _requeued_not_alone(mod, other)


def test_the_same_cycle_as_before(mod: Any, tmp_path: Any) -> None:
    """(Kept as it was: the hung chunk and the other harvested together.)"""
    hung, other, fh, fj = _two_chunks(mod, tmp_path)
    _time_out(mod, hung)
    _broke(fh); _broke(fj)
    mod._harvest()
    _requeued_not_alone(mod, other)


def test_an_unexplained_death_still_runs_the_running_hooks_alone(mod: Any, tmp_path: Any) -> None:
    """(Kept: no timeout, no kill of ours: the hooks running at the death are suspects.)"""
    hung, other, fh, fj = _two_chunks(mod, tmp_path)
    _broke(fh); _broke(fj)
    mod._harvest()
    assert {hung["id"], other["id"]} <= mod.alone
