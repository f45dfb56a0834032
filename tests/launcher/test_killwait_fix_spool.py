"""A Session left to expire so that the site agent can replay a launcher's spooled updates, after the
launcher announced its end (balsam.client.lease, "An announced end").

A launcher whose updater spooled its reports (the API did not take them in time) does not delete its
Session at the end: the agent's replay must find the jobs still held by it (lease.close; the serial
launcher's ``_end_session`` for a dead master). After an announced end that Session expired
ENDING_IN_SEC after the last announcement (not ``expire_sec``), the agent's replay, at its next
cycle, was refused 409 (the job no longer held) and the finished job ran again. Real server
(PostgreSQL, the default 5-minute expiry, the periodic sweep hourly); asserted on the stored expiry
(the heartbeat plus ``expire_sec``), as tests/launcher/test_killwait_launcher.py does.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

EXPIRE_SEC = 300


@pytest.fixture(scope="module")
def _srv(live_server_factory: Any) -> Any:
    return live_server_factory("postgresql", env={"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC),
                                                  "BALSAM_SESSION_SWEEP_SEC": "3600"})


@pytest.fixture
def live_server(_srv: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _srv
    return _srv.url


def _expiry(client: Any, session_id: int) -> dt.datetime:
    session = [s for s in client.get("/sessions/")["results"] if s["id"] == session_id][0]
    beat = dt.datetime.fromisoformat(session["heartbeat"]).replace(tzinfo=dt.timezone.utc)
    return beat + dt.timedelta(seconds=EXPIRE_SEC)


def _running_job(client: Any, site_id: int, session_id: int) -> int:
    app = client.post("/apps/", json={"site_id": site_id, "name": "A", "serialized_class": "", "source_code": "",
                                      "parameters": {}, "transfers": {}, "description": ""})
    job = client.post("/jobs/", json=[{"workdir": "w/0", "app_id": app["id"]}])[0]
    client.patch("/jobs/", json=[{"id": job["id"], "state": "PREPROCESSED"}])
    leased = client.post(f"/sessions/{session_id}", json={"max_num_jobs": 1})
    assert [j["id"] for j in leased] == [job["id"]]
    client.patch("/jobs/", json=[{"id": job["id"], "state": "RUNNING", "session_id": session_id}])
    return job["id"]


def _long_lived(client: Any, session_id: int) -> bool:
    """The Session's stored expiry is a full one from now (not the seconds of an announced end)."""
    return _expiry(client, session_id) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=EXPIRE_SEC - 60)


def test_a_session_left_for_the_spools_replay_gets_its_full_expiry_back(new_site: Any, monkeypatch: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.client import lease as lease_mod
    from balsam.client.lease import JobLease

    _name, path = new_site()
    site_id = int((path / ".balsam-site").read_text())
    client = get_default_client()
    lease = JobLease(client, site_id, tick_period=3600, heartbeat_thread=False)
    job_id = _running_job(client, site_id, lease.session_id)
    lease.announce_end()
    lease.tick_if_due()  # the announcement (the lease's heartbeat thread sends it at once)
    assert not _long_lived(client, lease.session_id)  # ends within ENDING_IN_SEC
    # The job's RUN_DONE is spooled: the API did not take it within the updater's budget, nor now.
    monkeypatch.setattr(lease_mod, "send_spooled", lambda *_a, **_k: False)
    lease.close(retry_count=0)
    assert _long_lived(client, lease.session_id), "left to expire seconds after the close: the replay is refused"
    # The agent's replay (its next cycle) finds the job held: applied, not refused.
    client.patch("/jobs/", json=[{"id": job_id, "state": "RUN_DONE", "session_id": lease.session_id}])
    assert client.get(f"/jobs/{job_id}")["state"] in {"RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"}


def test_a_dead_serial_masters_session_left_for_its_spool_gets_its_full_expiry_back(new_site: Any, tmp_path: Path,
                                                                                   monkeypatch: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.client.status_updater import spool_prefix
    from balsam.launcher.modes import serial
    from balsam.launcher.modes.serial import SerialMode

    _name, path = new_site()
    site_id = int((path / ".balsam-site").read_text())
    client = get_default_client()
    session_id = client.post("/sessions/", json={"site_id": site_id})["id"]
    _running_job(client, site_id, session_id)
    # The master announced its end at the stop, spooled its reports, and died.
    client.put(f"/sessions/{session_id}", json={"ending_in_sec": 10})
    assert not _long_lived(client, session_id)
    spool = tmp_path / "spool"
    spool.mkdir()
    record = {"session_id": session_id, "host": socket.gethostname(), "pid": 4242, "closed": None}
    (spool / f"{spool_prefix(record['host'], record['pid'])}0001.jsonl").write_text(json.dumps({"id": 1}) + "\n")
    mode = object.__new__(SerialMode)
    mode.context = SimpleNamespace(spool_path=spool)
    monkeypatch.setattr(serial, "default_client", lambda: client)
    mode._end_session(record)
    assert _long_lived(client, session_id), "left to expire seconds after the master's death: the replay is refused"
