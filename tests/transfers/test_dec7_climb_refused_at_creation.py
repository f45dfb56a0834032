"""A job whose remote path climbs out of its location's directory prefix with ``..``
(``proj:/../secret.txt`` under ``proj: local:///scratch/me``) is refused when it is created (the
real server, SQLite and PostgreSQL): a 422 naming the item and its slot (``transfers.<slot>``), in
the words the agent fails such an item with, and nothing of the request stored. A ``..`` that stays
inside the prefix, or under a location without one, is accepted. (The agent's own check, for a
prefix set after the jobs were created: test_audit_dec7_location_prefix.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam.api import ApplicationDefinition, Job
from balsam.client.rest import APIError
from balsam.transfer import TransferError, TransferLocation
from transfer_test_utils import init_transfer_site

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def agent_error(url: str, path: str) -> str:
    """The error the agent fails the item with (TransfersModule: ``location.remote_path``)."""
    with pytest.raises(TransferError) as info:
        TransferLocation.parse("proj", url).remote_path(path)
    return str(info.value)


def test_a_path_climbing_out_of_the_prefix_is_refused_at_creation(env: Any, tmp_path: Path) -> None:
    prefix = f"local://{tmp_path / 'scratch'}"
    client, site = init_transfer_site(tmp_path, "climb-refused", {"proj": prefix, "all": "local://"})
    app = type("Climb", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true", "transfers": {
        "inp": {"required": False, "direction": "in", "local_path": "in.txt"},
        "out": {"required": False, "direction": "out", "local_path": "out.txt"}}})
    app.sync()

    # A bulk create: the items that climb out are named, with their slot; nothing is stored.
    body = [{"workdir": "w/fine", "app_id": app.__app_id__, "transfers": {"inp": "proj:/run1/../run2/in.txt"}},
            {"workdir": "w/in", "app_id": app.__app_id__, "transfers": {"inp": "proj:/../secret.txt"}},
            {"workdir": "w/out", "app_id": app.__app_id__,
             "transfers": {"inp": "proj:/in.txt", "out": "proj:/results/../../escaped.txt"}}]
    with pytest.raises(APIError) as info:
        client.post("/jobs/", json=body)
    assert info.value.status_code == 422
    assert [(e["loc"], e["msg"]) for e in info.value.detail] == [
        (["body", 1, "transfers", "inp"], agent_error(prefix, "/../secret.txt")),
        (["body", 2, "transfers", "out"], agent_error(prefix, "/results/../../escaped.txt")),
    ]
    assert info.value.detail[0]["msg"].startswith("remote path '/../secret.txt' leads outside the directory")
    assert client.get("/jobs/", params={"site_id": site.site_id})["count"] == 0

    # One job (Job.save): the same refusal.
    with pytest.raises(APIError, match=r"transfers\.inp.*leads outside the directory") as info:
        Job("w/one", app, transfers={"inp": "proj:/a/../../b.txt"}).save()
    assert info.value.status_code == 422

    # '..' that stays inside the prefix, and '..' under a location without one, are accepted as written.
    inside = Job("w/inside", app, transfers={"inp": "proj:/run1/../run2/in.txt", "out": "all:/../r/out.txt"})
    inside.save()
    items = client.get("/transfers/", params={"job_id": inside.id})["results"]
    assert sorted((it["location_alias"], it["remote_path"]) for it in items) == [
        ("all", "/../r/out.txt"), ("proj", "/run1/../run2/in.txt")]
