"""A job two of whose transfer slots write one destination is refused when it is created (the real
server, SQLite and PostgreSQL), with a 422 naming the slot and the destination: one copy would
overwrite the other (which one is left depends on the order they land) and a failure of either
could not be told from the other's. Two directories merging into one are accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam.api import ApplicationDefinition, Job
from balsam.client.rest import APIError
from transfer_test_utils import init_transfer_site

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def app_with(site_id: int, name: str, **slots: dict) -> Any:
    app = type(name, (ApplicationDefinition,), {"site": site_id, "command_template": "true",
                                                 "transfers": {k: {"required": False, **v} for k, v in slots.items()}})
    app.sync()
    return app


def refusal(job: Any) -> str:
    with pytest.raises(APIError) as info:
        job.save()
    assert "422" in str(info.value)
    return str(info.value)


def test_two_slots_writing_one_destination_are_refused(env: Any, tmp_path: Path) -> None:
    _, site = init_transfer_site(tmp_path, "xfer-dup")
    sid = site.site_id
    two_inputs = app_with(sid, "TwoIn", a={"direction": "in", "local_path": "in/x.h5"},
                          b={"direction": "in", "local_path": "./in//x.h5"})
    message = refusal(Job("w1", two_inputs, transfers={"a": "shared:/data/1/x.h5", "b": "shared:/data/2/x.h5"}))
    assert "transfers.b: writes in/x.h5 in the workdir, as slot 'a' does" in message
    # "." names the remote file: two files of one name land on one path.
    dots = app_with(sid, "Dots", a={"direction": "in", "local_path": "."}, b={"direction": "in", "local_path": "."})
    assert "x.h5 in the workdir" in refusal(Job("w2", dots, transfers={"a": "shared:/d/1/x.h5", "b": "shared:/d/2/x.h5"}))
    outs = app_with(sid, "TwoOut", a={"direction": "out", "local_path": "a.txt"},
                    b={"direction": "out", "local_path": "b.txt"})
    assert "location 'shared'" in refusal(Job("w3", outs, transfers={"a": "shared:/r/out.txt", "b": "shared:/r//out.txt"}))


def test_distinct_destinations_and_merged_directories_are_accepted(env: Any, tmp_path: Path) -> None:
    client, site = init_transfer_site(tmp_path, "xfer-dup-ok")
    sid = site.site_id
    dots = app_with(sid, "Dots", a={"direction": "in", "local_path": "."}, b={"direction": "in", "local_path": "."})
    w1 = Job("w1", dots, transfers={"a": "shared:/d/1/x.h5", "b": "shared:/d/2/y.h5"})
    w1.save()
    trees = app_with(sid, "Trees", a={"direction": "in", "local_path": ".", "recursive": True},
                     b={"direction": "in", "local_path": ".", "recursive": True})
    w2 = Job("w2", trees, transfers={"a": "shared:/d/1", "b": "shared:/d/2"})
    w2.save()
    outs = app_with(sid, "TwoOut", a={"direction": "out", "local_path": "a.txt"},
                    b={"direction": "out", "local_path": "b.txt"})
    w3 = Job("w3", outs, transfers={"a": "shared:/r/a.txt", "b": "shared:/r/b.txt"})
    w3.save()
    # Each job was created with both of its transfer items.
    for job, remotes in [(w1, ["/d/1/x.h5", "/d/2/y.h5"]), (w2, ["/d/1", "/d/2"]), (w3, ["/r/a.txt", "/r/b.txt"])]:
        assert job.id is not None
        items = client.get("/transfers/", params={"job_id": job.id})["results"]
        assert sorted((it["location_alias"], it["remote_path"]) for it in items) == [("shared", r) for r in remotes]
