"""A queue's fewest nodes (``scheduler.allowed_queues.<queue>.min_nodes``): Polaris' prod routes 10
to 496 nodes and refuses fewer at qsub ("Job violates queue and/or server resource limits"). The key
did not exist: settings.yml refused it as unknown and the server's site record could not carry it,
so a 1-node BatchJob in prod was refused by PBS, not by balsam, and the elastic queue could not
size its requests to the queue. It is optional (1), checked in settings.yml, stored on the site,
and applied by the BatchJob rules (balsam queue submit, the scheduler module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam.batch_job_rules import BatchJobRefused, check_batch_job
from balsam.config.settings import SettingsError, loads_settings
from balsam_platform_polaris import PolarisPlatform

QUEUE = "scheduler:\n  allowed_queues:\n    prod: {{max_nodes: 496, max_walltime: 1440, max_queued_jobs: 100{extra}}}\n"


def test_settings_take_min_nodes_and_refuse_one_outside_1_to_max_nodes() -> None:
    settings = loads_settings(QUEUE.format(extra=", min_nodes: 10"))
    assert settings.scheduler.allowed_queues["prod"].min_nodes == 10
    assert loads_settings(QUEUE.format(extra="")).scheduler.allowed_queues["prod"].min_nodes == 1
    for bad in ("0", "497"):
        with pytest.raises(SettingsError, match=r"settings.yml:3 scheduler.allowed_queues.prod.min_nodes: must be "
                                                 r"between 1 and max_nodes 496"):
            loads_settings(QUEUE.format(extra=f", min_nodes: {bad}"))


def test_a_polaris_site_refuses_fewer_than_10_nodes_in_prod() -> None:
    scheduler = PolarisPlatform().settings_defaults()["scheduler"]
    queues = loads_settings("scheduler:\n  allowed_queues:\n" + "".join(
        f"    {name}: {{{', '.join(f'{k}: {v}' for k, v in limits.items())}}}\n"
        for name, limits in scheduler["allowed_queues"].items())).scheduler.allowed_queues
    request = {"queue": "prod", "project": "datascience", "num_nodes": 2, "wall_time_min": 60, "optional_params": {}}
    with pytest.raises(BatchJobRefused, match=r"num_nodes 2 is outside 10..496 allowed in queue 'prod'"):
        check_batch_job(request, queues, ["datascience"], {})
    check_batch_job({**request, "num_nodes": 10}, queues, ["datascience"], {})
    check_batch_job({**request, "queue": "debug", "num_nodes": 1}, queues, ["datascience"], {})


def test_the_site_record_carries_min_nodes(live_server: str, register: Any) -> None:
    import httpx

    _username, _password, _user_id, token, _ = register(live_server)
    with httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        queues = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10},
                  "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}}
        site = http.post("/sites/", json={"name": "minnodes", "path": str(Path("/tmp/min-nodes-site")),
                                          "allowed_queues": queues})
        assert site.status_code == 201, site.text
        stored = http.get(f"/sites/{site.json()['id']}").json()["allowed_queues"]
        assert stored["prod"]["min_nodes"] == 10
        bad = http.put(f"/sites/{site.json()['id']}",
                       json={"allowed_queues": {"prod": {**queues["prod"], "min_nodes": 0}}})
        assert bad.status_code == 422, bad.text
        # Above max_nodes: a rule OpenAPI cannot state; stored, and every BatchJob is refused in one line.
        odd = http.put(f"/sites/{site.json()['id']}",
                       json={"allowed_queues": {"prod": {**queues["prod"], "min_nodes": 500}}})
        assert odd.status_code == 200, odd.text
    with pytest.raises(BatchJobRefused, match=r"num_nodes 496 is outside 500..496"):
        check_batch_job({"queue": "prod", "project": "p", "num_nodes": 496, "wall_time_min": 60},
                        odd.json()["allowed_queues"], [], {})
