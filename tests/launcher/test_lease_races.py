"""Races between a launcher's heartbeat, its acquires and the jobs its user re-queues, and the order
of a stop: the real in-process server (SQLite, starlette TestClient), the real JobLease,
BulkStatusUpdater, GoneJobs and MPIMode over a fake process pool; the serial master over real
processes and a scripted lease.

- A heartbeat answer computed before the launcher leased a job again (after its lost Session was
  replaced) must not end or drop the new copy: it stayed leased and never ran. A job its user
  re-queued while the launcher held it is not leased again until the launcher's heartbeats no longer
  list it (the server holds it back: balsam.server.sessions_logic, "Re-queued while running"), so
  the gone answer about it always comes before any new copy.
- A job leased again while an older copy is held: the older copy is stale; it must neither sit
  twice in ``pending`` (the NodeManager refused the second placement: the loop crashed) nor run twice.
- A failure of the mpi loop still ends and reports the running jobs; a stop ends them before it
  waits for an acquire in flight.

No timed assertion: the tests wait for events, with generous deadlines against hangs.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.client.lease import JobLease
from balsam.client.rest import APIError
from balsam.client.status_updater import BulkStatusUpdater
from balsam.launcher.service_calls import lease_session
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes.serial_worker import Master
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ProcessPool, SpawnerPool
from balsam.platform import NodeInfo
from launcher_helpers import FakePool, mpi_mode
from test_serial_master import FakeJob, FakeTransport, RecordingUpdater, _prepare

#: Generous: only keeps a broken test from hanging.
WAIT_SEC = 30.0


# -- an in-process server ---------------------------------------------------------------------------
class Adapter:
    """What JobLease and BulkStatusUpdater call on a RESTClient, over a starlette TestClient."""

    retry_count = 0

    def __init__(self, tc: Any) -> None:
        self.tc = tc
        self.lock = threading.Lock()  # one request at a time through the TestClient

    def _req(self, method: str, path: str, json: Any = None, idempotency_key: Optional[str] = None,
             retry_count: Optional[int] = None, headers: Optional[dict] = None, params: Any = None) -> Any:
        sent = dict(headers or {})
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        with self.lock:
            resp = self.tc.request(method, path, json=json, headers=sent, params=params)
        if resp.status_code >= 400:
            body = resp.json() if resp.content else {}
            ids = body.get("refused_ids") if isinstance(body, dict) else None
            raise APIError(method, path, resp.status_code, body.get("detail") if isinstance(body, dict) else body,
                           frozenset(ids) if ids else None)
        return resp.json() if resp.content else None

    def get(self, path: str, **kw: Any) -> Any:
        return self._req("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self._req("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self._req("PUT", path, json=json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self._req("PATCH", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self._req("DELETE", path, **kw)


class Server:
    def __init__(self, tc: Any, site_id: int, app_id: int) -> None:
        self.tc, self.site_id, self.app_id = tc, site_id, app_id
        self.client = Adapter(tc)

    def runnable(self, n: int) -> list[int]:
        body = [{"workdir": f"{uuid.uuid4().hex[:6]}/{i}", "app_id": self.app_id, "node_packing_count": 2} for i in range(n)]
        ids = [j["id"] for j in self.tc.post("/jobs/", json=body).json()]
        assert self.tc.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200
        return ids

    def state(self, job_id: int) -> str:
        return self.tc.get(f"/jobs/{job_id}").json()["state"]

    def requeue(self, job_id: int) -> None:
        """What a user does to a job (the processing module too, after a RUN_TIMEOUT)."""
        assert self.tc.patch("/jobs/", json=[{"id": job_id, "state": "RESTART_READY"}]).status_code == 200

    def sweep_until(self, job_id: int, state: str) -> None:
        """Let the lease's Session expire (no heartbeat): a session request runs the server's sweep."""
        deadline = time.monotonic() + WAIT_SEC
        while self.state(job_id) != state:
            assert time.monotonic() < deadline, f"job {job_id} is {self.state(job_id)}, not {state}"
            time.sleep(0.2)
            self.tc.post("/sessions/", json={"site_id": self.site_id})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'api.db'}", secret_key="x" * 40, registration="open",
                              session_expire_sec=2, session_sweep_sec=1)
    app = create_app(settings=settings, create_tables_now=True)
    with TestClient(app) as tc:
        password = "a long enough password"
        tc.post("/auth/password/register", json={"username": "u", "password": password}).raise_for_status()
        token = tc.post("/auth/password/login", data={"username": "u", "password": password}).json()["access_token"]
        tc.headers["Authorization"] = f"Bearer {token}"
        site = tc.post("/sites/", json={"name": "s", "path": "/tmp/s"}).json()
        appd = tc.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "", "source_code": "",
                                       "parameters": {}, "transfers": {}, "description": ""}).json()
        yield Server(tc, site["id"], appd["id"])


# -- an MPIMode over a fake pool --------------------------------------------------------------------
class Prep:
    def end_stale_runs(self, jobs: Any) -> None:
        pass

    def prepare(self, job: Any) -> PreparedJob:
        job_id = job["id"] if isinstance(job, dict) else job.id
        return PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={},
                           demand=Demand(node_packing_count=2))


def make_mode(tmp_path: Path, **settings: Any) -> Any:
    """One node of two CPUs; jobs of node_packing_count 2: two run at once."""
    mode = mpi_mode(tmp_path, **settings)
    mode.pool = FakePool(mode.wake)
    mode.handover.pool = mode.pool
    mode.preparer = Prep()
    return mode


class Launcher:
    """An MPIMode driven step by step, over the real lease and updater (no threads of its own)."""

    def __init__(self, server: Server, tmp_path: Path) -> None:
        self.server = server
        self.mode = make_mode(tmp_path)
        self.lease = JobLease(server.client, server.site_id, heartbeat_thread=False)
        self.updater = BulkStatusUpdater(server.client, session_id=lease_session(self.lease), max_wait_sec=0.01)
        self.mode.gone.attach(self.lease)

    def acquire(self) -> list[int]:
        got = self.mode._fetch(self.lease, self.mode._acquire_request())
        self.mode._take(got, self.updater)
        return [p.id for p in got]

    def turn(self) -> None:
        """What one turn of the loop does with exits, gone answers and pending jobs."""
        self.mode._reap(self.updater)
        if self.mode.gone.news:
            self.mode._end_gone()
        self.mode._start_pending(self.updater)

    def pending(self) -> list[int]:
        return [p.id for p in self.mode.pending]

    def late_tick(self) -> tuple[threading.Thread, threading.Event]:
        """A heartbeat whose answer the server has computed but that reaches the launcher only when
        the returned event is set."""
        real_put = self.server.client.put
        computed, deliver = threading.Event(), threading.Event()

        def slow_put(path: str, json: Any = None, **kw: Any) -> Any:
            answer = real_put(path, json=json, **kw)
            computed.set()
            assert deliver.wait(WAIT_SEC)
            return answer

        self.server.client.put = slow_put  # type: ignore[method-assign]
        thread = threading.Thread(target=self.lease.tick, daemon=True)
        thread.start()
        assert computed.wait(WAIT_SEC)
        self.server.client.put = real_put  # type: ignore[method-assign]
        return thread, deliver

    def run_to_end(self) -> None:
        """Finish every job as it starts until nothing runs or waits; send the updates."""
        deadline = time.monotonic() + WAIT_SEC
        while self.mode.pool.running or self.mode.pending or self.mode.gone.ready or self.mode.gone.successors:
            assert time.monotonic() < deadline, f"jobs left: pending {self.pending()}"
            for job_id in list(self.mode.pool.running):
                self.mode.pool.finish(job_id, 0)
            self.turn()
        assert self.updater.flush(WAIT_SEC)

    def close(self) -> None:
        self.updater.close()
        self.lease.close()


@pytest.fixture
def launcher(server: Server, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(server, tmp_path)
    yield launcher
    launcher.close()


def test_a_requeued_held_job_is_leased_again_only_after_the_gone_answer_was_applied(server: Server, launcher: Launcher) -> None:
    """Same Session: the user re-queues a held unstarted job (which ends the lease); the server
    answers a heartbeat "gone". Before that answer arrives, the launcher's next acquire used to lease
    the job again (the answer was then older than the new copy). Now the server holds the job back
    while the launcher may hold its old copy: the answer drops the old copy, the next heartbeat (which
    no longer lists it) frees the job, and the acquire after it leases it again; it runs once."""
    ids = server.runnable(4)
    assert launcher.acquire() == ids
    launcher.turn()
    assert launcher.mode.pool.job_ids() == ids[:2] and launcher.pending() == ids[2:]
    server.requeue(ids[2])
    thread, deliver = launcher.late_tick()  # computed now: ids[2] is listed, and no longer held
    launcher.mode.pool.finish(ids[0])
    launcher.mode._reap(launcher.updater)  # room for an acquire, which comes before the next placement
    assert launcher.acquire() == []  # not while this launcher may hold (or run) its old copy
    deliver.set()
    thread.join(WAIT_SEC)
    assert launcher.mode.gone.news
    launcher.turn()
    assert ids[2] not in launcher.pending() + launcher.mode.pool.job_ids()  # the old copy, dropped
    assert launcher.lease.tick() == []  # ids[2] no longer listed: leasable again
    assert launcher.acquire() == [ids[2]]
    launcher.run_to_end()
    assert launcher.lease.tick() == []
    assert {i: server.state(i) for i in ids} == {i: "RUN_DONE" for i in ids}
    assert Counter(launcher.mode.pool.starts) == {i: 1 for i in ids}
    assert not launcher.updater.dropped


def test_a_late_gone_answer_after_a_replaced_session_leaves_the_new_copies_in_place(server: Server, launcher: Launcher) -> None:
    """The audit's race: the Session expires (API unreachable), the lease replaces it; a heartbeat of
    the new Session is computed (none of the old jobs held) and reaches the launcher only after the
    acquirer leased them again. The stale run of job 1 is ended (its new copy runs after it); jobs
    3 and 4 stay pending; all run once more to RUN_DONE; job 2 (timed out, not re-queued) is not run."""
    ids = server.runnable(4)
    assert launcher.acquire() == ids
    launcher.turn()
    server.sweep_until(ids[0], "RUN_TIMEOUT")  # no heartbeat: the Session expired, 1 and 2 timed out
    server.requeue(ids[0])  # the processing module re-queues a timed-out job
    # 404: a new Session; every job held under the old one is reported gone at once (as of acquire 1)
    assert launcher.lease.tick() == ids and launcher.lease.session_id
    thread, deliver = launcher.late_tick()  # computed now: the new Session holds none of them
    launcher.mode.pool.finish(ids[1])
    launcher.mode._reap(launcher.updater)
    assert sorted(launcher.acquire()) == [ids[0], ids[2], ids[3]]
    deliver.set()
    thread.join(WAIT_SEC)
    launcher.turn()
    assert launcher.mode.pool.ended == [ids[0]]  # the stale run of job 1, for its new copy
    assert sorted(launcher.pending() + launcher.mode.pool.job_ids()) == [ids[0], ids[2], ids[3]]
    launcher.run_to_end()
    assert launcher.lease.tick() == []  # nothing held is gone: every job leased again was run
    assert {i: server.state(i) for i in ids} == {ids[0]: "RUN_DONE", ids[1]: "RUN_TIMEOUT", ids[2]: "RUN_DONE",
                                                 ids[3]: "RUN_DONE"}
    assert Counter(launcher.mode.pool.starts) == {ids[0]: 2, ids[1]: 1, ids[2]: 1, ids[3]: 1}
    # Only job 2's exit is refused (the server timed it out); the stale run of job 1 reported nothing.
    assert [u["id"] for u, _ in launcher.updater.dropped] == [ids[1]]


def test_a_requeued_job_leased_again_by_the_same_session_runs_once_without_a_crash(server: Server, launcher: Launcher) -> None:
    """The job sat twice in pending: the second placement raised 'job 3 is already placed'. Now the
    server leases it again only once the launcher's heartbeats no longer list it (the first is
    answered "gone", which drops the old copy; the second frees it)."""
    ids = server.runnable(4)
    launcher.acquire()
    launcher.turn()
    server.requeue(ids[2])
    launcher.mode.pool.finish(ids[0])
    launcher.mode._reap(launcher.updater)
    assert launcher.acquire() == []
    assert launcher.lease.tick() == [ids[2]]
    launcher.turn()
    assert launcher.lease.tick() == []
    assert launcher.acquire() == [ids[2]]
    assert sorted(launcher.pending() + launcher.mode.pool.job_ids()) == ids[1:]  # each once
    assert launcher.lease.tick() == []
    launcher.run_to_end()
    assert Counter(launcher.mode.pool.starts) == {i: 1 for i in ids}
    assert {i: server.state(i) for i in ids} == {i: "RUN_DONE" for i in ids}
    assert not launcher.updater.dropped


def test_jobs_leased_again_after_a_lost_session_run_once(server: Server, launcher: Launcher) -> None:
    """The old Session expired with jobs waiting here: the new one leases them again. Each runs
    once (they ran twice: the old copy, then the new one); the timed-out running ones are ended
    on the heartbeat's answer; the old copies the new Session did not lease are dropped."""
    ids = server.runnable(6)
    launcher.acquire()
    launcher.turn()
    assert launcher.mode.pool.job_ids() == ids[:2]
    waiting = launcher.pending()
    assert waiting
    server.sweep_until(ids[0], "RUN_TIMEOUT")
    launcher.mode.pool.finish(ids[0])
    launcher.mode._reap(launcher.updater)
    again = launcher.acquire()  # 404: a new Session, which leases what the old one held and did not start
    assert again and set(again) <= set(ids[2:])
    pending = launcher.pending()
    assert len(pending) == len(set(pending)) and set(pending) == set(waiting) | set(again)  # no job twice
    # Timed out with the old Session: job 2's run is ended; old copies not leased again are dropped.
    assert launcher.lease.tick() == sorted({ids[1], *waiting} - set(again))
    launcher.turn()
    launcher.run_to_end()
    assert Counter(launcher.mode.pool.starts) == {i: 1 for i in [*ids[:2], *again]}
    assert {i: server.state(i) for i in again} == {i: "RUN_DONE" for i in again}


