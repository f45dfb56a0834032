"""A hook worker's death (a hook that calls ``os._exit``, a hook timeout's kill) breaks the whole
pool: only the hooks that were running then are suspects.

Every job of every chunk in the broken pool without a result went to the isolation worker, one job
at a time: the chunks still waiting in the pool (whose hooks had not started) and, after a hook
timeout, the hooks the kill ended in the other workers, though the module knows which hook it
killed. With 4 workers one hung hook sent ~128 jobs there (an audit of 2,000 jobs with 0.1-1 s
hooks: 8 chunks of up to 16 jobs per timeout, run one by one). Now those go back to their app's
queue and run in chunks; the hooks running at an unexplained death still run alone, so only the
job that kills its worker fails.

Also: a broken pool's chunks may be harvested in two cycles (the pool fails its futures one by one,
each waking the module); the later chunk's harvest killed the workers of the module's *new* pool.

Real server, real hook workers; the hook timeout is driven by an injected clock.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import time
from pathlib import Path

import attrs
import pytest

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows, process_until

TIMEOUT = 100.0
CHUNK = 16  # processing.WORKER_CHUNK (spelled out: the tests also run against older code)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(site_id: int):
    """Each hook appends its workdir name to ``../ran.txt``; ``data["hang"]``: writes its pid to
    ``pid`` and sleeps for an hour; ``data["exit"]``: ends its worker process (``os._exit``)."""
    from balsam.api import ApplicationDefinition

    class Dies(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def preprocess(self):
            import os
            import time

            with open("../ran.txt", "a") as log:
                log.write(os.path.basename(os.getcwd()) + "\n")
            if self.job.data.get("hang"):
                with open("pid", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(3600)
            if self.job.data.get("exit"):
                os._exit(3)
            self.job.state = "PREPROCESSED"

    Dies.sync()
    return Dies


@pytest.fixture
def module(make_site, client, monkeypatch):
    """A processing module with one hook worker (two chunks in its pool at once) and a fake clock."""
    from balsam.site.modules import processing as processing_module

    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 0.5)
    site = make_site()
    config = attrs.evolve(site.settings.processing, num_workers=1, hook_timeout_sec=TIMEOUT)
    mod = ProcessingModule(site, config, client)
    mod.clock = FakeClock()
    yield site, mod
    mod.close()


def _alone_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "each alone" in r.getMessage()]


def _ran(site) -> list[str]:
    path = Path(site.data_path) / "t/ran.txt"
    return sorted(path.read_text().split(), key=int) if path.exists() else []


def test_a_hook_timeout_runs_no_other_job_alone(module, client, caplog) -> None:
    """40 jobs, one worker: the first chunk runs, the second waits in the pool, the third in the
    module's queue. The first job's hook hangs and times out: the 31 other jobs of the pool's two
    chunks, none of whose hooks had started, are queued again (they all ran alone, one by one)."""
    from balsam.api import Job

    site, mod = module
    app = _app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"t/{i}", app, data={"hang": i == 0}) for i in range(40)])
    ids = [j.id for j in jobs]
    process_until(mod, lambda: ids[0] in mod.hooks_running() and (Path(site.data_path) / "t/0/pid").exists(),
                  "the hung hook running")
    pid = int((Path(site.data_path) / "t/0/pid").read_text())
    try:
        caplog.set_level(logging.WARNING, logger="balsam.site.modules.processing")
        mod.clock.now += TIMEOUT * 1.1

        def settled() -> bool:
            return {r["id"]: r["state"] for r in job_rows(client, id=ids)} == \
                {i: "FAILED" if i == ids[0] else "PREPROCESSED" for i in ids}

        process_until(mod, lambda: settled() and not mod.pending, "the hung job FAILED, the others PREPROCESSED")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert _alone_warnings(caplog) == [], _alone_warnings(caplog)
    queued_again = [r.getMessage() for r in caplog.records if "are queued again" in r.getMessage()]
    assert len(queued_again) == 2, queued_again  # the hung job's chunk and the chunk waiting behind it
    assert _ran(site) == [str(i) for i in range(40)], "each hook ran once"
    assert mod.alone == set() and mod.requeued == set()


def test_after_a_worker_death_only_the_hooks_running_then_run_alone(module, client, caplog) -> None:
    """Job 2's hook ends its worker. Jobs 0 and 1 had completed (kept), jobs 3 to 31 had not started
    (the rest of its chunk, the chunk waiting in the pool): queued again, run once each in chunks.
    Job 2 alone runs alone, ends its worker again, and FAILS."""
    from balsam.api import Job

    site, mod = module
    app = _app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"t/{i}", app, data={"exit": i == 2}) for i in range(2 * CHUNK)])
    ids = [j.id for j in jobs]
    caplog.set_level(logging.WARNING, logger="balsam.site.modules.processing")

    def settled() -> bool:
        return {r["id"]: r["state"] for r in job_rows(client, id=ids)} == \
            {i: "FAILED" if i == ids[2] else "PREPROCESSED" for i in ids}

    process_until(mod, lambda: settled() and not mod.pending, "job 2 FAILED, the others PREPROCESSED")
    alone = _alone_warnings(caplog)
    assert len(alone) == 1 and f"jobs [{ids[2]}] are run again, each alone" in alone[0], alone
    ran = _ran(site)
    assert ran.count("2") == 2, "the job that ends its worker: once in its chunk, once alone"
    assert sorted(set(ran), key=int) == [str(i) for i in range(2 * CHUNK)] and len(ran) == 2 * CHUNK + 1, ran


def test_a_chunk_of_a_broken_pool_harvested_late_leaves_the_new_pool_alone(module) -> None:
    """The module already replaced the broken pool (its first chunk harvested, its jobs queued to a
    new one); the broken pool's other chunk is harvested a cycle later: the new pool's workers, and
    the hooks they run, are not touched."""
    from balsam.site.modules.processing import _HookTask

    _site, mod = module
    new_pool = mod._pool()
    running = new_pool.submit(time.sleep, 30)
    deadline = time.monotonic() + 60
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = list(new_pool._processes.values())
    assert workers and running.running()

    class BrokenPool:  # the old pool, its workers gone
        _processes: dict = {}

    late: cf.Future = cf.Future()
    late.set_exception(cf.process.BrokenProcessPool("A process in the process pool was terminated abruptly"))
    job = {"id": 10**9, "state": "STAGED_IN", "app_id": 1, "workdir": "t/x"}
    mod.pending[late] = [job]
    mod.results_files[late] = None
    mod.tasks[late] = _HookTask(BrokenPool())  # type: ignore[arg-type]
    try:
        mod._harvest()
        assert all(w.is_alive() for w in workers), "the new pool's workers were killed"
        assert mod.pool is new_pool and not running.done()
        assert job in mod.backlog  # its job runs again
    finally:
        mod.backlog = [j for j in mod.backlog if j is not job]
        mod.alone.discard(job["id"])
        for w in workers:
            w.kill()
