"""``POST /sessions/{id}/release``: a launcher gives back leased jobs it has not started (the serial
prefetcher's "Giving back"). Real server: only the session's own runnable jobs are given back, in one
request; a resent request (same Idempotency-Key) is replayed, never applied again; bad input is a
one-line 422."""

from __future__ import annotations

import uuid

import pytest

from launcher_helpers import make_runnable


def _site_and_jobs(count: int):
    from balsam.api import App, Job, Site

    site = Site.objects.create(name=f"rel-{uuid.uuid4().hex[:8]}", path=f"/tmp/rel-{uuid.uuid4().hex[:8]}")
    app = App.objects.create(site_id=site.id, name="A", serialized_class="x", source_code="x")
    return site, make_runnable(Job(workdir=f"w/{i}", app_id=app.id) for i in range(count))


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_release_gives_back_only_the_sessions_unstarted_jobs(env: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(env)  # SQLite, then PostgreSQL (its locked read)
    from balsam.api import Job
    from balsam.client.default import get_default_client
    from balsam.client.rest import new_idempotency_key

    client = get_default_client()
    site, ids = _site_and_jobs(5)
    mine = client.post("/sessions/", json={"site_id": site.id})["id"]
    other = client.post("/sessions/", json={"site_id": site.id})["id"]
    held = [j["id"] for j in client.post(f"/sessions/{mine}", json={"max_num_jobs": 4})]
    theirs = [j["id"] for j in client.post(f"/sessions/{other}", json={"max_num_jobs": 4})]
    assert len(held) == 4 and len(theirs) == 1
    # One of ours runs: it is not given back (it was started).
    client.patch("/jobs/", json=[{"id": held[0], "state": "RUNNING", "session_id": mine}])
    key = new_idempotency_key()
    answer = client.post(f"/sessions/{mine}/release", json={"job_ids": [*held, *theirs]}, idempotency_key=key)
    assert answer["released"] == sorted(held[1:])
    by_id = {j.id: j for j in Job.objects.filter(id=ids)}
    assert [str(by_id[i].state) for i in held[1:]] == ["PREPROCESSED"] * 3
    # Leasable again at once, by another session: the other session takes them.
    again = [j["id"] for j in client.post(f"/sessions/{other}", json={"max_num_jobs": 10})]
    assert sorted(again) == sorted(held[1:])
    # The same request resent (its answer lost) is the first answer, not applied again: the
    # other session keeps the jobs it leased meanwhile.
    replay = client.post(f"/sessions/{mine}/release", json={"job_ids": [*held, *theirs]}, idempotency_key=key)
    assert replay["released"] == sorted(held[1:])
    lease = client.post(f"/sessions/{other}/release", json={"job_ids": []})
    assert lease["released"] == []
    backlog = client.get(f"/sites/{site.id}/backlog", params={"state": ["PREPROCESSED"], "leased": "true"})["states"]
    assert backlog["PREPROCESSED"]["count"] == 4  # the other session's: its one and the three released
    for sid in (mine, other):
        client.delete(f"/sessions/{sid}")


@pytest.mark.parametrize("body, said", [
    ({}, "job_ids"),
    ({"job_ids": "1"}, "job_ids"),
    ({"job_ids": ["x"]}, "job_ids"),
    ({"job_ids": [], "extra": 1}, "extra"),
])
def test_release_refuses_bad_input_naming_the_field(balsam_env, body, said) -> None:
    from balsam.client.default import get_default_client

    client = get_default_client()
    site, _ids = _site_and_jobs(1)
    sid = client.post("/sessions/", json={"site_id": site.id})["id"]
    with pytest.raises(Exception) as info:
        client.post(f"/sessions/{sid}/release", json=body)
    assert getattr(info.value, "status_code", None) == 422 and said in str(info.value)
    client.delete(f"/sessions/{sid}")


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_a_replayed_release_heartbeats_the_session_as_a_replayed_acquire_does(env: str, request: pytest.FixtureRequest) -> None:
    """Before: the replay answered before the heartbeat, so a launcher whose release answer was lost
    (it resends) kept a session whose heartbeat was older than it reckoned."""
    request.getfixturevalue(env)
    from balsam.client.default import get_default_client
    from balsam.client.rest import new_idempotency_key

    client = get_default_client()
    site, _ids = _site_and_jobs(2)
    sid = client.post("/sessions/", json={"site_id": site.id})["id"]
    held = [j["id"] for j in client.post(f"/sessions/{sid}", json={"max_num_jobs": 2})]

    def beat() -> str:
        return client.get("/sessions/", params={"id": [sid]})["results"][0]["heartbeat"]

    key = new_idempotency_key()
    assert client.post(f"/sessions/{sid}/release", json={"job_ids": held}, idempotency_key=key)["released"] == held
    first = beat()
    assert client.post(f"/sessions/{sid}/release", json={"job_ids": held}, idempotency_key=key)["released"] == held
    assert beat() > first  # stamped by the replay (wire datetimes in UTC compare as text)
    client.delete(f"/sessions/{sid}")
