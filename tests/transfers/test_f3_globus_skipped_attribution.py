"""A file Globus skips is named by the path Globus reports; a home-directory destination (``/~/...``)
may come back resolved. The home was voted from the second "/" of a path on, so a home of ``/`` (a
guest collection, a GCS v5 collection whose default directory is ``/``) never won and another
prefix could win alone: with ``/~/x`` (job 1) and ``/~/a/x`` (job 2) sent and ``/a/x`` skipped, job
1 was blamed and job 2, its input missing, recorded done (STAGED_IN). And ``..`` was not collapsed:
``/proj/run/../x``, reported ``/proj/x``, was taken for the home path ``/~/x`` of another job.
Where the path says which item it is, that item alone fails. The home is now read from Globus (an
``operation_ls`` of ``/~/``, ``home_listing`` here) instead of voted; where it cannot be read, a
path that may be a home item's fails a try of every item of the task (nothing recorded done on a guess)."""

from __future__ import annotations

from pathlib import Path

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from balsam.states import TransferDirection
from balsam.transfer import TransferFile
from balsam_transfer_globus.backend import _norm, _skipped_keys
from globus_test_utils import (LOCATION, REMOTE_EP, SITE_EP, globus_module, globus_site, make_backend,  # noqa: F401
                               mocked_responses, stage_in_app, submitted, succeeded_with)
from test_i2_globus_skipped_home_paths import apply, home_listing, succeeded_with_skipped

pytestmark = pytest.mark.usefixtures("mocked_responses")

NAME = "scan 17 – µ.h5"


def test_a_path_two_homes_would_fit_is_read_by_the_home_globus_resolved() -> None:
    sent = [("/~/x", "J1", False), ("/~/a/x", "J2", False)]
    # Home "/" (job 2's file) or "/a" (job 1's): the voting could not tell; the home read can.
    assert _skipped_keys(sent, ["/a/x"], "/") == {"/a/x": ["J2"]}
    assert _skipped_keys(sent, ["/a/x"], "/a") == {"/a/x": ["J1"]}
    assert _skipped_keys(sent, ["/a/x"]) == {}  # the home not read: not guessed


def test_a_home_of_slash_wins_when_it_alone_fits() -> None:
    sent = [("/~/x", "J1", False), ("/~/a/y", "J2", False), ("/~/d", "D", True)]
    assert _skipped_keys(sent, ["/a/y"], "/") == {"/a/y": ["J2"]}
    assert _skipped_keys(sent, ["/x"], "/") == {"/x": ["J1"]}
    assert _skipped_keys(sent, ["/d/sub/f.h5"], "/") == {"/d/sub/f.h5": ["D/sub/f.h5"]}
    assert _skipped_keys([*sent, ("/~/a/x", "J3", False)], ["/a/x", "/x"], "/") == {"/a/x": ["J3"], "/x": ["J1"]}


def test_dot_dot_in_a_destination_is_collapsed_as_globus_reports_it() -> None:
    assert _norm("/proj/run/../x") == "/proj/x"
    assert _norm("~/a/./b//") == "/~/a/b"
    assert _norm("//x") == "/x"
    sent = [("/~/x", "J1", False), (_norm("/proj/run/../x"), "/proj/run/../x", False)]
    assert _skipped_keys(sent, ["/proj/x"], "/home/me") == {"/proj/x": ["/proj/run/../x"]}


@pytest.mark.parametrize("home", ["/", None])
def test_a_skipped_file_fails_its_own_item_or_with_no_home_read_a_try_of_every_item(tmp_path: Path, home) -> None:
    if home:
        home_listing(REMOTE_EP, home)
    else:
        home_listing(REMOTE_EP, status=403)
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data" / "j1" / "x"), "/~/x"),
             TransferFile(str(site / "data" / "j2" / "x"), "/~/a/x")]
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (2 files)", "/a/x", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == (["done", "pending"] if home else ["pending", "pending"])


