"""One item's destination inside another's (directory items ``/~/run`` and ``/~/run/sub``, or a
directory item ``/~/camp`` and a file item ``/~/camp/summary.txt``): a skipped file both hold was
named under one key (both holders built the same string), and the agent's matcher (an item's exact
dest, else the deepest directory item) gave it to the inner item only: the outer item was recorded
done (its job STAGED_IN with an incomplete tree) and the inner one failed for the outer one's file.
Now the skipped file's reported source tells whose it is, and an outer item's error is filed under
its own dest (which the matcher gives to it); when the source cannot tell, every holder fails a try."""

from __future__ import annotations

from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferFile
from balsam_transfer_globus.backend import _skipped_keys
from globus_test_utils import (LOCATION, REMOTE_EP, SITE_EP, globus_module, globus_site, make_backend,  # noqa: F401
                               mocked_responses, outer_and_inner_jobs, submitted, succeeded_with)
from test_i2_globus_skipped_home_paths import apply, home_listing

pytestmark = pytest.mark.usefixtures("mocked_responses")

# Items of two jobs, one's destination inside the other's: (local path under the site, dest, recursive).
RUN = [("data/j1/results", "/~/run", True), ("data/j2/results", "/~/run/sub", True)]
CAMP = [("data/j1/results", "/~/camp", True), ("data/j2/summary.txt", "/~/camp/summary.txt", False)]


def staged_out(tmp_path: Path, items: list[tuple[str, str, bool]]) -> tuple[Path, object, list[TransferFile]]:
    """``items`` submitted as one stage-out to REMOTE_EP, whose home reads ``/home/me/``:
    ``(site, backend, files)``."""
    home_listing(REMOTE_EP)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / local), dest, recursive=recursive) for local, dest, recursive in items]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    return site, backend, files


@pytest.mark.parametrize("reported", ["/home/me/run/sub/f.h5", "/~/run/sub/f.h5"])
def test_nested_directory_items_whose_source_cannot_tell_both_fail_a_try(tmp_path: Path, reported: str) -> None:
    site, backend, files = staged_out(tmp_path, RUN)
    succeeded_with("balsam stage-out (2 directories)", [("/elsewhere/f.h5", reported)], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["pending", "pending"]
    # Each names the file, under its own dest for the outer item.
    assert updates[1]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"
    assert updates[2]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"


@pytest.mark.parametrize("whose", [1, 2])
def test_nested_directory_items_the_source_tells_whose_file_was_skipped(tmp_path: Path, whose: int) -> None:
    site, backend, files = staged_out(tmp_path, RUN)
    source = str(site / ("data/j1/results/sub/f.h5" if whose == 1 else "data/j2/results/f.h5"))
    succeeded_with("balsam stage-out (2 directories)", [(source, "/home/me/run/sub/f.h5")], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == (["pending", "done"] if whose == 1 else ["done", "pending"])
    assert updates[whose]["transfer_info"]["error"] == "/~/run/sub/f.h5: FILE_NOT_FOUND: No such file"


@pytest.mark.parametrize("whose", [None, 1, 2])
def test_a_file_item_inside_a_directory_item(tmp_path: Path, whose) -> None:
    site, backend, files = staged_out(tmp_path, CAMP)
    source = {None: "/src", 1: str(site / "data/j1/results/summary.txt"), 2: str(site / "data/j2/summary.txt")}[whose]
    succeeded_with("balsam stage-out (1 file, 1 directory)", [(source, "/home/me/camp/summary.txt")], REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    expected = {None: ["pending", "pending"], 1: ["pending", "done"], 2: ["done", "pending"]}[whose]
    assert [updates[i]["state"] for i in (1, 2)] == expected
    if whose != 2:
        assert updates[1]["transfer_info"]["error"] == "/~/camp/summary.txt: FILE_NOT_FOUND: No such file"


def test_several_files_of_an_outer_item_inside_an_inner_one_are_counted(tmp_path: Path) -> None:
    site, backend, files = staged_out(tmp_path, RUN)
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
    client, site_path, site = globus_site(tmp_path, "/~/gsite")
    j1, j2 = outer_and_inner_jobs(site)
    module = globus_module(tmp_path, site, client, "/~/gsite")
    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()
    sent = sorted((d["source_path"], d["destination_path"]) for d in submitted())
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
