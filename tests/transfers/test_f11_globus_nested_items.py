"""One item's destination inside another's (directory items ``/~/run`` and ``/~/run/sub``, or a
directory item ``/~/camp`` and a file item ``/~/camp/summary.txt``): a skipped file both hold was
named under one key (both holders built the same string), and the agent's matcher (an item's exact
dest, else the deepest directory item) gave it to the inner item only: the outer item was recorded
done (its job STAGED_IN with an incomplete tree) and the inner one failed for the outer one's file.
Now the skipped file's reported source tells whose it is, and an outer item's error is filed under
its own dest (which the matcher gives to it); when the source cannot tell, every holder fails a try."""

from __future__ import annotations

import json
from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set, load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferFile
from balsam_transfer_globus.backend import _skipped_keys
from globus_test_utils import LOCATION, REMOTE_EP, SITE_EP, make_backend, mocked_responses  # noqa: F401
from test_i2_globus_skipped_home_paths import TASK_ID, apply, home_listing

pytestmark = pytest.mark.usefixtures("mocked_responses")

TRANSFER = "https://transfer.api.globus.org/v0.10"
BASE = get_response_set(globus_sdk.TransferClient.task_list).lookup("default").json["DATA"][0]


def succeeded_with(label: str, skipped: list[tuple[str, str]], dest_ep: str) -> None:
    """A SUCCEEDED task whose skipped files are ``skipped``: [(source_path, destination_path)]."""
    doc = {**BASE, "task_id": TASK_ID, "status": "SUCCEEDED", "label": label, "subtasks_skipped_errors": len(skipped),
           "source_endpoint_id": REMOTE_EP if dest_ep == SITE_EP else SITE_EP, "destination_endpoint_id": dest_ep}
    responses.add(responses.GET, f"{TRANSFER}/task_list", json={
        "DATA": [doc], "DATA_TYPE": "task_list", "length": 1, "limit": 1000, "offset": 0, "total": 1})
    responses.add(responses.GET, f"{TRANSFER}/task/{TASK_ID}/skipped_errors", json={
        "DATA_TYPE": "skipped_errors_list", "next_marker": None,
        "DATA": [{"DATA_TYPE": "skipped_error", "error_code": "FILE_NOT_FOUND", "error_details": "No such file",
                  "source_path": src, "destination_path": dest, "is_directory": False, "is_symlink": False,
                  "error_time": "2026-11-30T18:00:00+00:00"} for src, dest in skipped]})


@pytest.mark.parametrize("reported", ["/home/me/run/sub/f.h5", "/~/run/sub/f.h5"])
def test_nested_directory_items_whose_source_cannot_tell_both_fail_a_try(tmp_path: Path, reported: str) -> None:
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/results"), "/~/run", recursive=True),
             TransferFile(str(site / "data/j2/results"), "/~/run/sub", recursive=True)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with("balsam stage-out (2 directories)", [("/elsewhere/f.h5", reported)], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "pending"]
    # Each names the file, under its own dest for the outer item.
    assert updates[1]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"
    assert updates[2]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"


@pytest.mark.parametrize("whose", [1, 2])
def test_nested_directory_items_the_source_tells_whose_file_was_skipped(tmp_path: Path, whose: int) -> None:
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/results"), "/~/run", recursive=True),
             TransferFile(str(site / "data/j2/results"), "/~/run/sub", recursive=True)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    source = str(site / ("data/j1/results/sub/f.h5" if whose == 1 else "data/j2/results/f.h5"))
    succeeded_with("balsam stage-out (2 directories)", [(source, "/home/me/run/sub/f.h5")], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == (["pending", "done"] if whose == 1 else ["done", "pending"])
    assert updates[whose]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"


@pytest.mark.parametrize("whose", [None, 1, 2])
def test_a_file_item_inside_a_directory_item(tmp_path: Path, whose) -> None:
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/results"), "/~/camp", recursive=True),
             TransferFile(str(site / "data/j2/summary.txt"), "/~/camp/summary.txt")]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    source = {None: "/src", 1: str(site / "data/j1/results/summary.txt"), 2: str(site / "data/j2/summary.txt")}[whose]
    succeeded_with("balsam stage-out (1 file, 1 directory)", [(source, "/home/me/camp/summary.txt")], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    expected = {None: ["pending", "pending"], 1: ["pending", "done"], 2: ["done", "pending"]}[whose]
    assert [updates[i]["state"] for i in (1, 2)] == expected
    if whose != 2:
        assert updates[1]["transfer_info"]["error"] == "/~/camp/summary.txt: FILE_NOT_FOUND: No such file"


def test_several_files_of_an_outer_item_inside_an_inner_one_are_counted(tmp_path: Path) -> None:
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data/j1/results"), "/~/run", recursive=True),
             TransferFile(str(site / "data/j2/results"), "/~/run/sub", recursive=True)]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with("balsam stage-out (2 directories)",
                   [(str(site / f"data/j1/results/sub/{n}.h5"), f"/home/me/run/sub/{n}.h5") for n in range(3)],
                   REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "done"]
    assert updates[1]["transfer_info"]["error"] == "/~/run/sub/0.h5: FILE_NOT_FOUND: No such file (and 2 more failed files)"


