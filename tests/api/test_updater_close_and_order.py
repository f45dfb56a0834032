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