def test_a_skipped_dot_dot_destination_fails_its_own_item(tmp_path: Path) -> None:
    site = tmp_path / "site"
    backend = make_backend(tmp_path)
    files = [TransferFile(str(site / "data" / "j1" / "x"), "/~/x"),
             TransferFile(str(site / "data" / "j2" / "x"), "/proj/run/../x")]
    home_listing(REMOTE_EP, "/home/me/")
    load_response(globus_sdk.TransferClient.submit_transfer)
    backend.submit(LOCATION, TransferDirection.stage_out, files)
    succeeded_with_skipped("balsam stage-out (2 files)", "/proj/x", dest_ep=REMOTE_EP)
    updates = apply(tmp_path, backend, files, direction="out")
    assert [updates[i]["state"] for i in (1, 2)] == ["done", "pending"]
    assert updates[2]["transfer_info"]["error"] == "FILE_NOT_FOUND: No such file"


def live_states(tmp_path: Path, workdirs: list[str], skipped: int, reported: str, home: str = "/") -> list[str]:
    """The real transfers module on the live API (the caller's ``balsam_env``): a site whose
    collection sees it in the home directory (``globus_endpoint_site_path: /~/``), one job per
    workdir staging a file in, all in one Globus task; Globus skips job ``skipped``'s file,
    reporting it as ``reported`` (under ``/~/`` resolved to ``home``, which an ls of the site's
    collection answers; "" for a refused ls). The jobs' states after the next cycle."""
    from balsam.api import Job

    client, site_path, site = globus_site(tmp_path, "/~/")
    Fetch = stage_in_app(site, "Fetch", NAME)
    jobs = Job.objects.bulk_create([Job(wd, Fetch, transfers={"raw": f"aps:/data/run {n}/{NAME}"})
                                    for n, wd in enumerate(workdirs)])
    module = globus_module(tmp_path, site, client, "/~/")

    load_response(globus_sdk.TransferClient.submit_transfer)
    module.run_cycle()
    sent = [d["destination_path"] for d in submitted()]
    assert sorted(sent) == sorted(f"/~/data/{wd}/{NAME}" for wd in workdirs)

    home_listing(SITE_EP, home) if home else home_listing(SITE_EP, status=403)
    succeeded_with(f"balsam stage-in ({len(jobs)} files)", [(f"/data/run {skipped}/{NAME}", reported)], SITE_EP,
                   "globus_xio: System error in open: No such file or directory",
                   files=len(jobs), files_transferred=len(jobs) - 1)
    module.run_cycle()
    return [client.get(f"/jobs/{j.id}")["state"] for j in jobs]


@pytest.mark.parametrize("home", ["/", ""])
def test_live_a_home_of_slash_never_stages_in_the_job_whose_file_was_skipped(balsam_env, tmp_path: Path, home) -> None:
    """The home is ``/``. Job 1's file (workdir ``x/data/w``) is reported ``/data/x/data/w/...``,
    which is job 0's home path too, under a home of ``/data/x``: job 1 was STAGED_IN, job 0 FAILED.
    With the home read from Globus, job 1 alone fails; not read, both fail their (only) try:
    neither runs without its input."""
    responses.add_passthru(balsam_env.url)
    assert live_states(tmp_path, ["w", "x/data/w"], 1, f"/data/x/data/w/{NAME}", home) == (
        ["STAGED_IN", "FAILED"] if home else ["FAILED", "FAILED"])


def test_live_a_home_of_slash_fails_only_the_job_whose_file_was_skipped(balsam_env, tmp_path: Path) -> None:
    """The home is ``/``: only job 1 fails (the path matched no item: both failed)."""
    responses.add_passthru(balsam_env.url)
    assert live_states(tmp_path, ["w", "v"], 1, f"/data/v/{NAME}") == ["STAGED_IN", "FAILED"]