def _take_after_expiry(server: Server, lease: JobLease, want: list[int]) -> list[int]:
    """Another launcher's lease acquires ``want`` once the first launcher's Session has expired
    (a session request runs the server's sweep)."""
    deadline = time.monotonic() + WAIT_SEC
    taken: list[int] = []
    while not set(want) <= set(taken):
        assert time.monotonic() < deadline, f"only {taken} of {want} were freed"
        taken += [j["id"] for j in lease.acquire(len(want))]
        time.sleep(0.2)
        server.tc.post("/sessions/", json={"site_id": server.site_id})
    return sorted(taken)


def test_a_replaced_session_reports_every_job_it_held_gone(server: Server) -> None:
    """The audit's scenario: a lease prefetches 4 jobs, is cut off longer than the expiry, another
    launcher leases the 4; the first lease's next tick finds its Session gone and replaces it. It
    must report the 4 as gone at once (it answered [] and called nobody: the launcher kept them
    and started them while the other launcher ran them too)."""
    ids = server.runnable(4)
    first = JobLease(server.client, server.site_id, heartbeat_thread=False)
    held = [j["id"] for j in first.acquire(4)]
    assert held == ids
    gone: list[tuple[list[int], int]] = []
    first.watch(lambda: held, lambda job_ids, as_of: gone.append((job_ids, as_of)), generation=True)
    second = JobLease(server.client, server.site_id, heartbeat_thread=False)
    assert _take_after_expiry(server, second, ids) == ids  # no heartbeat from the first: expired
    lost = first.session_id
    assert first.tick() == ids  # 404: a new Session, and the old one's jobs are reported
    assert first.session_id != lost
    assert gone == [(ids, 1)]  # as of acquire 1: copies it acquires from now on are not concerned
    assert first.tick() == ids  # the new Session confirms it (asked with every heartbeat)
    first.close()
    second.close()


