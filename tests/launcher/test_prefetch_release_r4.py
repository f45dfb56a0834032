"""Second review (r4) of the serial launcher's giving back (balsam.launcher.prefetch, "Giving back"):

- a lean launcher fills a slot smaller than the running jobs' mean size (a freed quarter node beside
  half-node jobs: free_room's estimate, 0.375 a job, counted no room) while small jobs wait on the
  server (before: 0 of 6 small jobs ran, the slot stood idle);
- a release resent under its Idempotency-Key names exactly its first try's jobs, even when jobs were
  given back meanwhile (before: the body grew, the server refused the key, 422, and the added job was
  kept leased, hidden, until the Session's deletion);
- the master's too-late jobs are released with their acquire number (before: 0, read after the
  gone-jobs bookkeeping had dropped it, so once a lost Session was replaced they were dropped as
  that Session's and kept leased, hidden);
- a release that keeps failing (5xx, 429, no answer) is given up after MAX_RELEASE_TRIES tries or
  RELEASE_GIVE_UP_SEC, so acquires go on (before: every acquire waited for it for the whole
  allocation); jobs of a try that may have been applied are never started here, not even when an
  acquire leases them again.

Real server (SQLite and PostgreSQL) for the key reuse; the serial master's loop without threads for
the acquire numbers; a real launcher (uvicorn server, serial mode, sleeping jobs) for the slot. No
timed assertion: the clocks are the tests', and the launcher test waits for states.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import prefetch
from launcher_harness import end_allocation, serial_launcher_on_cpus
from launcher_helpers import make_runnable, run_counts, site_logs, synced_app, wait_for_states
from test_prefetch_release_review import ReleasingLease
from test_prefetch_release_units import Job, Lease, Refused, busy_fetcher, clock, fetcher, prepared  # noqa: F401
from test_serial_too_late import _exit, _prepared, make_master

DONE = {"RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"}


class LostAnswer(Exception):
    status_code = None


class RealClient:
    """The real client, whose first answer is lost after the server applied the request."""

    def __init__(self, client: Any) -> None:
        self.client, self.drop = client, True
        self.bodies: list[Any] = []

    def post(self, path: str, json: Any = None, idempotency_key: str = "", **kw: Any) -> Any:
        self.bodies.append(json)
        answer = self.client.post(path, json=json, idempotency_key=idempotency_key)
        if self.drop:
            self.drop = False
            raise LostAnswer("read timeout (answer lost)")
        return answer


class RealLease:
    lost_generation = 0

    def __init__(self, client: Any, session_id: int) -> None:
        self.client, self.session_id = client, session_id


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_a_resent_release_names_its_first_tries_jobs_only(env: str, request: Any) -> None:
    request.getfixturevalue(env)
    from balsam.api import App, Job as ApiJob, Site
    from balsam.client.default import get_default_client

    client = get_default_client()
    site = Site.objects.create(name=f"r4-{uuid.uuid4().hex[:8]}", path=f"/tmp/r4-{uuid.uuid4().hex[:8]}")
    app = App.objects.create(site_id=site.id, name="A", serialized_class="x", source_code="x")
    ids = make_runnable(ApiJob(workdir=f"w/{i}", app_id=app.id) for i in range(3))
    sid = client.post("/sessions/", json={"site_id": site.id})["id"]
    assert sorted(j["id"] for j in client.post(f"/sessions/{sid}", json={"max_num_jobs": 3})) == sorted(ids)
    real = RealClient(client)
    f = fetcher(RealLease(real, sid))  # type: ignore[arg-type]
    f.give_back([(prepared(ids[0]), 1), (prepared(ids[1]), 1)])  # held while every slot was busy
    f._send_release()  # applied, its answer lost
    f.give_back([(prepared(ids[2]), 1)], too_late=True)  # the master sets a job aside meanwhile
    f._send_release()  # the resend: the same body, replayed
    assert real.bodies[1] == real.bodies[0] == {"job_ids": sorted(ids[:2])}
    assert f.released == 2 and f.release_unknown == [] and f.too_late == [] and f.releasing == 1
    f._send_release()  # the too-late job, under a new key
    assert real.bodies[2] == {"job_ids": [ids[2]]} and f.released == 3 and f.releasing == 0
    other = client.post("/sessions/", json={"site_id": site.id})["id"]
    got = [j["id"] for j in client.post(f"/sessions/{other}", json={"max_num_jobs": 3})]
    assert sorted(got) == sorted(ids)  # all three given back while this Session lives
    client.delete(f"/sessions/{sid}")
    client.delete(f"/sessions/{other}")


def test_the_masters_too_late_jobs_keep_their_acquire_number(tmp_path: Path) -> None:
    left = [600.0]
    master, prefetcher, lease, _updater, transport = make_master(tmp_path, left)
    prefetcher.release_after_sec = 5.0
    prefetcher.lease = ReleasingLease(lease)
    prefetcher.lease.lost_generation = 2  # a Session was lost and replaced earlier (its acquires: up to 2)
    prefetcher._ready.extend([_prepared(1, workdir=tmp_path), _prepared(2, workdir=tmp_path),
                              _prepared(3, 5, tmp_path), _prepared(4, workdir=tmp_path)])
    prefetcher._ready_generations.extend([7, 7, 7, 7])  # leased by the current Session (acquire 7)
    master.step()  # 1 and 2 run; 3 (5 min) and 4 wait
    left[0] = 200.0  # 3 no longer fits (taken in time, it waited)
    _exit(transport, 1)
    master.step()
    assert [(p.id, g, late) for p, g, late in prefetcher._releasing] == [(3, 7, True)]
    prefetcher._send_release()
    assert [body for _path, body, _key in prefetcher.lease.client.posts] == [{"job_ids": [3]}]
    assert prefetcher.released == 1 and not master.too_late.jobs and not prefetcher.too_late
    master.shutdown("test over")


class Unavailable(Refused):
    def __init__(self, status_code: "int | None") -> None:
        super().__init__(status_code)


@pytest.mark.parametrize("failure", [503, 429, None], ids=["503", "429", "no-answer"])
def test_a_release_that_keeps_failing_is_given_up_and_acquires_go_on(clock: list[float], failure: "int | None") -> None:
    lease = Lease()
    f = busy_fetcher(lease)
    lease.client.fail = [Unavailable(failure) for _ in range(1000)]
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    f.give_back([(prepared(8), 1)], too_late=True)
    for _ in range(1000):
        if not f._releasing:
            break
        f._send_release()
        clock[0] += 1.0
    tries = len(lease.client.posts)
    assert tries <= getattr(prefetch, "MAX_RELEASE_TRIES", 5) and not f._releasing, tries
    # Every try may have been applied: 5 and 6 are never started here; nothing is given back again.
    assert f.release_unknown == [5, 6] and f.take() == [] and [p.id for p in f.too_late] == [8]
    assert f.release_given_up and not f.may_release and not f.may_give_back and not f.lean
    # Acquires go on; a job of that release leased again is not handed to the loop.
    lease.acquire = lambda count, **kw: [Job(6), Job(9)]  # type: ignore[method-assign]
    assert [job.id for job in f._drop_release_unknown(lease.acquire(2))] == [9]


def test_a_release_given_up_by_time_keeps_the_jobs_never_sent(clock: list[float]) -> None:
    lease = Lease()
    f = busy_fetcher(lease)
    lease.client.fail = [Unavailable(None), Unavailable(None)]
    f.give_back([(prepared(5), 1)])
    f._send_release()  # no answer: may have been applied
    f.give_back([(prepared(7), 1)])  # given back meanwhile: never sent under that key
    clock[0] += getattr(prefetch, "RELEASE_GIVE_UP_SEC", 60.0)
    f._send_release()
    assert len(lease.client.posts) == 2 and all(body == {"job_ids": [5]} for _p, body, _k in lease.client.posts)
    assert f.release_unknown == [5] and [p.id for p in f.take()] == [7] and f.release_given_up


@pytest.mark.slow
def test_a_lean_launcher_fills_a_slot_smaller_than_the_mean_job(new_site: Any) -> None:
    name, path = new_site(idle_ttl_sec=600)
    Sleeper = synced_app(name, "Sleeper", "sleep {{ secs }}")
    # One node of 4 CPUs. Leased in id order: H1 (half) and Q1 (quarter), 300 s; Q0 (quarter, 8 s);
    # H2..H4 (half) cannot fit and are given back (lean); then quarter jobs of 1 s. When Q0 ends,
    # the free quarter is no room by the running jobs' mean (0.375 of the node).
    specs = [(2, 300), (4, 300), (4, 8), (2, 300), (2, 300), (2, 300)] + [(4, 1)] * 6
    ids = make_runnable(Sleeper.submit(workdir=f"s/{i}", node_packing_count=packing, secs=secs, save=False)
                        for i, (packing, secs) in enumerate(specs))
    with serial_launcher_on_cpus(path, [0, 1, 2, 3], 10) as proc:
        wait_for_states(ids[2:3], DONE, timeout=90)
        wait_for_states(ids[6:], DONE, timeout=90)  # the quarter slot runs the small jobs
        assert end_allocation(proc) == 0
    runs = run_counts(ids)
    assert all(runs.get(i, 0) == 1 for i in ids[:3] + ids[6:]) and not any(runs.get(i, 0) for i in ids[3:6]), runs
    logs = site_logs(path)
    # The half-node jobs given back while every slot was busy; the jobs leased for the quarter slot
    # that do not fit are given back after the bound, not leased and given back on every turn.
    assert logs.count("given back to the server") <= 2, logs.count("given back to the server")
