"""The status updater's close() against a real server whose calls fail now and then: it ends within
``close_timeout`` and spools the rest, and a job's updates reach the server in the order they were
put, across the spool and its replay.

Before: (1) each call got its own ``close_timeout`` from its first failure, so calls that failed
once and then went through, one after another, kept close() going (30 such calls with a
close_timeout of 1 s: close() ran out its 31 s join, spooled what it held, and its thread went on
sending it: applied and spooled); (2) once a call was given up and spooled at close(), the next
call went out as any: a job's RUN_DONE queued behind its spooled RUNNING reached the server first
(refused there: PREPROCESSED to RUN_DONE, and dropped), and the replay then made the job RUNNING
for good, its return code lost.

And (review of that change): close() that stopped waiting for its thread spooled what it held, and
the thread went on and spooled it again; a give-up in the middle of isolating a refused call spooled
the updates of it already applied; a healthy but slow server had its updates spooled at
``close_timeout`` (while no call fails, close() now sends for 30 s more); a launcher's rewrite of a
spool file sent in part re-created a file the site agent had replayed meanwhile (spool files are
now claimed by one process at a time, and a dead process's claim taken back).

Real components: a uvicorn server (SQLite; PostgreSQL too) behind the failure-injecting proxy of
tests/failure_proxy.py, the real RESTClient, BulkStatusUpdater and SpoolReplayer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from failure_proxy import FailureProxy, job_maker, job_moves, wait_until  # tests/failure_proxy.py

from balsam.client import status_updater
from balsam.client.rest import RESTClient
from balsam.client.status_updater import BulkStatusUpdater, SpoolReplayer, write_spool

LOGGER = "balsam.client.status_updater"
#: A generous bound on close() (close_timeout is 1 s in these tests; a call sent while closing waits
#: 5 s at most past it): the point is that it does not grow with the number of calls (it took 31 s).
CLOSE_BOUND_SEC = 20.0


@pytest.fixture
def proxy(env: Any) -> Iterator[FailureProxy]:
    failing = FailureProxy(env.url)
    yield failing
    failing.close()


@pytest.fixture
def jobs(env: Any, tmp_path: Path) -> Callable[..., list[int]]:
    """``jobs(n, state="PREPROCESSED")``: ids of ``n`` new jobs of the test user (failure_proxy.job_maker)."""
    return job_maker(env, tmp_path, "upd")


def _jobs(env: Any, ids: list[int]) -> dict[int, Any]:
    client = RESTClient(env.url, env.token)
    return {job.id: job for job in client.Job.objects.filter(id=ids)}


def _spooled(spool: Path) -> list[tuple[int, str]]:
    """The spooled updates, in the order a replay sends them (files by name, lines in order)."""
    return [(u["id"], u["state"]) for f in sorted(spool.glob("*.jsonl"))
            for u in map(json.loads, f.read_text().splitlines())]


def _replay(env: Any, proxy: FailureProxy, spool: Path, expected: int) -> BulkStatusUpdater:
    """The site agent's replay of ``spool`` (as processing.py does it), the proxy failing nothing now."""
    proxy.flaky, proxy.fail_when = {}, None
    replay = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        assert SpoolReplayer(spool, replay).poll() == expected
        assert replay.flush(60)
    finally:
        replay.close()
    return replay