def test_a_prefetched_job_is_not_started_after_its_session_was_replaced(server: Server, launcher: Launcher) -> None:
    """Launcher 1 runs jobs 1 and 2 and holds 3 and 4 ready; its Session expires while it is cut
    off, launcher 2 leases 3 and 4. When launcher 1's tick replaces the Session, 3 and 4 must not
    be started (they ran twice at once, in the same workdir, until the next heartbeat's answer)."""
    ids = server.runnable(4)
    assert launcher.acquire() == ids
    launcher.turn()
    assert launcher.mode.pool.job_ids() == ids[:2] and launcher.pending() == ids[2:]
    launcher.mode.pool.finish(ids[0])
    launcher.mode.pool.finish(ids[1])
    launcher.mode._reap(launcher.updater)  # room for 3 and 4, started at the next turn
    assert launcher.updater.flush(WAIT_SEC)
    other = JobLease(server.client, server.site_id, heartbeat_thread=False)
    assert _take_after_expiry(server, other, ids[2:]) == ids[2:]
    answer = launcher.lease.tick()  # 404: the Session is replaced
    launcher.turn()
    assert Counter(launcher.mode.pool.starts) == {ids[0]: 1, ids[1]: 1}, "a job leased to another launcher was started"
    assert launcher.pending() == [] and launcher.mode.pool.job_ids() == []
    assert answer == ids[2:]  # the replaced Session's held jobs
    assert {i: server.state(i) for i in ids} == {ids[0]: "RUN_DONE", ids[1]: "RUN_DONE", ids[2]: "PREPROCESSED",
                                                 ids[3]: "PREPROCESSED"}
    assert not launcher.updater.dropped
    other.close()