def test_the_keys_are_the_ones_the_agent_gives_each_holder() -> None:
    sent = [("/~/run", "/~/run", True), ("/~/run/sub", "/~/run/sub", True), ("/~/x", "/~/x", False)]
    # Undecided: the outer item by its own dest, the inner by the file's path (the deepest holder).
    assert _skipped_keys(sent, ["/~/run/sub/f"]) == {"/~/run/sub/f": ["/~/run", "/~/run/sub/f"]}
    # Not nested: the file's own path, as before.
    assert _skipped_keys(sent, ["/~/run/g"]) == {"/~/run/g": ["/~/run/g"]}
    origins = ["/s/a", "/s/b", "/s/x"]
    assert _skipped_keys(sent, ["/~/run/sub/f"], sources=["/s/a/sub/f"], origins=origins) == {"/~/run/sub/f": ["/~/run"]}
    assert _skipped_keys(sent, ["/~/run/sub/f"], sources=["/s/b/f"], origins=origins) == {"/~/run/sub/f": ["/~/run/sub/f"]}
    # A source that is neither's (reported otherwise than submitted): every holder.
    assert _skipped_keys(sent, ["/~/run/sub/f"], sources=["/elsewhere"], origins=origins) == {
        "/~/run/sub/f": ["/~/run", "/~/run/sub/f"]}


def test_live_a_skipped_file_of_the_outer_tree_fails_its_job_only(balsam_env, tmp_path: Path) -> None:
    """On the live API: job 2's workdir lies inside job 1's recursive stage-in directory; Globus
    skips a file of job 1's tree (its source says so) at a path inside job 2's destination area."""
    responses.add_passthru(balsam_env.url)
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    site_path = tmp_path / "gsite"
    init_site(site_path, "gsite", "default", client, settings_overrides={"transfers": {
        "transfer_locations": {"aps": f"globus://{REMOTE_EP}"}, "globus_endpoint_id": SITE_EP,
        "globus_endpoint_site_path": "/~/gsite"}})
    site = SiteConfig(site_path)
    site_id = site.site_id

    class Tree(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"raw": {"required": True, "direction": "in", "local_path": "inputs", "recursive": True}}

    class One(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"raw": {"required": True, "direction": "in", "local_path": "x.h5"}}

    Tree.sync()
    One.sync()
    j1 = Job("camp", Tree, transfers={"raw": "aps:/data/tree"})
    j1.save()
    j2 = Job("camp/inputs/sub", One, transfers={"raw": "aps:/data/other/x.h5"})
    j2.save()
    options = TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}, globus_endpoint_id=SITE_EP,
                               globus_endpoint_site_path="/~/gsite", max_attempts=1)
    module = TransfersModule(site, options, client)
    module.backends["globus"] = make_backend(tmp_path, endpoint_site_path="/~/gsite")
    module.backends["globus"].site_path = str(site_path)
    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()
    (submit,) = [c for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]
    sent = sorted((d["source_path"], d["destination_path"]) for d in json.loads(submit.request.body)["DATA"])
    assert sent == [("/data/other/x.h5", "/~/gsite/data/camp/inputs/sub/x.h5"), ("/data/tree", "/~/gsite/data/camp/inputs")]

    home_listing(SITE_EP, "/home/me/")
    succeeded_with("balsam stage-in (1 file, 1 directory)",
                   [("/data/tree/sub/x.h5", "/home/me/gsite/data/camp/inputs/sub/x.h5")], SITE_EP)
    module.run_cycle()
    assert client.get(f"/jobs/{j1.id}")["state"] == "FAILED"
    assert client.get(f"/jobs/{j2.id}")["state"] == "STAGED_IN"
    events = client.get("/events/", params={"job_id": [j1.id], "to_state": "FAILED"})["results"]
    (message,) = [e["data"]["message"] for e in events]
    assert message.endswith(f"{site_path}/data/camp/inputs/sub/x.h5: FILE_NOT_FOUND: No such file")
