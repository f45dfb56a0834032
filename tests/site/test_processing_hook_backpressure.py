"""Hook jobs waiting for the processing module's workers hold back no other job (a real API server).

The module leased ``prefetch_depth`` jobs at most, and counted the hook jobs handed to the worker
pool against it until their hooks returned: once ``prefetch_depth`` jobs of an app with a slow (or
hung) hook were leased, nothing else was acquired, also the jobs whose app keeps the default hook
(a RUN_TIMEOUT's RESTART_READY, which needs no worker) and the hook jobs of other apps, which
waited behind every chunk of the first app in the pool. Now only ``TASKS_PER_WORKER`` chunks per
worker are in the pool, the other hook jobs wait in a queue per app (the apps take turns), and
when hook jobs take all of ``prefetch_depth`` each cycle still acquires a bounded number, up to
``max_held`` jobs in all.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows, process_until


def _waiting_app(site_id: int, name: str):
    """Postprocess appends the job's workdir name to ``../ran.txt`` (each hook run, counted), then,
    unless ``data["wait"]`` is false, waits for ``../release`` (the test creates it at its end)."""
    from balsam.api import ApplicationDefinition

    def postprocess(self):
        import os
        import time

        with open("../ran.txt", "a") as log:
            log.write(os.path.basename(os.getcwd()) + "\n")
        if self.job.data.get("wait", True):
            deadline = time.monotonic() + 600  # a broken test leaves no worker waiting for ever
            while not os.path.exists("../release") and time.monotonic() < deadline:
                time.sleep(0.05)
        self.job.state = "POSTPROCESSED"

    app = type(name, (ApplicationDefinition,), {"site": site_id, "command_template": "true",
                                                "postprocess": postprocess})
    app.sync()
    return app


def _plain_app(site_id: int):
    from balsam.api import ApplicationDefinition

    class Plain(ApplicationDefinition):  # every hook the default one: no worker needed
        site = site_id
        command_template = "true"

    Plain.sync()
    return Plain


def _leased_to(client, site_id: int, ids: list[int], state: str) -> None:
    """``ids`` RUNNING then ``state`` under a launcher's session, which then ends."""
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": len(ids), "filter_tags": {}})
    got = got if isinstance(got, list) else got["results"]
    assert sorted(j["id"] for j in got) == sorted(ids)
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    client.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
    client.delete(f"/sessions/{session}")


@pytest.fixture
def small(make_site, client, monkeypatch):
    """A site and a factory of processing modules on it (closed at the end, hooks released first)."""
    from balsam.site.modules import processing as processing_module

    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 5.0)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 10.0)
    site = make_site()
    modules: list[ProcessingModule] = []

    def module(**options) -> ProcessingModule:
        made = ProcessingModule(site, attrs.evolve(site.settings.processing, **options), client)
        modules.append(made)
        return made

    yield site, module
    for folder in Path(site.data_path).iterdir():
        if folder.is_dir():
            (folder / "release").touch()
    for made in modules:
        made.close()


def _states(client, ids: list[int]) -> dict[int, str]:
    return {r["id"]: r["state"] for r in job_rows(client, id=ids)}


def test_default_hook_jobs_flow_while_the_hook_workers_are_blocked(small, client) -> None:
    """One worker, ``prefetch_depth`` 20, 30 RUN_DONE jobs whose postprocess blocks: the module
    leased 20 of them and then nothing more, so 5 RUN_TIMEOUT jobs of an app with the default
    handle_timeout (RESTART_READY, no worker needed) waited for the blocked hooks (for ever, or
    ``hook_timeout_sec``). They are now moved within a few cycles while the hook still blocks; once
    released, every blocked job is postprocessed, each hook run exactly once."""
    from balsam.api import Job

    site, make = small
    module = make(num_workers=1, prefetch_depth=20)
    data = Path(site.data_path)
    blocking = _waiting_app(site.site_id, "Blocks")
    blocked = [j.id for j in Job.objects.bulk_create([Job(f"b/{i}", blocking) for i in range(30)])]
    for i in range(30):
        (data / f"b/{i}").mkdir(parents=True)
    _leased_to(client, site.site_id, blocked, "RUN_DONE")
    process_until(module, lambda: module.hooks_running(), "a blocked hook running")

    plain = _plain_app(site.site_id)
    timed_out = [j.id for j in Job.objects.bulk_create([Job(f"p/{i}", plain) for i in range(5)])]
    _leased_to(client, site.site_id, timed_out, "RUN_TIMEOUT")
    for _ in range(30):  # a few cycles (each at most a cycle's sleep, ~0.2 s here)
        module.run_cycle()
        module.flush()
        if set(_states(client, timed_out).values()) == {"RESTART_READY"}:
            break
    assert _states(client, timed_out) == {i: "RESTART_READY" for i in timed_out}
    assert module.hooks_running() and set(_states(client, blocked).values()) == {"RUN_DONE"}
    # Every blocked job is held, in the pool or queued for it; the pool holds two chunks at most.
    assert module.in_flight() + module.waiting() == 30
    assert module.in_flight() <= 2 * 16 and len(module.pending) <= module.max_tasks
    assert module.in_flight() + module.waiting() + len(module.backlog) <= module.max_held

    (data / "b/release").touch()
    process_until(module, lambda: set(_states(client, blocked).values()) == {"JOB_FINISHED"},
                  "the released hooks' jobs finished")
    ran = (data / "b/ran.txt").read_text().split()
    assert sorted(ran, key=int) == [str(i) for i in range(30)]  # each hook once: none lost, none twice
    assert module.waiting() == 0 and not module.pending


