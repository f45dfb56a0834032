"""A client newer than its server: a server older than job leases (before December 2026) refuses
every update that carries ``session_id`` as an unknown field (422). The updater sent every update
with it for ever, each refused: the agent's hook results and the launchers' states were dropped and
the jobs stayed leased, never processed. It now sends them without ``session_id`` once the server
says it does not know it, with one WARNING. The server runs in this process with its lease key
renamed, so that ``session_id`` meets the same unknown-field check an older server's did."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest


def test_updates_go_without_session_id_to_a_server_that_does_not_know_it(
        database_url: str, monkeypatch: pytest.MonkeyPatch, register: Any, serve_in_process: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    from balsam.client.rest import RESTClient
    from balsam.client.status_updater import BulkStatusUpdater
    from balsam.server import jobs_logic
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    monkeypatch.setattr(jobs_logic, "SESSION_KEY", "no_such_key_in_an_older_server")
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="older-server-secret-0123456789-abcdefghij"),
        create_tables_now=True))
    _username, _password, _user_id, token, _ = register(url)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        site = http.post("/sites/", json={"name": "old", "path": "/tmp/old-server-site"}).json()
        app = http.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "", "source_code": ""}).json()
        jobs = http.post("/jobs/", json=[{"app_id": app["id"], "workdir": f"w{i}"} for i in range(3)]).json()
        ids = [job["id"] for job in jobs]
        # What an older server answers: the lease key is an unknown field.
        said = http.patch("/jobs/", json=[{"id": ids[0], "data": {"x": 0}, "session_id": 5}])
        assert said.status_code == 422 and "unknown field" in said.text, said.text

        updater = BulkStatusUpdater(RESTClient(url, token=token), max_wait_sec=0.05, session_id=5)
        with caplog.at_level(logging.WARNING, logger="balsam.client.status_updater"):
            for i, job_id in enumerate(ids):
                updater.put_update({"id": job_id, "data": {"x": i + 1}})
            assert updater.flush(60)
            updater.put_update({"id": ids[0], "data": {"x": 10}})
            assert updater.flush(60)
            updater.close()
        data = {job["id"]: job["data"] for job in http.get("/jobs/", params={"id": ids}).json()["results"]}
    assert data == {ids[0]: {"x": 10}, ids[1]: {"x": 2}, ids[2]: {"x": 3}}
    assert updater.dropped_count == 0
    warnings = [r.getMessage() for r in caplog.records if "older than this client" in r.getMessage()]
    assert len(warnings) == 1, warnings