class Outage:
    """A client whose API can be switched off (a server restart, a proxy down): every call fails
    as a connection does, which the updater retries and then gives up on."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.down = False
        self.retry_count = 0

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.client, name)

        def guarded(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise ConnectionError("the API is down")
            return call(*args, **kw)

        return guarded


def _launcher_ending_in_an_outage(server: Server, spool: Path) -> tuple[Outage, JobLease, int]:
    """What a launcher does when the API goes away as it ends (JobMode.lease()): its job's RUNNING
    was sent, its RUN_DONE cannot be, and the updater gives up and spools it."""
    [job_id] = server.runnable(1)
    client = Outage(server.client)
    lease = JobLease(client, server.site_id, heartbeat_thread=False)
    assert [j["id"] for j in lease.acquire(1)] == [job_id]
    updater = BulkStatusUpdater(client, close_timeout=0.2, spool_dir=spool, session_id=lease_session(lease),
                                max_wait_sec=0.01)
    updater.put(job_id, "RUNNING")
    assert updater.flush(WAIT_SEC)
    client.down = True
    updater.put(job_id, "RUN_DONE", return_code=0)
    updater.close()
    assert updater.gave_up and updater.spooled == 1
    return client, lease, job_id


def _agent_replays(server: Server, spool: Path) -> list:
    """The site agent's processing module replays the spool; returns what the server refused."""
    from balsam.client.status_updater import SpoolReplayer

    agent = BulkStatusUpdater(server.client, max_wait_sec=0.01)
    replayer = SpoolReplayer(spool, agent)
    replayer.poll()
    assert agent.flush(WAIT_SEC)
    replayer.poll()  # the next cycle deletes the files sent
    agent.close()
    return agent.dropped


