"""A job's spooled updates written by two processes are replayed in the order their states were reached.

Spool files sort by host, pid, then time: the files of one writer replay in the order it wrote
them, but a job's updates can be spooled by two writers (serial mode's master and workers, a
launcher and its successor, two partitions), and a replay that sent the files in name order sent
one writer's RUN_DONE before the other's RUNNING: the RUN_DONE was refused (409), the RUNNING
applied, the job left RUNNING, its return code lost. The replay now orders each job's updates by
their ``state_timestamp`` across all the files of one pass (still one bulk call), and holds back
a file with a later update of a job whose earlier update is in a file another process is sending
(claimed); a launcher's lease close (``send_spooled``) leaves such a file to the agent's replay.

Real server (SQLite and PostgreSQL), real RESTClient and BulkStatusUpdater; the spool files are
written by ``write_spool`` and named as the two writers' (``unsent-<host>-<pid>-<time>.jsonl``).
Where only the order sent matters, a BulkStatusUpdater without a server records what it sends.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from balsam.client import status_updater
from balsam.client.rest import RESTClient
from balsam.client.status_updater import (BulkStatusUpdater, SpoolReplayer, claim_spool_file, release_spool_file,
                                          send_spooled, spool_prefix, write_spool)
from failure_proxy import FailureProxy, job_maker, job_moves  # tests/failure_proxy.py

T0 = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def jobs(env: Any, tmp_path: Path) -> Callable[..., list[int]]:
    return job_maker(env, tmp_path, "spoolorder")


@pytest.fixture
def proxy(env: Any) -> Iterator[FailureProxy]:
    counting = FailureProxy(env.url)  # forwards everything: counts the PATCHes
    yield counting
    counting.close()


def update(job_id: int, state: str, at_sec: float, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "state": state, "state_timestamp": (T0 + dt.timedelta(seconds=at_sec)).isoformat(), **fields}


def spool_as(spool: Path, pid: int, updates: list[dict[str, Any]], host: str = "") -> Path:
    """A spool file as process ``pid`` of this host (or ``host``) writes it."""
    written = write_spool(spool, updates)
    named = spool / written.name.replace(spool_prefix(socket.gethostname(), os.getpid()),
                                         spool_prefix(host or socket.gethostname(), pid))
    os.rename(written, named)
    return named


def assert_ran_once(env: Any, job_id: int) -> None:
    """The job went PREPROCESSED -> RUNNING -> RUN_DONE once each (its events sort by the replayed
    state_timestamps, minutes before its creation's: compared by count)."""
    made = job_moves(env, job_id)
    assert made.count(("PREPROCESSED", "RUNNING")) == 1 and made.count(("RUNNING", "RUN_DONE")) == 1, made


def replay(spool: Path, updater: BulkStatusUpdater) -> int:
    """One poll of the agent's replay through ``updater`` and its flush, then the poll that deletes
    the files sent; ``updater`` is closed after. Returns the first poll's count."""
    try:
        replayer = SpoolReplayer(spool, updater)
        polled = replayer.poll()
        assert updater.flush(60)
        replayer.poll()
    finally:
        updater.close()
    return polled


def states(env: Any, ids: list[int]) -> list[str]:
    rows = RESTClient(env.url, env.token).get("/jobs/", params={"id": ids, "limit": 100})["results"]
    by_id = {r["id"]: r for r in rows}
    return [by_id[i]["state"] for i in ids]


def test_a_jobs_updates_spooled_by_two_writers_are_replayed_in_state_order_in_one_call(
        env: Any, proxy: FailureProxy, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    a, b, c = jobs(3)
    spool = tmp_path / "spool"
    # The writer whose name sorts first ("-10-" before "-9-") holds the later updates of a and b.
    spool_as(spool, 9, [update(a, "RUNNING", 1), update(b, "RUNNING", 2), update(c, "RUNNING", 3)])
    spool_as(spool, 10, [update(b, "RUN_DONE", 20, return_code=0), update(a, "RUN_DONE", 10, return_code=3),
                         update(c, "RUN_DONE", 30, return_code=0)])
    updater = BulkStatusUpdater(RESTClient(proxy.url, env.token), max_wait_sec=0.05)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 6
        assert updater.flush(60)
        assert replayer.poll() == 0  # deletes the files sent
    finally:
        updater.close()
    assert updater.dropped_count == 0, updater.dropped
    assert states(env, [a, b, c]) == ["RUN_DONE"] * 3
    rows = RESTClient(env.url, env.token).get("/jobs/", params={"id": [a], "limit": 10})["results"]
    assert rows[0]["return_code"] == 3
    for job_id in (a, b, c):
        assert_ran_once(env, job_id)
    assert len(proxy.patches) == 1  # still one bulk call for the whole pass
    assert not list(spool.iterdir())  # both files sent and deleted


def test_a_later_update_waits_while_the_earlier_one_is_in_a_file_another_process_sends(
        env: Any, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    a, other, free = jobs(3)
    spool = tmp_path / "spool"
    first = spool_as(spool, 9, [update(a, "RUNNING", 1)])
    spool_as(spool, 10, [update(a, "RUN_DONE", 10, return_code=0), update(other, "RUNNING", 5)])
    spool_as(spool, 11, [update(other, "RUN_DONE", 20, return_code=0)])  # after the file that waits
    spool_as(spool, 12, [update(free, "RUNNING", 5)])
    # A launcher is sending writer 9's file (claimed; held by a live process: this one).
    claimed = claim_spool_file(first)
    assert claimed is not None
    updater = BulkStatusUpdater(RESTClient(env.url, env.token), max_wait_sec=0.05)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 1  # only the unrelated job's file: a's RUN_DONE waits for its RUNNING, and
        assert updater.flush(60)  # other's RUN_DONE for its RUNNING, in the file that waits
        assert states(env, [a, other, free]) == ["PREPROCESSED", "PREPROCESSED", "RUNNING"]
        assert release_spool_file(claimed)  # the launcher could not send it: given back
        assert replayer.poll() == 4
        assert updater.flush(60)
        replayer.poll()  # deletes the files sent
    finally:
        updater.close()
    assert updater.dropped_count == 0, updater.dropped
    assert states(env, [a, other, free]) == ["RUN_DONE", "RUN_DONE", "RUNNING"]
    assert_ran_once(env, a)
    assert_ran_once(env, other)
    assert not list(spool.iterdir())


def test_a_launcher_leaves_its_later_update_to_the_agent_while_another_writer_holds_the_earlier_one(
        env: Any, jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # The same race from the launcher's side: its lease close sends its own spool files
    # (send_spooled), and another writer's file holds the job's earlier update.
    (a,) = jobs(1)
    spool = tmp_path / "spool"
    client = RESTClient(env.url, env.token)
    session = acquired_in_a_new_session(client, a)
    # Another process of the launcher (serial mode's worker) spooled the job's RUNNING ...
    spool_as(spool, 9, [update(a, "RUNNING", 1, session_id=session.id)])
    # ... and this one its RUN_DONE, the API gone at its end.
    updater = BulkStatusUpdater(client, max_wait_sec=0.05, close_timeout=0.5, spool_dir=spool, send=_unreachable,
                                session_id=session.id)
    updater.put(a, "RUN_DONE", T0 + dt.timedelta(seconds=10), return_code=0)
    updater.close()
    assert updater.spooled == 1
    assert send_spooled(client, session.id) is False  # left to the agent (the Session is not ended)
    assert states(env, [a]) == ["PREPROCESSED"]
    replayer_updater = BulkStatusUpdater(client, max_wait_sec=0.05)
    assert replay(spool, replayer_updater) == 2
    assert replayer_updater.dropped_count == 0, replayer_updater.dropped
    assert_ran_once(env, a)
    assert send_spooled(client, session.id) is True  # replayed by the agent: nothing left to send


def acquired_in_a_new_session(client: RESTClient, job_id: int) -> Any:
    """A new Session of the job's site that has acquired the job (as a launcher's lease would)."""
    app_id = client.get("/jobs/", params={"id": [job_id]})["results"][0]["app_id"]
    site_id = client.get("/apps/", params={"id": [app_id]})["results"][0]["site_id"]
    session = client.Session.objects.create(site_id=site_id)
    assert [job.id for job in session.acquire_jobs(max_num_jobs=1, app_ids={app_id})] == [job_id]
    return session


def _unreachable(chunk: list) -> None:
    raise ConnectionError("API unreachable")


# -- review of the merge (601be2b): an unreadable entry, other sessions, files gone, equal times, cost --

def unreadable_entry(spool: Path, host: str = "otherhost", pid: int = 77) -> Path:
    """A spool entry that is there and cannot be read (a directory of a spool file's name: EACCES of
    another account's file and EIO on NFS read the same), of another writer."""
    entry = spool / f"{spool_prefix(host, pid)}{time.time_ns()}.jsonl"
    entry.mkdir(parents=True)
    return entry


@pytest.fixture
def sqlite_jobs(balsam_env: Any, tmp_path: Path) -> Callable[..., list[int]]:
    # SQLite only: what is tested is the client's order; the server's checks are the same on both.
    return job_maker(balsam_env, tmp_path, "spoolorder")


def test_an_unreadable_spool_entry_holds_back_only_its_writers_later_files(
        balsam_env: Any, sqlite_jobs: Callable[..., list[int]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # It gave back every file the agent took, at every poll (the replay stopped for good).
    env = balsam_env
    a, b = sqlite_jobs(2)
    spool = tmp_path / "spool"
    spool_as(spool, 9, [update(a, "RUNNING", 1), update(a, "RUN_DONE", 2, return_code=0)])
    bad = unreadable_entry(spool)
    later = spool_as(spool, 77, [update(b, "RUNNING", 3)], host="otherhost")  # after the unreadable one
    updater = BulkStatusUpdater(RESTClient(env.url, env.token), max_wait_sec=0.05)
    caplog.set_level(logging.WARNING, logger=status_updater.__name__)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 2
        assert updater.flush(60)
        assert replayer.poll() == 0 and replayer.poll() == 0
    finally:
        updater.close()
    assert states(env, [a, b]) == ["RUN_DONE", "PREPROCESSED"]
    assert sorted(p.name for p in spool.iterdir()) == sorted([bad.name, later.name])  # its writer's later file waits
    unreadable = [r for r in caplog.records if "cannot read spooled updates" in r.getMessage()]
    assert len(unreadable) == 1, [r.getMessage() for r in unreadable]  # warned once, not at every poll


@pytest.mark.parametrize("elsewhere", ["stale-session", "unreadable", "gone"])
def test_a_launcher_sends_its_file_when_no_other_file_holds_an_update_the_server_would_apply_first(
        balsam_env: Any, sqlite_jobs: Callable[..., list[int]], tmp_path: Path, elsewhere: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Job a ran under session 1 (its results spooled by writer 9, the agent down), was freed and
    # ran again under session 2, whose launcher spooled its results too. Session 1's updates are
    # refused whatever their order: session 2's launcher sends its own at its lease close (it left
    # them to the agent, and the Session to expire: the jobs ran again once the agent was back).
    # So when the other writer's entry cannot be read, or was deleted since the listing (sent).
    env = balsam_env
    (a,) = sqlite_jobs(1)
    spool = tmp_path / "spool"
    client = RESTClient(env.url, env.token)
    first = acquired_in_a_new_session(client, a)
    if elsewhere == "stale-session":
        spool_as(spool, 9, [update(a, "RUNNING", 1, session_id=first.id),
                            update(a, "RUN_DONE", 2, return_code=1, session_id=first.id)])
    elif elsewhere == "unreadable":
        unreadable_entry(spool)
    else:
        ghost = f"{spool_prefix('otherhost', 77)}{time.time_ns()}.jsonl"  # listed, deleted before it is read
        listdir = os.listdir
        monkeypatch.setattr(os, "listdir", lambda path: listdir(path) + ([ghost] if Path(path) == spool else []))
    first.delete()
    second = acquired_in_a_new_session(client, a)
    updater = BulkStatusUpdater(client, max_wait_sec=0.05, close_timeout=0.5, spool_dir=spool, send=_unreachable,
                                session_id=second.id)
    updater.put(a, "RUNNING", T0 + dt.timedelta(seconds=100))
    updater.put(a, "RUN_DONE", T0 + dt.timedelta(seconds=200), return_code=0)
    updater.close()
    assert updater.spooled == 2
    assert send_spooled(client, second.id) is True
    monkeypatch.undo()
    assert states(env, [a]) == ["RUN_DONE"]
    assert client.get("/jobs/", params={"id": [a]})["results"][0]["return_code"] == 0
    replay(spool, BulkStatusUpdater(client, max_wait_sec=0.05))  # the agent, back: session 1's updates are dropped
    assert states(env, [a]) == ["RUN_DONE"]
    assert client.get("/jobs/", params={"id": [a]})["results"][0]["return_code"] == 0


def test_a_file_its_claimer_sent_between_the_listing_and_the_read_counts_as_sent(
        balsam_env: Any, sqlite_jobs: Callable[..., list[int]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A launcher finishing its file while the agent polls: the agent gave back every file it had
    # claimed in that poll ("changed hands meanwhile"), a wasted poll each time.
    env = balsam_env
    a, b = sqlite_jobs(2)
    spool = tmp_path / "spool"
    client = RESTClient(env.url, env.token)
    theirs = claim_spool_file(spool_as(spool, 9, [update(a, "RUNNING", 1)]))  # a launcher sends it
    assert theirs is not None
    spool_as(spool, 10, [update(a, "RUN_DONE", 10, return_code=0), update(b, "RUNNING", 5)])
    claim = status_updater.claim_spool_file

    def launcher_done_meanwhile(path: Path, agent: bool = False) -> Any:
        if theirs.exists():  # the launcher's call went through: it deletes its claim
            client.patch("/jobs/", json=[update(a, "RUNNING", 1)])
            theirs.unlink()
            status_updater._unhold(theirs)
        return claim(path, agent=agent)

    monkeypatch.setattr(status_updater, "claim_spool_file", launcher_done_meanwhile)
    updater = BulkStatusUpdater(client, max_wait_sec=0.05)
    assert replay(spool, updater) == 2
    assert updater.dropped_count == 0, updater.dropped
    assert states(env, [a, b]) == ["RUN_DONE", "RUNNING"]
    assert not list(spool.iterdir())


def test_a_job_s_updates_stamped_the_same_instant_go_in_state_order(
        balsam_env: Any, sqlite_jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # The launcher stamps consecutive states with one time. The hold-back compared with "<" and
    # the merge put the earlier file first at equal times: a RUN_DONE at the instant of its RUNNING
    # went first, refused (409), the job left RUNNING.
    env = balsam_env
    (a,) = sqlite_jobs(1)
    spool = tmp_path / "spool"
    first = spool_as(spool, 9, [update(a, "RUNNING", 5)])
    spool_as(spool, 10, [update(a, "RUN_DONE", 5, return_code=0)])  # "-10-" sorts before "-9-"
    claimed = claim_spool_file(first)  # a launcher is sending it
    assert claimed is not None
    updater = BulkStatusUpdater(RESTClient(env.url, env.token), max_wait_sec=0.05)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 0  # the RUN_DONE waits for the RUNNING of the same instant
        assert release_spool_file(claimed)
        assert replayer.poll() == 2  # both in one pass: the RUNNING first
        assert updater.flush(60)
        replayer.poll()
    finally:
        updater.close()
    assert updater.dropped_count == 0, updater.dropped
    assert states(env, [a]) == ["RUN_DONE"]
    assert_ran_once(env, a)


def test_a_poll_keys_each_spooled_update_at_most_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hold-back keyed every file again from the front for each file it gave back: 8-14 s a poll
    # at 10^5 updates (benchmarks/spool_replay.py times it). Counted here, not timed: the updates'
    # times parsed in one poll, in the benchmark's worst shape, small.
    spool = tmp_path / "spool"
    late = 20
    claimed = claim_spool_file(spool_as(spool, 99999, [update(10**6 + k, "RUNNING", 0) for k in range(late)]))
    for w in range(late):
        spool_as(spool, 1000 + w, [update(w * 100 + j, "RUNNING", j) for j in range(20)])
    for w in range(late):
        spool_as(spool, 5000 + w, [update(10**6 + w, "RUN_DONE", 10)] + [update(10**5 + w * 100 + j, "RUNNING", j)
                                                                         for j in range(19)])
    parsed = []
    instant = status_updater._instant
    monkeypatch.setattr(status_updater, "_instant", lambda u: parsed.append(u) or instant(u))
    updater = BulkStatusUpdater(send=lambda chunk: None, max_wait_sec=0.05)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == late * 20  # the late writers' files wait for the claimed one
        assert updater.flush(60)
    finally:
        updater.close()
        assert claimed is not None and release_spool_file(claimed)
    assert len(parsed) <= 2 * late * 20 + late, len(parsed)


def recording_updater(sent: list[dict[str, Any]]) -> BulkStatusUpdater:
    """An updater without a server: what it sends, in order, goes to ``sent``."""
    return BulkStatusUpdater(send=lambda chunk: sent.extend(chunk), max_wait_sec=0.05)


def replay_once(spool: Path) -> list[tuple[Any, Any]]:
    """``(job, state)`` of what one poll of the agent's replay sends, in order (a second poll deletes
    the files sent)."""
    sent: list[dict[str, Any]] = []
    replay(spool, recording_updater(sent))
    return [(u["id"], u.get("state")) for u in sent]


def held_in(spool: Path) -> list[str]:
    """The claims in ``spool`` that this process holds."""
    return sorted(name for name in status_updater._HELD_CLAIMS if Path(name).parent == spool)


def test_one_writers_files_keep_its_order_when_its_clock_stepped_back(
        balsam_env: Any, sqlite_jobs: Callable[..., list[int]], tmp_path: Path) -> None:
    # A job's RUNNING and RUN_DONE spooled by one launcher in two files, its clock stepped back
    # 0.5 s between them (NTP, a VM resumed): each file was keyed alone, the RUN_DONE went first,
    # refused (409), the job left RUNNING, its return code lost.
    env = balsam_env
    (a,) = sqlite_jobs(1)
    spool = tmp_path / "spool"
    spool_as(spool, 9, [update(a, "RUNNING", 10)])
    spool_as(spool, 9, [update(a, "RUN_DONE", 9.5, return_code=0)])
    updater = BulkStatusUpdater(RESTClient(env.url, env.token), max_wait_sec=0.05)
    assert replay(spool, updater) == 2
    assert updater.dropped_count == 0, updater.dropped
    assert states(env, [a]) == ["RUN_DONE"]
    assert_ran_once(env, a)


def test_one_writers_files_keep_its_order_at_one_instant_out_of_state_order(tmp_path: Path) -> None:
    # RUN_ERROR, RESTART_READY (one file), then RUNNING (the next), stamped one instant: the state
    # rank put the RUNNING (earlier in the state machine) first, though written last.
    spool = tmp_path / "spool"
    spool_as(spool, 9, [update(1, "RUN_ERROR", 10), update(1, "RESTART_READY", 10)])
    spool_as(spool, 9, [update(1, "RUNNING", 10)])
    spool_as(spool, 10, [update(1, "RUN_DONE", 11, return_code=0)])  # another writer's: merged by time
    assert replay_once(spool) == [(1, "RUN_ERROR"), (1, "RESTART_READY"), (1, "RUNNING"), (1, "RUN_DONE")]


def test_a_given_back_file_holds_back_with_the_keys_the_merge_gives_it(tmp_path: Path) -> None:
    # Writer 9's files wait behind a claimed one (job 1). Its second file's update of job 2 is
    # stamped before its first file's (its clock stepped back), so the merge keys it at the first
    # one's time (10.5): writer 5's update of job 2 at 10.2 goes before both. The hold-back keyed
    # the given-back file alone (10) and held writer 5's file for it, which the merge then put first
    # anyway: the hold-back and the merge disagreed.
    spool = tmp_path / "spool"
    claimed = claim_spool_file(spool_as(spool, 1, [update(1, "RUNNING", 1)]))
    assert claimed is not None
    spool_as(spool, 9, [update(1, "RUN_DONE", 2, return_code=0), update(2, "RUN_ERROR", 10.5)])
    spool_as(spool, 9, [update(2, "RESTART_READY", 10)])  # written after the RUN_ERROR
    spool_as(spool, 5, [update(2, "RUNNING", 10.2)], host="zhost")
    sent: list[dict[str, Any]] = []
    updater = recording_updater(sent)
    try:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 1  # writer 5's: nothing before it waits
        assert updater.flush(60)
        assert release_spool_file(claimed)
        assert replayer.poll() == 4
        assert updater.flush(60)
        replayer.poll()
    finally:
        updater.close()
    assert [(u["id"], u["state"]) for u in sent] == [(2, "RUNNING"), (1, "RUNNING"), (1, "RUN_DONE"),
                                                       (2, "RUN_ERROR"), (2, "RESTART_READY")]
    assert not list(spool.iterdir())


@pytest.mark.parametrize("field,value", [("state", ["RUN_DONE"]), ("session_id", [7]), ("session_id", "7"),
                                         ("state_timestamp", {"t": 1})])
def test_a_spooled_line_with_a_field_of_the_wrong_type_is_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: Any) -> None:
    # It raised at every poll (an unhashable state or session as a dict key), the poll's claims
    # kept (never stale: held by the agent), the whole replay stopped until the agent restarted.
    spool = tmp_path / "spool"
    claimed = claim_spool_file(spool_as(spool, 8, [update(1, "RUNNING", 1)]))  # a launcher sends it
    assert claimed is not None
    waits = spool_as(spool, 9, [update(1, "RUN_DONE", 5, return_code=0), update(2, "RUNNING", 5)])
    spool_as(spool, 10, [{**update(1, "RUN_DONE", 6), field: value}, update(3, "RUNNING", 5)])
    caplog.set_level(logging.WARNING, logger=status_updater.__name__)
    try:
        sent = replay_once(spool)
        assert held_in(spool) == [str(claimed)]  # the launcher's, none of the agent's
        assert sorted(p.name for p in spool.iterdir()) == sorted([claimed.name, waits.name])
    finally:
        release_spool_file(claimed)
    assert sent == [(3, "RUNNING")]  # writer 9's file waits for writer 8's RUNNING of job 1
    assert any(f"with a {field} of the wrong type" in r.getMessage() for r in caplog.records)


def test_a_poll_that_fails_gives_back_every_file_it_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A poll that raised kept its claims: held by the agent, never stale, those files and every
    # later one of their writers and jobs waited until the agent restarted.
    spool = tmp_path / "spool"
    spool_as(spool, 9, [update(1, "RUNNING", 1)])
    spool_as(spool, 10, [update(2, "RUNNING", 1)])
    parse = status_updater.spooled_updates
    calls = []

    def fails_at_the_second(path: Path, lines: list[str]) -> list[dict[str, Any]]:
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return parse(path, lines)

    monkeypatch.setattr(status_updater, "spooled_updates", fails_at_the_second)
    before = sorted(p.name for p in spool.iterdir())
    sent: list[dict[str, Any]] = []
    updater = recording_updater(sent)
    try:
        replayer = SpoolReplayer(spool, updater)
        with pytest.raises(RuntimeError, match="injected"):
            replayer.poll()
        assert sorted(p.name for p in spool.iterdir()) == before  # given back under their own names
        assert held_in(spool) == []
        monkeypatch.setattr(status_updater, "spooled_updates", parse)
        assert replayer.poll() == 2
        assert updater.flush(60)
        replayer.poll()
    finally:
        updater.close()
    assert sorted((u["id"], u["state"]) for u in sent) == [(1, "RUNNING"), (2, "RUNNING")]
    assert not list(spool.iterdir())


def test_a_file_given_back_while_the_agent_reads_it_still_holds_back_later_updates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A launcher gives back the claimed file with job 1's RUNNING (renames its claim, then links the
    # original) between the agent's look for its names and the reads: none of them was there, it
    # counted as sent, and the RUN_DONE in writer 10's file went out before it, refused.
    spool = tmp_path / "spool"
    claimed = claim_spool_file(spool_as(spool, 9, [update(1, "RUNNING", 5, session_id=1)]))
    assert claimed is not None
    spool_as(spool, 10, [update(1, "RUN_DONE", 6, return_code=0, session_id=1)])
    giveback = claimed.with_name(claimed.name + status_updater._GIVEBACK_MARK)
    claims_of = status_updater.claims_of

    def given_back_right_after(path: Path) -> list[Path]:
        found = claims_of(path)
        if claimed.exists():
            os.rename(claimed, giveback)  # the give-back's first step (by a live launcher: held)
            status_updater._hold(giveback)
            status_updater._unhold(claimed)
        return found

    monkeypatch.setattr(status_updater, "claims_of", given_back_right_after)
    try:
        assert replay_once(spool) == []  # the RUN_DONE waits
    finally:
        status_updater._unhold(claimed)
        status_updater._unhold(giveback)
