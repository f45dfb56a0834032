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
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

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


def spool_as(spool: Path, pid: int, updates: list[dict[str, Any]]) -> Path:
    """A spool file as process ``pid`` of this host writes it."""
    written = write_spool(spool, updates)
    named = spool / written.name.replace(spool_prefix(socket.gethostname(), os.getpid()),
                                         spool_prefix(socket.gethostname(), pid))
    os.rename(written, named)
    return named


def assert_ran_once(env: Any, job_id: int) -> None:
    """The job went PREPROCESSED -> RUNNING -> RUN_DONE once each (its events sort by the replayed
    state_timestamps, minutes before its creation's: compared by count)."""
    made = job_moves(env, job_id)
    assert made.count(("PREPROCESSED", "RUNNING")) == 1 and made.count(("RUNNING", "RUN_DONE")) == 1, made


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
    app_id = client.get("/jobs/", params={"id": [a]})["results"][0]["app_id"]
    site_id = client.get("/apps/", params={"id": [app_id]})["results"][0]["site_id"]
    session = client.Session.objects.create(site_id=site_id)
    assert [job.id for job in session.acquire_jobs(max_num_jobs=1, app_ids={app_id})] == [a]
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
    try:
        replayer = SpoolReplayer(spool, replayer_updater)
        assert replayer.poll() == 2
        assert replayer_updater.flush(60)
        replayer.poll()  # deletes the files sent
    finally:
        replayer_updater.close()
    assert replayer_updater.dropped_count == 0, replayer_updater.dropped
    assert_ran_once(env, a)
    assert send_spooled(client, session.id) is True  # replayed by the agent: nothing left to send


def _unreachable(chunk: list) -> None:
    raise ConnectionError("API unreachable")