def test_the_hook_jobs_of_another_app_are_not_queued_behind_one_apps_chunks(small, client) -> None:
    """One worker: 48 RUN_DONE jobs of app A (all but the first 16 block in postprocess), then 5 of
    app B (a quick postprocess of its own). Every chunk of A went to the pool before B's, so B's
    jobs waited for A's blocked hooks. The apps now take turns, a chunk each: B's are postprocessed
    while A's hooks block."""
    from balsam.api import Job

    site, make = small
    module = make(num_workers=1, prefetch_depth=100)
    data = Path(site.data_path)
    first = _waiting_app(site.site_id, "First")
    other = _waiting_app(site.site_id, "Other")
    a = [j.id for j in Job.objects.bulk_create([Job(f"a/{i}", first, data={"wait": i >= 16}) for i in range(48)])]
    b = [j.id for j in Job.objects.bulk_create([Job(f"o/{i}", other, data={"wait": False}) for i in range(5)])]
    for i in range(48):
        (data / f"a/{i}").mkdir(parents=True)
    for i in range(5):
        (data / f"o/{i}").mkdir(parents=True)
    _leased_to(client, site.site_id, a + b, "RUN_DONE")

    process_until(module, lambda: set(_states(client, b).values()) == {"JOB_FINISHED"},
                  "the other app's jobs finished", timeout=60)
    states = _states(client, a)
    assert [states[i] for i in a[:16]] == ["JOB_FINISHED"] * 16
    assert set(states[i] for i in a[16:]) == {"RUN_DONE"}  # A's blocked hooks still run


def test_a_pool_that_cannot_start_holds_back_no_default_hook_job_and_loses_no_hook_job(small, client) -> None:
    """The worker pool cannot start (fork refused: no memory, a process limit): the cycle raises
    (the agent logs it), but the jobs that need no worker are moved all the same, and the hook jobs
    stay queued, leased, until a later cycle can start the pool."""
    from balsam.api import Job

    site, make = small
    module = make(num_workers=1)
    data = Path(site.data_path)
    hooked = _waiting_app(site.site_id, "Hooked")
    plain = _plain_app(site.site_id)
    hook_ids = [j.id for j in Job.objects.bulk_create([Job(f"h/{i}", hooked, data={"wait": False}) for i in range(3)])]
    plain_ids = [j.id for j in Job.objects.bulk_create([Job(f"q/{i}", plain) for i in range(3)])]
    for i in range(3):
        (data / f"h/{i}").mkdir(parents=True)
        (data / f"q/{i}").mkdir(parents=True)
    _leased_to(client, site.site_id, hook_ids, "RUN_DONE")
    _leased_to(client, site.site_id, plain_ids, "RUN_TIMEOUT")

    def cannot_start():
        raise OSError(12, "Cannot allocate memory")

    module._pool = cannot_start  # type: ignore[method-assign]
    with pytest.raises(OSError):
        module.run_cycle()
    module.flush()
    assert _states(client, plain_ids) == {i: "RESTART_READY" for i in plain_ids}
    assert _states(client, hook_ids) == {i: "RUN_DONE" for i in hook_ids}
    assert module.waiting() == 3 and not module.pending
    del module._pool  # the pool starts again
    process_until(module, lambda: set(_states(client, hook_ids).values()) == {"JOB_FINISHED"}, "the hook jobs finished")
    assert sorted((data / "h/ran.txt").read_text().split()) == ["0", "1", "2"]


def test_at_stop_the_queued_hook_jobs_are_released_and_the_next_agent_runs_them(small, client, monkeypatch) -> None:
    """Hook jobs still queued for a worker when the agent stops are released with the session
    (their hooks never started), as the chunks the pool had not started are: the next agent's
    module leases them and runs each hook once."""
    from balsam.api import Job
    from balsam.site.modules import processing as processing_module

    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 0.5)
    site, make = small
    module = make(num_workers=1, prefetch_depth=40)
    data = Path(site.data_path)
    blocking = _waiting_app(site.site_id, "Stops")
    ids = [j.id for j in Job.objects.bulk_create([Job(f"s/{i}", blocking) for i in range(40)])]
    for i in range(40):
        (data / f"s/{i}").mkdir(parents=True)
    _leased_to(client, site.site_id, ids, "RUN_DONE")
    process_until(module, lambda: module.hooks_running(), "a blocked hook running")
    assert module.waiting() == 40 - 32 and module.in_flight() == 32
    module.close()  # the blocked hook is ended; the rest never started
    rows = job_rows(client, id=ids)
    assert {r["state"] for r in rows} == {"RUN_DONE"}
    assert (data / "s/ran.txt").read_text().split() == ["0"]  # only the first chunk's first hook started

    (data / "s/release").touch()
    again = make(num_workers=1, prefetch_depth=40)  # the next agent
    process_until(again, lambda: set(_states(client, ids).values()) == {"JOB_FINISHED"}, "every job finished")
    ran = (data / "s/ran.txt").read_text().split()
    assert sorted(ran, key=int) == ["0"] + [str(i) for i in range(40)]  # job 0's hook ended at stop, run again
