"""A settings.yml ``filter_tags`` key holding ':' loads (the agent's sections and a launcher's alike):
the launchers' acquire sends the tags as JSON and was never affected, and settings.yml refused
every such site once the queue maintainer's count was found to send them as the API's KEY:VALUE
filter (split at the first ':': ``a:b: c`` read as tag ``a`` = ``"b:c"``). The queue maintainer
now sends only the keys without ':' to the server and matches the whole ``filter_tags`` itself:
a BatchJob tagged ``a: "b:c"`` is not counted as this site's. (elastic_queue, which sends them to
the backlog route, refuses such a key itself: tests/elastic.)"""

from __future__ import annotations

from pathlib import Path

from balsam.config import load_settings
from balsam.site.modules.queue_maintainer import QueueMaintainerModule, QueueMaintainerSettings


def test_a_colon_key_loads(tmp_path: Path) -> None:
    path = tmp_path / "settings.yml"
    path.write_text("queue_maintainer: null\nfilter_tags:\n  exp: one\n  \"a:b\": c\n")
    for only in (None, ("logging", "filter_tags", "launcher")):  # the agent reads every section; a launcher the core ones
        assert load_settings(path, only=only).filter_tags == {"exp": "one", "a:b": "c"}


def test_queue_maintainer_matches_a_colon_key_itself(make_site, client) -> None:
    site = make_site(overrides={
        "scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}},
                      "allowed_projects": ["local"]},
        "filter_tags": {"proj:exp": "1", "workflow": "w1"},
    })
    # Another agent's BatchJob: the server's filter `proj:exp:1` reads it as its own (proj = "exp:1").
    foreign = client.post("/batch-jobs/", json={
        "site_id": site.site_id, "project": "local", "queue": "local", "num_nodes": 1, "wall_time_min": 5,
        "job_mode": "mpi", "filter_tags": {"proj": "exp:1", "workflow": "w1"}})
    qm = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=1, num_queued_jobs=1, wall_time_min=5), client)
    qm.run_cycle()
    qm.run_cycle()  # its own now counts: nothing more
    rows = {b["id"]: b for b in client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]}
    assert len(rows) == 2, rows
    own = [b for i, b in rows.items() if i != foreign["id"]][0]
    assert own["filter_tags"] == {"proj:exp": "1", "workflow": "w1"}