def test_close_ends_within_close_timeout_while_calls_fail_and_go_through_in_turn(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ids = jobs(30)
    proxy.flaky = {job_id: 2 for job_id in ids}  # each job's call fails twice (500), then goes through
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, max_batch=1, close_timeout=1,
                                spool_dir=spool)
    for job_id in ids:
        updater.put(job_id, "RUNNING")
    assert wait_until(lambda: len(proxy.patches) >= 1)
    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        updater.close()
    took = time.monotonic() - began
    assert took < CLOSE_BOUND_SEC, took  # was 31 s: the join ran out
    assert not any("did not finish within" in r.getMessage() for r in caplog.records), caplog.text
    assert not updater._thread.is_alive()
    assert updater.gave_up and updater.spooled > 0
    # Each job's update went through or is in the spool, not both (the thread went on sending
    # what close() had spooled); the replay sends the rest, each applied once.
    sent = [ids_of[0] for _at, ids_of, _key, status, _asked in proxy.patches if status == 200]
    spooled = [job_id for job_id, _state in _spooled(spool)]
    assert sorted(sent + spooled) == sorted(ids), (sent, spooled)
    replay = _replay(env, proxy, spool, len(spooled))
    assert replay.dropped_count == 0, replay.dropped
    assert {job.state.value for job in _jobs(env, ids).values()} == {"RUNNING"}
    for job_id in ids:
        assert job_moves(env, job_id).count(("PREPROCESSED", "RUNNING")) == 1, job_id


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "in-a-side-call"])
def test_a_jobs_later_update_never_reaches_the_server_before_its_spooled_earlier_one(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path, beside: bool) -> None:
    # The job's RUNNING fails every time (a server fault of its data, fixed later); its RUN_DONE is
    # put meanwhile. ``beside``: another job's call fails first, and the job's updates go out in
    # side calls beside it (after its third failure).
    job, other = jobs(2)
    failing = {job, other} if beside else {job}
    proxy.fail_when = lambda updates: any(u["id"] in failing and u.get("state") == "RUNNING" for u in updates)
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=spool)
    try:
        if beside:
            updater.put(other, "RUNNING")
            assert wait_until(lambda: len(proxy.patches) >= 1)
        updater.put(job, "RUNNING")
        assert wait_until(lambda: any(job in ids for _at, ids, *_rest in proxy.patches), 60)
        updater.put(job, "RUN_DONE", return_code=7)
    finally:
        updater.close()
    # Nothing of the job reached the server: its RUN_DONE waited behind its RUNNING, into the spool.
    assert {status for _at, ids, _key, status, _asked in proxy.patches if job in ids} == {500}, proxy.patches
    assert _jobs(env, [job])[job].state.value == "PREPROCESSED"
    spooled = _spooled(spool)
    assert [u for u in spooled if u[0] == job] == [(job, "RUNNING"), (job, "RUN_DONE")], spooled
    # The agent replays them once the server is fixed: in order, each applied once, nothing lost.
    replay = _replay(env, proxy, spool, len(spooled))
    assert replay.dropped_count == 0, replay.dropped
    done = _jobs(env, [job])[job]
    assert done.state.value == "RUN_DONE" and done.return_code == 7
    moves = job_moves(env, job)
    assert moves.count(("PREPROCESSED", "RUNNING")) == 1 and moves.count(("RUNNING", "RUN_DONE")) == 1, moves


