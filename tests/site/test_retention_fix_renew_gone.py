"""The agent replaces a queued BatchJob's launcher credential that the server no longer has.

The server once deleted such a credential (its retention sweep, before it kept those of BatchJobs
that may still run; or a database restored from an older backup): the agent's renewal answered
404 at every scheduler cycle for ever (a WARNING each), and the launcher started with a token the
server refused ("no longer exists"): the allocation was wasted. Now the agent mints a new
credential into the BatchJob's credential file, and a launcher whose token is refused re-reads
that file and goes on. Against a real uvicorn server (SQLite).
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from balsam.client import ClientSettings, RESTClient
from balsam.server.tables import credentials
from balsam.site.launcher_credentials import LauncherCredentials, credential_path

#: What the agent renews at: past the stored expiry (3 days of queue allowance plus the wall time).
FAR_LATER_DAYS = 34


def test_a_gone_credential_is_replaced_at_renewal_and_the_launcher_reads_the_new_one(
        _live_server_obj, live_server, register, tmp_path, caplog):
    _, _, _, token, _ = register(live_server)
    agent = RESTClient(live_server, token, retry_count=0)
    site = agent.post("/sites/", json={"name": "gone-cred", "path": str(tmp_path)})
    bj = agent.post("/batch-jobs/", json={"site_id": site["id"], "num_nodes": 1, "wall_time_min": 60,
                                          "job_mode": "serial", "queue": "q", "project": "p"})
    creds = LauncherCredentials(agent, tmp_path, site["id"])
    path = creds.mint(bj)
    assert path == credential_path(tmp_path, bj["id"])
    old = ClientSettings.load(path)
    # The launcher was queued with that file; the server then lost the credential's row.
    launcher = RESTClient.from_settings(old, settings_path=path)
    launcher.retry_count = 0
    engine = sa.create_engine(_live_server_obj.database_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.delete(credentials).where(credentials.c.id == old.credential_id)).rowcount == 1
    finally:
        engine.dispose()

    caplog.set_level(logging.INFO, logger="balsam.site.launcher_credentials")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=FAR_LATER_DAYS)
    assert creds.renew_due([bj], now=later) == [bj["id"]]
    new = ClientSettings.load(path)
    assert new.credential_id != old.credential_id and new.token != old.token
    listed = agent.get("/auth/credentials", params={"kind": "launcher", "active": "true"})["results"]
    assert [(c["id"], c["batch_job_id"], c["site_id"]) for c in listed] == [(new.credential_id, bj["id"], site["id"])]
    assert any(f"launcher credential {old.credential_id} no longer exists" in r.getMessage() for r in caplog.records)
    # Renewed once more later: the new credential is renewed, not replaced again.
    renew_new = f"POST /auth/credentials/{new.credential_id}/renew"
    assert creds.renew_due([bj], now=later + dt.timedelta(days=FAR_LATER_DAYS)) == [bj["id"]]
    assert agent.request_counts[renew_new] == 1 and ClientSettings.load(path).credential_id == new.credential_id

    # The launcher's old token is refused (401): it re-reads its file and goes on with the new one.
    session = launcher.post("/sessions/", json={"site_id": site["id"], "batch_job_id": bj["id"]})
    assert session["batch_job_id"] == bj["id"]
    assert launcher.token == ClientSettings.load(path).token
    launcher.close()
    agent.close()
