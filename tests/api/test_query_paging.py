"""Query counting and ordering against a live server: count() of a long id list sends one
limit=0 request per chunk (it read every record), and BatchJob orderings are the server's (id,
-id, and -start_time's ties by id ascending)."""

from __future__ import annotations

import datetime as dt

from balsam._api.query import Query


def _template_app(site):
    from balsam.api import ApplicationDefinition

    cls = type("Counted", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ n }}"})
    cls.sync()
    return cls


def test_count_of_a_long_id_list_sends_limit_0_per_chunk(site, monkeypatch):
    from balsam.api import Job

    app = _template_app(site)
    ids = [j.id for j in Job.objects.bulk_create([app.submit(workdir=f"c/{i}", n=i, save=False) for i in range(1200)])]
    client = Job._get_client()
    sent = []
    real_get, real_request = client.get, client.request_with_headers
    monkeypatch.setattr(client, "get", lambda path, **kw: sent.append(("get", dict(kw.get("params") or {})))
                        or real_get(path, **kw))
    monkeypatch.setattr(client, "request_with_headers", lambda method, path, **kw: sent.append(
        (method, dict(kw.get("params") or {}))) or real_request(method, path, **kw))
    missing = max(ids) + 10_000
    assert Job.objects.filter(id=ids + [missing]).count() == 1200
    assert len(sent) == 3 and all(params.get("limit") == 0 for _, params in sent), [
        (m, p.get("limit"), len(p.get("id", []))) for m, p in sent]
    # A list with a repeated id may not be summed per chunk: still right, by reading the records.
    sent.clear()
    assert Job.objects.filter(id=ids + ids[:1]).count() == 1200
    assert any(params.get("limit") != 0 for _, params in sent)
    assert Job.objects.filter(id=ids[:10]).count() == 10  # one chunk: one limit=0 request, as before


def test_batch_job_orderings_match_the_server_with_split_filters(site, monkeypatch):
    from balsam.api import BatchJob

    made = [BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="debug",
                                    project="datascience") for _ in range(6)]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i, bj in enumerate(made):  # pairs with the same start time: ties the id must break
        bj.start_time = start + dt.timedelta(minutes=i // 2)
    BatchJob.objects.bulk_update(made)
    ids = [bj.id for bj in made]
    whole = {order: [bj.id for bj in BatchJob.objects.filter(id=ids).order_by(order)]
             for order in ("start_time", "-start_time", "id", "-id")}
    assert whole["id"] == sorted(ids) and whole["-id"] == sorted(ids, reverse=True)
    assert whole["-start_time"] == [ids[4], ids[5], ids[2], ids[3], ids[0], ids[1]]  # ties: id ascending
    monkeypatch.setattr(Query, "filter_chunk_size", 4)  # two requests, merged by the client
    for order, expected in whole.items():
        assert [bj.id for bj in BatchJob.objects.filter(id=ids).order_by(order)] == expected, order
