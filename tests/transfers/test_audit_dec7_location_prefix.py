"""A location's path prefix (``local:///scratch/me``) is the directory its paths are inside: a job's
remote path whose ``..`` climbs above it (``shared:/../secret.txt``) fails its own item, naming the
path, and is never copied from or to outside the prefix; the job's other items and other jobs of
the batch go on (real server, real module, real local and rsync copies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.api import ApplicationDefinition, Job
from balsam.transfer import TransferError, TransferLocation
from transfer_test_utils import finish_as_a_launcher, init_transfer_site, job_state, run_cycles, settled, transfers_module

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def test_remote_path_refuses_climbing_out_of_the_prefix() -> None:
    scratch = TransferLocation.parse("proj", "local:///scratch/me")
    assert scratch.remote_path("/run1/in.h5") == "/scratch/me/run1/in.h5"
    assert scratch.remote_path("/run1/../run2/./in.h5") == "/scratch/me/run1/../run2/./in.h5"
    for path in ("/../other/in.h5", "/run1/../../in.h5", "/./..", "//a/../../b"):
        with pytest.raises(TransferError, match="leads outside the directory /scratch/me") as info:
            scratch.remote_path(path)
        assert not info.value.retryable and path in str(info.value)
    # Without a prefix, '/..' is '/' (nothing to leave).
    assert TransferLocation.parse("all", "local://").remote_path("/../etc/x") == "/../etc/x"


@pytest.mark.parametrize("protocol", ["local", "rsync"])
def test_a_path_climbing_out_of_the_prefix_fails_its_item_alone(env: object, tmp_path: Path, protocol: str) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "in.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside the prefix")
    # The jobs are created while the location has no prefix (the server refuses a path climbing out
    # of a prefix at creation: test_dec7_climb_refused_at_creation.py); the site's settings give it
    # one afterwards, as a user editing settings.yml does: the agent's own check is what stops them.
    client, site = init_transfer_site(tmp_path, f"prefix-{protocol}", {"shared": f"{protocol}://"})
    app = type("Prefixed", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true", "transfers": {
        "inp": {"required": False, "direction": "in", "local_path": "in.txt"},
        "out": {"required": False, "direction": "out", "local_path": "out.txt"}}})
    app.sync()
    good = Job("w/good", app, transfers={"inp": "shared:/in.txt", "out": "shared:/results/good.txt"})
    bad_in = Job("w/bad-in", app, transfers={"inp": "shared:/../secret.txt"})
    bad_out = Job("w/bad-out", app, transfers={"out": "shared:/results/../../escaped.txt"})
    for job in (good, bad_in, bad_out):
        job.save()
    locations = {"shared": f"{protocol}://{prefix}"}
    client.put(f"/sites/{site.site_id}", json={"transfer_locations": locations})
    module = transfers_module(site, client, locations)
    data = Path(site.data_path)

    run_cycles(module, lambda: settled(client, site.site_id), "the stage-ins settled")
    assert job_state(client, good.id) == "STAGED_IN"
    assert (data / "w/good/in.txt").read_text() == "inside"
    assert job_state(client, bad_in.id) == "FAILED"
    assert not (data / "w/bad-in/in.txt").exists()
    (item,) = client.get("/transfers/", params={"job_id": bad_in.id})["results"]
    assert item["state"] == "error"
    assert item["transfer_info"]["error"].startswith("remote path '/../secret.txt' leads outside the directory")
    assert item["transfer_info"].get("attempts", 0) <= 1  # failed at once, not retried

    for job in (good, bad_out):
        (data / job.workdir).mkdir(parents=True, exist_ok=True)
        (data / job.workdir / "out.txt").write_text(f"result of {job.workdir}")
        finish_as_a_launcher(client, site.site_id, job.id, check_acquired=False)
    run_cycles(module, lambda: settled(client, site.site_id), "the stage-outs settled")
    assert job_state(client, good.id) == "JOB_FINISHED"
    assert (prefix / "results/good.txt").read_text() == "result of w/good"
    assert job_state(client, bad_out.id) == "FAILED"
    assert not (tmp_path / "escaped.txt").exists()
    events = client.get("/events/", params={"job_id": bad_out.id, "to_state": "FAILED"})["results"]
    assert "'/results/../../escaped.txt' leads outside the directory" in events[0]["data"]["message"]