def test_spool_files_sort_in_the_order_they_were_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A replay sends spool files in name order. Two files named from one clock reading (a coarse
    # clock, or one stepped back) had the same name: the second replaced the first (its updates lost).
    monkeypatch.setattr(status_updater.time, "time_ns", lambda: 1_000_000_000_000_000_000)
    written = [write_spool(tmp_path, [{"id": i, "state": "RUNNING"}]) for i in range(3)]
    assert sorted(tmp_path.glob("*.jsonl")) == written
    assert [json.loads(p.read_text())["id"] for p in written] == [0, 1, 2]


def test_a_spool_file_sent_in_part_by_its_launcher_keeps_only_the_rest_for_the_agent(
        env: Any, proxy: FailureProxy, jobs: Callable[[int], list[int]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The launcher's lease close sends its spool once more (send_spooled): the first call goes
    # through, the next fails. The whole file was left for the agent, whose replay then sent the
    # updates of the first call again, after their jobs' later ones: refused (RUNNING after RUN_DONE).
    from balsam.client.status_updater import _note_spooled, api_of, send_spooled

    job, other = jobs(2)
    monkeypatch.setattr(status_updater, "MAX_ITEMS_PER_BULK_OP", 2)  # one call per two updates
    spool = tmp_path / "spool"
    client = RESTClient(proxy.url, env.token)
    path = write_spool(spool, [{"id": job, "state": "RUNNING"}, {"id": other, "state": "RUNNING"},
                               {"id": job, "state": "RUN_DONE", "return_code": 7}])
    session_id = 10**9  # the file as a launcher's updater notes it for its lease's close
    _note_spooled(path, [{"id": job, "session_id": session_id}], api_of(client))
    proxy.fail_when = lambda updates: any(u.get("state") == "RUN_DONE" for u in updates)
    try:
        assert send_spooled(client, session_id) is False
    finally:
        status_updater._forget_spooled(path)  # this process's note, not the test's concern after this
    assert _spooled(spool) == [(job, "RUN_DONE")]
    replay = _replay(env, proxy, spool, 1)
    assert replay.dropped_count == 0, replay.dropped  # was 2: both RUNNINGs again, refused
    done = _jobs(env, [job, other])
    assert (done[job].state.value, done[job].return_code, done[other].state.value) == ("RUN_DONE", 7, "RUNNING")
    moves = job_moves(env, job)
    assert moves.count(("PREPROCESSED", "RUNNING")) == 1 and moves.count(("RUNNING", "RUN_DONE")) == 1, moves


def test_close_that_stops_waiting_for_its_thread_spools_each_update_once(
        env: Any, proxy: FailureProxy, jobs: Callable[..., list[int]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A call in flight when close() began (sent without a deadline) outlasts close()'s wait for the
    # thread: close() spools what the thread holds. The thread went on once the call's answer came,
    # and spooled the job queued behind it a second time (the real wait is 36 s: shortened here).
    monkeypatch.setattr(status_updater, "CLOSE_JOIN_EXTRA_SEC", 0.5)
    monkeypatch.setattr(status_updater, "CLOSING_CALL_WAIT_SEC", 0.5)
    held, queued = jobs(2)
    proxy.hold_ids = {held}  # its call waits in the proxy until released
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05, close_timeout=1,
                                spool_dir=spool)
    updater.put(held, "RUNNING")
    assert proxy.holding.wait(30)
    updater.put(queued, "RUNNING")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        updater.close()
    assert any("did not finish within" in r.getMessage() for r in caplog.records), caplog.text
    at_close = sorted(spool.glob("*.jsonl"))
    proxy.release.set()  # the call's answer comes: applied
    assert wait_until(lambda: not updater._thread.is_alive(), 60)
    assert sorted(spool.glob("*.jsonl")) == at_close  # the thread wrote nothing after close()
    # Both in the spool once: the held call's update too (it was applied: unavoidable, a no-op replay).
    assert sorted(_spooled(spool)) == sorted([(held, "RUNNING"), (queued, "RUNNING")]), _spooled(spool)
    assert _jobs(env, [held])[held].state.value == "RUNNING"
    assert updater.done_through(2)


def test_a_give_up_while_isolating_a_refused_call_spools_only_what_did_not_go_through(
        env: Any, proxy: FailureProxy, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # One call: job b's RUNNING and job a's RUNNING and RUN_DONE; a is FAILED (its updates refused,
    # 409 naming it). The call fails once after close() began (the give-up is then close_timeout
    # after it), is refused, b's update goes alone and is applied, its answer late, past the give-up:
    # a's updates are given up. The whole call was spooled, b's applied update with them.
    (b,) = jobs(1)
    (a,) = jobs(1, "FAILED")
    proxy.flaky = {b: 1}
    proxy.slow_when = lambda updates: 2.0 if [u["id"] for u in updates] == [b] else 0
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=5, close_timeout=1, spool_dir=spool)
    updater.put(b, "RUNNING")
    updater.put(a, "RUNNING")
    updater.put(a, "RUN_DONE", return_code=0)
    updater.close()  # the thread sends now (its window is 5 s)
    assert [ids for _at, ids, *_rest in proxy.patches][:3] == [[b, a, a], [b, a, a], [b]], proxy.patches
    assert updater.gave_up
    assert _spooled(spool) == [(a, "RUNNING"), (a, "RUN_DONE")]  # was b's RUNNING too
    assert _jobs(env, [b])[b].state.value == "RUNNING"
    assert job_moves(env, b).count(("PREPROCESSED", "RUNNING")) == 1


def test_a_healthy_slow_server_gets_every_update_at_close(
        env: Any, proxy: FailureProxy, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # Every call answered, each late: close() gives up close_timeout after it began only once a call
    # has failed since; until then it sends for CLOSE_JOIN_EXTRA_SEC more. The updates of a server
    # that answered every call were spooled at close_timeout.
    ids = jobs(6)
    proxy.slow_when = lambda updates: 0.5  # six calls (max_batch=1): 3 s, more than close_timeout
    spool = tmp_path / "spool"
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=5, max_batch=1, close_timeout=1,
                                spool_dir=spool)
    for job_id in ids:
        updater.put(job_id, "RUNNING")
    updater.close()
    assert (updater.spooled, updater.gave_up, updater.sent) == (0, False, len(ids))
    assert not list(spool.glob("*.jsonl"))
    assert {job.state.value for job in _jobs(env, ids).values()} == {"RUNNING"}


class _AgentCycleBeforeSecondCall(RESTClient):
    """A launcher's client whose second call goes out after ``meanwhile()`` (the agent's cycle) ran."""

    calls = 0
    meanwhile: Callable[[], None] = staticmethod(lambda: None)

    def patch(self, path: str, json: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls += 1
        if self.calls == 2:
            self.meanwhile()
        return super().patch(path, json=json, **kwargs)


def test_a_spool_file_being_sent_by_its_launcher_is_not_replayed_by_the_agent_meanwhile(
        env: Any, proxy: FailureProxy, jobs: Callable[..., list[int]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The launcher's send_spooled sends a file in two calls, the second failing; the agent's cycle
    # runs between them. It replayed the whole file (and deleted it); the launcher then rewrote the
    # file with its unsent rest: re-created, replayed again, refused. Now the launcher claims the
    # file first: the agent skips it, and replays only the rest once the launcher gives it back.
    from balsam.client.status_updater import _forget_spooled, _note_spooled, api_of, send_spooled

    job, other = jobs(2)
    monkeypatch.setattr(status_updater, "MAX_ITEMS_PER_BULK_OP", 2)
    spool = tmp_path / "spool"
    path = write_spool(spool, [{"id": job, "state": "RUNNING"}, {"id": other, "state": "RUNNING"},
                               {"id": job, "state": "RUN_DONE", "return_code": 7}])
    client = _AgentCycleBeforeSecondCall(proxy.url, env.token)
    _note_spooled(path, [{"id": job, "session_id": 10**9}], api_of(client))
    proxy.fail_when = lambda updates: any(u.get("state") == "RUN_DONE" for u in updates)
    agent = BulkStatusUpdater(RESTClient(env.url, env.token), max_wait_sec=0.05)
    replayer = SpoolReplayer(spool, agent)
    queued_meanwhile: list[int] = []
    client.meanwhile = lambda: queued_meanwhile.append(replayer.poll()) or agent.flush(30)
    try:
        assert send_spooled(client, 10**9) is False
        assert queued_meanwhile == [0]  # was 3: the whole file, the launcher sending it too
        assert _spooled(spool) == [(job, "RUN_DONE")]
        assert replayer.poll() == 1
        assert agent.flush(60)
        replayer.poll()
    finally:
        _forget_spooled(path)
        agent.close()
    assert agent.dropped_count == 0, agent.dropped
    assert not list(spool.iterdir())
    done = _jobs(env, [job])[job]
    assert (done.state.value, done.return_code) == ("RUN_DONE", 7)
    moves = job_moves(env, job)
    assert moves.count(("PREPROCESSED", "RUNNING")) == 1 and moves.count(("RUNNING", "RUN_DONE")) == 1, moves


def test_the_agent_takes_back_a_claim_whose_process_is_gone(tmp_path: Path) -> None:
    # A process that claimed a spool file (renamed it <name>.claimed-<host>-<pid>) to send it and
    # died would strand it. The agent's replay takes it back: at once when it was of this host and
    # its pid is gone, else once the claim is CLAIM_STALE_SEC old; a fresh claim of another host is
    # left alone, and so are the later files of the same writer (they go after it, in order).
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
    busy = write_spool(tmp_path, [{"id": 2, "state": "RUNNING"}])
    old = write_spool(tmp_path, [{"id": 3, "state": "RUNNING"}])
    os.rename(dead, f"{dead}.claimed-{socket.gethostname()}-{ended.pid}")
    busy_claim = Path(f"{busy}.claimed-login9.example.org-4242")
    os.rename(busy, busy_claim)
    os.rename(old, f"{old}.claimed-login9.example.org-4343")
    long_ago = time.time() - 16 * 60
    os.utime(f"{old}.claimed-login9.example.org-4343", (long_ago, long_ago))
    sent: list[int] = []
    updater = BulkStatusUpdater(send=lambda chunk: sent.extend(u["id"] for u in chunk), max_wait_sec=0.01)
    replayer = SpoolReplayer(tmp_path, updater)
    try:
        assert replayer.poll() == 1  # the dead one's; the stale one taken back but after the busy one
        assert updater.flush(30)
        assert sent == [1]
        assert old.exists() and busy_claim.exists()
        os.rename(busy_claim, busy)  # its claimer gives it back
        assert replayer.poll() == 2
        assert updater.flush(30)
        replayer.poll()
    finally:
        updater.close()
    assert sent == [1, 2, 3]
    assert not list(tmp_path.iterdir())


def test_the_agent_at_its_stop_deletes_the_files_it_sent_and_gives_back_the_others(tmp_path: Path) -> None:
    # The agent's replay claims the files it sends; at its stop (its updater closed) the files
    # sent, or spooled anew by that close, are deleted, and any other goes back under its own name
    # for the next agent (else it would wait for the claim to be taken back).
    sent = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
    calls: list[int] = []
    updater = BulkStatusUpdater(send=lambda chunk: calls.extend(u["id"] for u in chunk), max_wait_sec=0.01)
    replayer = SpoolReplayer(tmp_path, updater)
    assert replayer.poll() == 1
    updater.close()
    replayer.release()
    assert calls == [1] and not sent.exists() and not list(tmp_path.iterdir())

    unsent = write_spool(tmp_path, [{"id": 2, "state": "RUNNING"}])
    slow = BulkStatusUpdater(send=lambda chunk: None, max_wait_sec=60)  # nothing sent before release()
    replayer = SpoolReplayer(tmp_path, slow)
    try:
        assert replayer.poll() == 1 and not unsent.exists()
        replayer.release()
        assert sorted(tmp_path.iterdir()) == [unsent]
    finally:
        slow.close()


# Review of the spool claims (5697a4b): a claim stranded on another host waited 15 min, past the
# Session's expiry; a claim lost in the middle of a poll let a writer's later file go first; a claim
# was kept on KeyboardInterrupt; a live local claimer lost its claim at 15 min and its late give-back
# re-created a replayed file; an NFS rename reported ENOENT though done; a claim under the agent's
# own pid that it did not hold was never taken back; close()'s give-up line named the wrong time.

def _claim_as(path: Path, tag: str, age_sec: float = 0.0) -> Path:
    """Rename spool file ``path`` as claimed by ``tag`` (``<host>-<pid>``, ``agent_<host>-<pid>``), ``age_sec`` old."""
    claim = Path(f"{path}{status_updater.CLAIM_MARK}{tag}")
    os.rename(path, claim)
    if age_sec:
        then = time.time() - age_sec
        os.utime(claim, (then, then))
    return claim


def _replay_once(spool: Path) -> list[tuple[int, str]]:
    """What one poll of the agent's replay of ``spool`` sends: (id, state) in order."""
    replayer, updater, sent = _recording_replayer(spool)
    try:
        replayer.poll()
        assert updater.flush(30)
    finally:
        updater.close()
    return sent


def _recording_replayer(spool: Path) -> tuple[SpoolReplayer, BulkStatusUpdater, list[tuple[int, str]]]:
    sent: list[tuple[int, str]] = []
    updater = BulkStatusUpdater(send=lambda chunk: sent.extend((u["id"], u["state"]) for u in chunk),
                                max_wait_sec=0.01)
    return SpoolReplayer(spool, updater), updater, sent


def test_a_launcher_claim_stranded_on_another_host_is_replayed_while_its_session_holds_the_job(
        env: Any, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # A launcher on a compute node killed (wall time) inside send_spooled leaves its claim. The
    # agent took it back after 15 min, the Session long expired (300 s): RUN_DONE refused, the job
    # ran again. A live claimer refreshes its claim before each call now, so a claim 2 min old is
    # of one gone: taken back, and the RUN_DONE applied under the launcher's still-live Session.
    from balsam.client.lease import JobLease

    client = RESTClient(env.url, env.token)
    job, = jobs(1)
    site_id = client.Job.objects.get(id=job).app_id  # the job's app, to find its site
    site_id = client.get(f"/apps/{site_id}")["site_id"]
    lease = JobLease(client, site_id, heartbeat_thread=False)
    try:
        assert [j["id"] for j in lease.acquire(1)] == [job]
        launcher = BulkStatusUpdater(client, max_wait_sec=0.05, session_id=lease.session_id)
        launcher.put(job, "RUNNING")
        launcher.close()
        spool = tmp_path / "spool"
        path = write_spool(spool, [{"id": job, "state": "RUN_DONE", "return_code": 7, "session_id": lease.session_id}])
        _claim_as(path, "cn042.cluster-31337", age_sec=120)  # killed 2 min ago
        agent = BulkStatusUpdater(client, max_wait_sec=0.05)
        try:
            assert SpoolReplayer(spool, agent).poll() == 1
            assert agent.flush(30)
        finally:
            agent.close()
        assert agent.dropped_count == 0, agent.dropped
        done = _jobs(env, [job])[job]
        assert (done.state.value, done.return_code) == ("RUN_DONE", 7)
    finally:
        lease._stop.set()


def test_an_agent_claim_it_does_not_hold_is_taken_back_at_once_and_a_fresh_launcher_claim_is_not(tmp_path: Path) -> None:
    # The agent killed -9 left its claims; its successor (one agent per site: its lock) may start on
    # another login node: it takes them all back at once. A launcher's fresh claim on another host
    # is left alone, and so is the later file of that writer.
    agents = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
    launchers = write_spool(tmp_path, [{"id": 2, "state": "RUNNING"}], )
    _claim_as(agents, "agent_login2.example.org-999.1765000000000", age_sec=5)
    _claim_as(launchers, "cn042.cluster-31337", age_sec=5)
    replayer, updater, sent = _recording_replayer(tmp_path)
    try:
        assert replayer.poll() == 1
        assert updater.flush(30)
    finally:
        updater.close()
    assert sent == [(1, "RUNNING")]


def test_claims_are_refreshed_by_their_holders_and_spooled_calls_have_a_deadline(tmp_path: Path) -> None:
    # A launcher's send_spooled refreshes its claim before each call, and each call has a deadline
    # under CLAIM_STALE_SEC; the agent's replay refreshes the claims it holds at each poll.
    from balsam.client.status_updater import CLAIM_STALE_SEC, _forget_spooled, _note_spooled, send_spooled

    path = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE", "session_id": 77}])
    _note_spooled(path, [{"id": 1, "session_id": 77}], None)
    seen: list[tuple[float, Any]] = []

    class Client:
        def patch(self, *args: Any, **kwargs: Any) -> None:
            claim, = tmp_path.glob("*.claimed-*")
            seen.append((time.time() - claim.stat().st_mtime, kwargs.get("deadline")))

    try:
        assert send_spooled(Client(), 77)
    finally:
        _forget_spooled(path)
    (age, deadline), = seen
    assert age < 5 and deadline is not None and deadline - time.monotonic() < CLAIM_STALE_SEC

    write_spool(tmp_path, [{"id": 2, "state": "RUNNING"}])
    held = BulkStatusUpdater(send=lambda chunk: None, max_wait_sec=60)  # nothing sent: the claim stays held
    replayer = SpoolReplayer(tmp_path, held)
    try:
        assert replayer.poll() == 1
        claim, = tmp_path.glob("*.claimed-*")
        then = time.time() - 10 * 60
        os.utime(claim, (then, then))
        replayer.poll()
        assert time.time() - claim.stat().st_mtime < 60
        replayer.release()
    finally:
        held.close()


def test_a_claim_lost_to_a_launcher_during_a_poll_holds_back_the_writers_later_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The poll listed the claims, then claimed file by file: a launcher claiming F1 in between made
    # the agent skip F1 and send F2 (RUN_DONE before RUNNING: refused, the job left RUNNING).
    f1 = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
    f2 = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE"}])
    launcher_claim = Path(f"{f1}{status_updater.CLAIM_MARK}cn042.cluster-31337")
    real_claim = status_updater.claim_spool_file

    def racing_claim(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == f1 and f1.exists():
            os.rename(f1, launcher_claim)  # the launcher's send_spooled claims F1 just now
        return real_claim(path, *args, **kwargs)

    monkeypatch.setattr(status_updater, "claim_spool_file", racing_claim)
    replayer, updater, sent = _recording_replayer(tmp_path)
    try:
        assert replayer.poll() == 0
        assert updater.flush(30) and sent == []
        assert f2.exists()
        launcher_claim.unlink()  # the launcher sent F1
        assert replayer.poll() == 1
        assert updater.flush(30)
    finally:
        updater.close()
    assert sent == [(1, "RUN_DONE")]


def test_send_spooled_gives_its_claim_back_when_interrupted(tmp_path: Path) -> None:
    from balsam.client.status_updater import _forget_spooled, _note_spooled, send_spooled

    path = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE", "session_id": 78}])
    _note_spooled(path, [{"id": 1, "session_id": 78}], None)

    class Client:
        def patch(self, *args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            send_spooled(Client(), 78)
    finally:
        _forget_spooled(path)
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_live_claimer_on_this_host_keeps_its_claim_and_a_reused_pid_does_not(tmp_path: Path) -> None:
    # A local claimer that still runs lost its claim once 15 min old (both sent the file); a claim
    # whose pid now runs another process (started at another time than the claim names) is of one
    # gone: taken back at once.
    from balsam.process_identity import process_start_time

    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert wait_until(lambda: process_start_time(busy.pid) is not None)
        started_ms = int(process_start_time(busy.pid) * 1000)
        live = write_spool(tmp_path / "live", [{"id": 1, "state": "RUNNING"}])
        reused = write_spool(tmp_path / "reused", [{"id": 2, "state": "RUNNING"}])
        host = socket.gethostname()
        _claim_as(live, f"{host}-{busy.pid}.{started_ms}", age_sec=16 * 60)
        _claim_as(reused, f"{host}-{busy.pid}.{started_ms - 3_600_000}", age_sec=5)
        for spool, expected in (("live", []), ("reused", [(2, "RUNNING")])):
            sent = _replay_once(tmp_path / spool)
            assert sent == expected, spool
    finally:
        busy.kill()
        busy.wait()


def test_a_give_back_after_the_claim_was_taken_back_does_not_recreate_the_file(tmp_path: Path) -> None:
    # The agent took a claim back (stale), replayed the file and deleted it; the claimer's late
    # give-back of its unsent rest re-created it (sent twice). Now the give-back renames the claim
    # first: gone, the rest is dropped.
    from balsam.client.status_updater import release_spool_file

    path = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}, {"id": 1, "state": "RUN_DONE"}])
    claim = _claim_as(path, "cn042.cluster-31337", age_sec=16 * 60)
    replayer, updater, sent = _recording_replayer(tmp_path)
    try:
        assert replayer.poll() == 2
        assert updater.flush(30)
        replayer.poll()
        assert not list(tmp_path.iterdir())
        release_spool_file(claim, [{"id": 1, "state": "RUN_DONE"}])  # the claimer, late
        assert not list(tmp_path.iterdir())
        assert replayer.poll() == 0
    finally:
        updater.close()
    assert sent == [(1, "RUNNING"), (1, "RUN_DONE")]


def test_a_claim_rename_reported_enoent_though_done_is_still_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NFS: a rename whose reply was lost is sent again; the second answers ENOENT though the first
    # was done. send_spooled said "being sent by another process" and left its own claim stranded.
    from balsam.client.status_updater import _forget_spooled, _note_spooled, send_spooled

    path = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE", "session_id": 79}])
    _note_spooled(path, [{"id": 1, "session_id": 79}], None)
    real_rename = os.rename

    def nfs_rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        if status_updater.CLAIM_MARK in str(dst) and not str(dst).endswith(".giveback"):  # the claim
            raise FileNotFoundError(2, "No such file or directory (retransmitted RENAME)")

    monkeypatch.setattr(status_updater.os, "rename", nfs_rename)
    calls: list[Any] = []

    class Client:
        def patch(self, *args: Any, **kwargs: Any) -> None:
            calls.append(kwargs.get("json"))

    try:
        assert send_spooled(Client(), 79)
    finally:
        _forget_spooled(path)
    assert calls == [[{"id": 1, "state": "RUN_DONE", "session_id": 79}]]
    assert not list(tmp_path.iterdir())


def test_a_claim_under_the_agents_own_pid_that_it_does_not_hold_is_taken_back(tmp_path: Path) -> None:
    # Left by an earlier process given the same pid (a reboot), or a give-back that failed: it was
    # "never stale" and held back the writer's later files for the agent's whole life.
    f1 = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
    write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE"}])
    _claim_as(f1, f"{socket.gethostname()}-{os.getpid()}", age_sec=60 * 60)
    replayer, updater, sent = _recording_replayer(tmp_path)
    try:
        assert replayer.poll() == 2
        assert updater.flush(30)
        replayer.poll()
    finally:
        updater.close()
    assert sent == [(1, "RUNNING"), (1, "RUN_DONE")]
    assert not list(tmp_path.iterdir())


def test_close_giving_up_on_a_slow_server_that_answers_says_which_time_ran_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A healthy slow server gets close_timeout + CLOSE_JOIN_EXTRA_SEC; the give-up line said
    # "close_timeout (5 s) ran out" at 35 s.
    monkeypatch.setattr(status_updater, "CLOSE_JOIN_EXTRA_SEC", 0.5)
    slow = BulkStatusUpdater(send=lambda chunk: time.sleep(0.3), max_batch=1, max_wait_sec=0.01,
                             close_timeout=0.2, spool_dir=tmp_path)
    for job in range(1, 9):
        slow.put(job, "RUNNING")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        slow.close()
    assert slow.spooled
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert gave_up and all("0.5 s for a slow server that answered every call" in line for line in gave_up), gave_up


def test_close_ends_a_slow_servers_extra_time_by_the_time_it_is_given(tmp_path: Path) -> None:
    # A launcher passes its allocation's end: the 30 s more a healthy slow server gets (close()
    # ran 36 s with a close_timeout of 5 s) end there, never before close_timeout.
    slow = BulkStatusUpdater(send=lambda chunk: time.sleep(0.3), max_batch=1, max_wait_sec=0.01,
                             close_timeout=0.2, spool_dir=tmp_path)
    for job in range(1, 9):
        slow.put(job, "RUNNING")
    slow.close(extra_until=time.monotonic())
    assert slow.gave_up and slow.spooled


def test_send_spooled_stops_when_the_agent_took_its_claim_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent found the claim stale and took it back between two calls: the launcher went on
    # sending what the agent now replays too. It checks its claim before each call now, stops, and
    # leaves the whole file to the agent (the Session is not ended: False).
    from balsam.client.status_updater import _forget_spooled, _note_spooled, send_spooled

    monkeypatch.setattr(status_updater, "MAX_ITEMS_PER_BULK_OP", 1)
    updates = [{"id": 1, "state": "RUNNING", "session_id": 80}, {"id": 1, "state": "RUN_DONE", "session_id": 80}]
    path = write_spool(tmp_path, updates)
    _note_spooled(path, updates, None)
    calls: list[Any] = []

    class Client:
        def patch(self, *args: Any, **kwargs: Any) -> None:
            calls.append(kwargs.get("json"))
            claim, = tmp_path.glob("*.claimed-*")
            os.rename(claim, path)  # the agent's take-back

    try:
        assert send_spooled(Client(), 80) is False
    finally:
        _forget_spooled(path)
    assert calls == [updates[:1]]
    assert sorted(tmp_path.iterdir()) == [path]
    assert [json.loads(line) for line in path.read_text().splitlines()] == updates


def test_an_old_format_claim_on_this_host_whose_pid_runs_another_process_is_taken_back_once_stale(
        tmp_path: Path) -> None:
    # A claim of the previous version names no start time (`<file>.claimed-<host>-<pid>`). After a
    # reboot or pid reuse its pid may run another, long-lived process: read as a live claimer, it
    # held the file and the writer's later ones for as long as that process ran.
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        first = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}])
        later = write_spool(tmp_path, [{"id": 1, "state": "RUN_DONE"}])
        assert sorted([first.name, later.name]) == [first.name, later.name]
        host = socket.gethostname()
        _claim_as(first, f"{host}-{busy.pid}", age_sec=status_updater.CLAIM_STALE_SEC + 60)
        sent = _replay_once(tmp_path)
        assert sent == [(1, "RUNNING"), (1, "RUN_DONE")]
    finally:
        busy.kill()
        busy.wait()


def test_a_give_backs_temporary_file_is_no_claim(tmp_path: Path) -> None:
    # A launcher killed while writing the rest of a file it gives back leaves `.<claim>.tmp`: taken
    # for a claim, the agent replayed that partial rest ahead of the whole file (RUN_DONE first).
    spool = write_spool(tmp_path, [{"id": 1, "state": "RUNNING"}, {"id": 1, "state": "RUN_DONE"}])
    private = Path(f"{spool}{status_updater.CLAIM_MARK}cn01-4242.1733000000000.giveback")
    os.rename(spool, private)
    tmp = private.with_name(f".{private.stem}.tmp")
    tmp.write_text(json.dumps({"id": 1, "state": "RUN_DONE"}) + "\n")
    then = time.time() - status_updater.CLAIM_STALE_SEC - 30
    for path in (private, tmp):
        os.utime(path, (then, then))
    sent = _replay_once(tmp_path)
    assert sent == [(1, "RUNNING"), (1, "RUN_DONE")]
