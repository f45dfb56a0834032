"""BulkStatusUpdater's ``session_id``: a launcher's updates go under its Session's lease (the server
refuses those of a job the session no longer holds), spooled updates keep the session they were put
under, and the agent's replay sends them as they were (never under the agent's own session)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


def _capture() -> tuple[list[list[dict]], Any]:
    sent: list[list[dict]] = []
    lock = threading.Lock()

    def send(chunk: list[dict]) -> None:
        with lock:
            sent.append([dict(u) for u in chunk])

    return sent, send


def test_updates_are_stamped_with_the_session_unless_they_have_one() -> None:
    from balsam.client.status_updater import BulkStatusUpdater

    sent, send = _capture()
    updater = BulkStatusUpdater(send=send, max_wait_sec=0.05, session_id=7)
    mine = {"id": 3, "state": "RUN_DONE"}
    updater.put(1, "RUNNING")
    updater.put_update(mine)
    updater.put_update({"id": 4, "state": "RUNNING", "session_id": 9})
    updater.put_updates([{"id": 5, "state": "RUN_DONE"}, {"id": 5, "state": "POSTPROCESSED"}])
    updater.put_update({"id": 6, "state": "FAILED"}, stamp_session=False)
    assert updater.flush(30)
    updater.close()
    got = [(u["id"], u.get("session_id")) for chunk in sent for u in chunk]
    assert got == [(1, 7), (3, 7), (4, 9), (5, 7), (5, 7), (6, None)]
    assert mine == {"id": 3, "state": "RUN_DONE"}  # the caller's dict is not changed


def test_the_session_may_be_set_later_or_follow_a_lease() -> None:
    from balsam.client.status_updater import BulkStatusUpdater
    from balsam.launcher.service_calls import lease_session

    class Lease:
        session_id: Any = None

    lease = Lease()
    sent, send = _capture()
    updater = BulkStatusUpdater(send=send, max_wait_sec=0.05)
    assert updater.session_id is None
    updater.put(1, "RUNNING")  # before the session exists: none
    updater.session_id = lease_session(lease)
    updater.put(2, "RUNNING")  # the lease has no session yet: none
    lease.session_id = 11
    updater.put(3, "RUNNING")
    lease.session_id = 12  # a lost session replaced: the new one from now on
    updater.put(4, "RUNNING")
    assert updater.session_id == 12
    assert updater.flush(30)
    updater.close()
    assert [(u["id"], u.get("session_id")) for chunk in sent for u in chunk] == [(1, None), (2, None), (3, 11), (4, 12)]


def test_spooled_updates_keep_their_session_and_are_replayed_as_they_were(tmp_path: Path) -> None:
    from balsam.client.status_updater import BulkStatusUpdater, SpoolReplayer, write_spool

    def unreachable(_chunk: list) -> None:
        raise ConnectionError("connection refused")

    spool = tmp_path / "spool"
    launcher = BulkStatusUpdater(send=unreachable, close_timeout=0.5, spool_dir=spool, session_id=21)
    launcher.put(1, "RUN_DONE", return_code=0)
    launcher.close()
    assert [json.loads(line)["session_id"] for line in launcher.spool_files[0].read_text().splitlines()] == [21]
    write_spool(spool, [{"id": 2, "state": "RUN_DONE"}])  # an older launcher's: no session

    sent, send = _capture()
    agent = BulkStatusUpdater(send=send, max_wait_sec=0.05, session_id=99)  # the agent's own session
    replayer = SpoolReplayer(spool, agent)
    assert replayer.poll() == 2
    assert agent.flush(30)
    agent.close()
    assert sorted((u["id"], u.get("session_id")) for chunk in sent for u in chunk) == [(1, 21), (2, None)]


def test_a_launchers_update_of_a_job_the_user_moved_is_refused_and_dropped(balsam_env: Any, tmp_path: Path) -> None:
    """Against the server: a Session leases two jobs; the user re-queues one; the launcher's RUNNING
    of it (sent under the Session) is refused and dropped, the other's goes through; a second
    Session then leases the re-queued job and runs it under its own lease."""
    from balsam._api.model import get_default_client, reset_default_client
    from balsam.client.lease import JobLease
    from balsam.client.status_updater import BulkStatusUpdater
    from balsam.launcher.service_calls import lease_session

    reset_default_client()
    client = get_default_client()
    site = client.post("/sites/", json={"name": "leased-updates", "path": str(tmp_path)})
    app = client.post("/apps/", json={"site_id": site["id"], "name": "S", "serialized_class": "eA==", "source_code": "x"})
    ids = [j["id"] for j in client.post("/jobs/", json=[{"workdir": f"s{i}", "app_id": app["id"]} for i in range(2)])]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    first = JobLease(client, site["id"], None)
    assert sorted(j["id"] for j in first.acquire(10)) == ids
    client.patch("/jobs/", json=[{"id": ids[0], "state": "RESTART_READY"}])  # a user re-queues it

    with BulkStatusUpdater(client, max_wait_sec=0.05, session_id=lease_session(first)) as updater:
        updater.put(ids[0], "RUNNING")
        updater.put(ids[1], "RUNNING")
        assert updater.flush(30)
    assert [u["id"] for u, _ in updater.dropped] == [ids[0]]
    assert "no longer held by session" in updater.dropped[0][1]
    states = {j["id"]: j["state"] for j in client.get("/jobs/", params={"id": ids})["results"]}
    assert states == {ids[0]: "RESTART_READY", ids[1]: "RUNNING"}

    second = JobLease(client, site["id"], None)
    # Leased again once the first Session's heartbeats no longer list it: the second after the move
    # (the first may have started it; balsam.server.sessions_logic, "Re-queued while running").
    assert second.acquire(10) == []
    first.tick()
    first.tick()
    assert [j["id"] for j in second.acquire(10)] == [ids[0]]
    with BulkStatusUpdater(client, max_wait_sec=0.05, session_id=lease_session(second)) as updater:
        updater.put(ids[0], "RUNNING")
        updater.put(ids[0], "RUN_DONE", return_code=0)
        assert updater.flush(30)
    assert updater.dropped == []
    assert client.get(f"/jobs/{ids[0]}")["state"] == "RUN_DONE"
    first.close()
    second.close()
    reset_default_client()


def test_a_job_modes_updater_goes_under_its_lease(tmp_path: Path, monkeypatch: Any) -> None:
    """JobMode.lease() (mpi mode, and any mode written against it) opens its updater under the
    source's Session; serial mode's in-process master follows its prefetcher's lease."""
    from balsam.launcher.job_mode import JobMode, LauncherContext
    from balsam.platform import NodeInfo

    class Source:
        session_id = 5

        def close(self, retry_count: Any = None) -> None:
            pass

    class Mode(JobMode):
        def run(self) -> int:
            return 0

    monkeypatch.setattr(LauncherContext, "open_lease", lambda self, sort_by=None: Source())
    ctx = LauncherContext(site_config=None, settings=None, site_id=1, data_path=tmp_path / "data",
                          log_path=tmp_path / "log", platform=None, nodes=[NodeInfo(node_id="0", hostname="h", cpu_ids=(0,))],
                          wall_time_min=1, job_mode="mpi")
    with Mode(ctx).lease() as (source, updater):
        assert updater.session_id == 5
        source.session_id = 6  # replaced after it was lost
        assert updater.session_id == 6