def test_a_spooled_result_is_recorded_when_the_api_is_back_before_the_launcher_ends(server: Server, tmp_path: Path) -> None:
    """The audit's order: the API is back when the lease closes. The Session's DELETE used to go
    through and time the job out (RUN_TIMEOUT, lease ended), then the agent's replay of RUN_DONE
    was refused ('no longer held by session') and the finished job ran again."""
    spool = tmp_path / "spool"
    client, lease, job_id = _launcher_ending_in_an_outage(server, spool)
    client.down = False
    lease.close(retry_count=0)  # as JobMode.lease() closes it after the updater gave up
    dropped = _agent_replays(server, spool)
    assert server.state(job_id) == "RUN_DONE", [e["to_state"] for e in server.tc.get("/events/", params={"job_id": job_id}).json()["results"]]
    assert not dropped
    assert not list(spool.glob("*.jsonl"))  # sent by the lease's close; nothing left to replay


def test_a_spooled_result_is_recorded_when_the_api_is_back_after_the_launcher_ended(server: Server, tmp_path: Path) -> None:
    """The other order: the API is still gone when the lease closes, the agent replays later. The
    Session is left to expire (not deleted) and still holds the job when the replay arrives."""
    spool = tmp_path / "spool"
    client, lease, job_id = _launcher_ending_in_an_outage(server, spool)
    lease.close(retry_count=0)
    client.down = False
    assert list(spool.glob("*.jsonl"))
    assert not _agent_replays(server, spool)
    assert server.state(job_id) == "RUN_DONE"
    assert not list(spool.glob("*.jsonl"))


class NumberingClient:
    """A RESTClient stand-in: each acquire leases the next id; a heartbeat answers every held id gone,
    and lets the test acquire while its request is out."""

    def __init__(self) -> None:
        self.next_id = 1
        self.during_put: Any = None

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if path == "/sessions/":
            return {"id": 1}
        self.next_id += 1
        return [{"id": self.next_id - 1}]

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        answer = {"gone": list(json.get("job_ids", []))}  # computed now
        if self.during_put is not None:
            self.during_put()
        return answer


def test_a_heartbeat_answer_is_numbered_with_the_acquires_answered_before_its_request() -> None:
    client = NumberingClient()
    lease = JobLease(client, 1, heartbeat_thread=False)
    got: list[tuple[list[int], int]] = []
    held: list[int] = []
    lease.watch(lambda: held, lambda ids, as_of: got.append((ids, as_of)), generation=True)
    held += [j["id"] for j in lease.acquire(1)]
    assert lease.generation == 1
    client.during_put = lambda: held.extend(j["id"] for j in lease.acquire(1))  # answered after the request
    assert lease.tick() == [1]
    assert got == [([1], 1)] and lease.generation == 2  # the copy of acquire 2 is newer than the answer
    client.during_put = None
    lease.tick()
    assert got[-1] == ([1, 2], 2)
    plain: list[list[int]] = []
    lease.watch(lambda: held, plain.append)  # without generation: on_gone(ids), as before
    lease.tick()
    assert plain == [[1, 2]]


# -- the serial master ------------------------------------------------------------------------------
class ScriptedLease:
    """Hands out the batches the test queues, numbering each acquire as JobLease does."""

    def __init__(self) -> None:
        self.batches: deque[list[FakeJob]] = deque()
        self.generation = 0
        self.closed: Optional[dict] = None

    def acquire(self, count: int, **kwargs: Any) -> list[FakeJob]:
        if not self.batches:
            return []
        self.generation += 1
        return self.batches.popleft()

    def close(self, **kwargs: Any) -> None:
        self.closed = kwargs


def make_master(tmp_path: Path, lease: ScriptedLease, pool_class: Any) -> tuple[Master, RecordingUpdater]:
    node_manager = NodeManager([NodeInfo("0", "node0", [0, 1])])
    updater = RecordingUpdater()
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    prefetcher = Prefetcher(lambda: lease, _prepare(tmp_path), node_manager.check_satisfiable, updater, depth=64,
                            remaining_min=stop.countdown.remaining_min, retry_sec=0.02, on_ready=wake.set).start()
    master = Master(node_manager=node_manager, rank_of_node=[0], transport=FakeTransport(1), stop=stop, wake=wake,
                    pool=pool_class(5, wake=wake), prefetcher=prefetcher, updater=updater, platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None)
    return master, updater


def turn_until(master: Master, condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SEC
    while not condition():
        assert time.monotonic() < deadline, what
        master.wake.clear()
        master.step()
        master.wake.wait(0.02)


@pytest.mark.parametrize("pool_class", [ProcessPool, SpawnerPool])
def test_serial_master_ends_the_stale_run_of_a_job_leased_again_and_runs_the_new_copy(tmp_path: Path, pool_class: Any) -> None:
    lease = ScriptedLease()
    master, updater = make_master(tmp_path, lease, pool_class)
    log = tmp_path / "1" / "log"
    lease.batches.append([FakeJob(1, "sleep 60; echo old >> log")])
    try:
        turn_until(master, lambda: updater.states(1) == ["RUNNING"], "job 1 did not start")
        lease.batches.append([FakeJob(1, "echo new >> log")])  # leased again while its old copy runs
        turn_until(master, lambda: "RUN_DONE" in updater.states(1), "the new copy of job 1 did not run")
    finally:
        master.shutdown("test over")
    assert log.read_text() == "new\n"  # the stale run was ended, the new copy ran once
    assert updater.states(1) == ["RUNNING", "RUNNING", "RUN_DONE"]  # nothing for the stale run's exit
    assert not master.node_manager.placements and not master.gone.copies and not master.gone.ready


def test_serial_master_drops_the_waiting_copy_of_a_job_leased_again(tmp_path: Path) -> None:
    lease = ScriptedLease()
    master, updater = make_master(tmp_path, lease, ProcessPool)
    go = tmp_path / "go"
    hold = f"while [ ! -e {go} ]; do sleep 0.02; done"
    lease.batches.append([FakeJob(1, hold), FakeJob(2, hold), FakeJob(3, "echo old >> log")])
    try:
        turn_until(master, lambda: updater.states(1) == updater.states(2) == ["RUNNING"] and len(master.pending) == 1,
                   "jobs 1 and 2 did not start")
        lease.batches.append([FakeJob(3, "echo new >> log")])
        turn_until(master, lambda: master.prefetcher._taken == 4, "the new copy of job 3 was not taken")
        assert [p.id for p in master.pending] == [3]
        go.touch()
        turn_until(master, lambda: "RUN_DONE" in updater.states(3), "job 3 did not run")
    finally:
        master.shutdown("test over")
    assert (tmp_path / "3" / "log").read_text() == "new\n"
    assert updater.states(3) == ["RUNNING", "RUN_DONE"]


# -- mpi mode's loop: a failure, a stop ---------------------------------------------------------------
class FakeUpdater:
    gave_up = False

    def __init__(self) -> None:
        self.puts: list[tuple[int, str]] = []

    def put(self, job_id: int, state: Any, **kw: Any) -> None:
        self.puts.append((job_id, str(getattr(state, "value", state))))

    def put_updates(self, updates: list[dict]) -> None:
        self.puts += [(u["id"], str(u["state"])) for u in updates]

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def send_soon(self) -> None:
        pass

    def close(self) -> None:
        pass


def with_lease(mode: Any, source: Any, updater: FakeUpdater, events: list[str]) -> None:
    @contextlib.contextmanager
    def lease() -> Iterator[tuple[Any, Any]]:
        try:
            yield source, updater
        finally:
            events.append("session closed")

    mode.lease = lease


class BrokenReap(FakePool):
    """A pool whose reap fails once a job runs (any exception in the loop will do)."""

    def reap(self) -> list:
        if self.running:
            raise RuntimeError("reap broke")
        return super().reap()


def test_a_failure_of_the_mpi_loop_still_ends_and_reports_the_running_jobs(tmp_path: Path) -> None:
    mode = make_mode(tmp_path, delay_sec=0.01)
    mode.pool = BrokenReap(mode.wake)
    mode.handover.pool = mode.pool
    events: list[str] = []

    class Source:
        def acquire(self, count: int, **kw: Any) -> list[dict]:
            return [] if events else (events.append("acquired") or [{"id": 1}])

    updater = FakeUpdater()
    with_lease(mode, Source(), updater, events)
    with pytest.raises(RuntimeError, match="reap broke"):
        mode.run()
    assert mode.pool.terminated == [[1]]  # the task does not outlive the launcher
    assert (1, "RUN_TIMEOUT") in updater.puts
    assert events[-1] == "session closed"


def test_a_stop_ends_the_running_jobs_before_waiting_for_the_acquire_in_flight(tmp_path: Path) -> None:
    mode = make_mode(tmp_path, delay_sec=0.01)
    in_flight, answer = threading.Event(), threading.Event()
    events: list[str] = []

    class Source:
        calls = 0

        def acquire(self, count: int, **kw: Any) -> list[dict]:
            Source.calls += 1
            if Source.calls == 1:
                return [{"id": 1}]
            in_flight.set()
            answer.wait(WAIT_SEC)  # an API slow to answer
            events.append("acquire answered")
            return [{"id": 2}]  # leased as the launcher stops: never started, freed with the Session

    real_terminate = mode.pool.terminate_all

    def terminate_all(grace: float) -> Any:
        events.append("jobs ended" if not answer.is_set() else "jobs ended after the acquire")
        answer.set()
        return real_terminate(grace)

    mode.pool.terminate_all = terminate_all
    updater = FakeUpdater()
    with_lease(mode, Source(), updater, events)
    runner = threading.Thread(target=mode.run, daemon=True)
    runner.start()
    assert in_flight.wait(WAIT_SEC)
    mode.request_stop("signal 15")
    runner.join(WAIT_SEC)
    assert not runner.is_alive()
    assert events == ["jobs ended", "acquire answered", "session closed"]
    assert updater.puts[-1] == (1, "RUN_TIMEOUT")
    assert all(job_id == 1 for job_id, _ in updater.puts)  # the late job was neither started nor reported


# -- a launcher newer than its server ---------------------------------------------------------------
class OlderServer(Adapter):
    """The server as it was before SessionAcquire had ``max_gpus_per_node``: the real server's
    answers, but that field is an unknown one (422), as its strict request parsing answers it."""

    refused = 0

    def _req(self, method: str, path: str, json: Any = None, **kw: Any) -> Any:
        if method == "POST" and path.startswith("/sessions/") and isinstance(json, dict) and "max_gpus_per_node" in json:
            OlderServer.refused += 1
            raise APIError(method, path, 422, [{"loc": ["body", "max_gpus_per_node"], "msg": "unknown field"}])
        return super()._req(method, path, json=json, **kw)


def test_a_gpuless_launcher_leases_from_a_server_older_than_the_gpu_filter(server: Server) -> None:
    """A launcher whose nodes have no GPU asks the server to hold back GPU jobs. A server older than
    that filter refuses the field (422): the request was resent as 'lost' on every call for the
    launcher's whole idle time, and it ran nothing. It now drops the filter once, with a warning."""
    ids = server.runnable(3)
    lease = JobLease(OlderServer(server.tc), server.site_id, heartbeat_thread=False)
    OlderServer.refused = 0
    try:
        rows = lease.acquire(10, max_gpus_per_node=0)
        assert sorted(r["id"] for r in rows) == sorted(ids) and OlderServer.refused == 1
        assert lease.pending is None
        assert lease.acquire(10, max_gpus_per_node=0) == [] and OlderServer.refused == 1  # not sent again
    finally:
        lease.close()


def test_an_acquire_the_server_refuses_is_not_resent_as_lost(server: Server) -> None:
    lease = JobLease(server.client, server.site_id, heartbeat_thread=False)
    try:
        with pytest.raises(APIError) as info:
            lease.acquire(10, max_gpus_per_node=-1)  # refused: must be between 0 and 1e9
        assert info.value.status_code == 422 and lease.pending is None
        assert lease.acquire(10) == []  # a new request, not the refused one again
    finally:
        lease.close()
