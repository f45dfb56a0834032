"""``balsam site mv`` while BatchJobs are queued, and sites inside other sites' directories
(``site init`` / ``site mv`` into one, ``site rm`` of a tree holding one), through the CLI and a real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result


@pytest.fixture(autouse=True)
def _outside_any_site(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)


def balsam(*args: str) -> Result:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def init(path: Path) -> int:
    out = balsam("site", "init", str(path), "-n", path.name, "--platform", "default")
    assert out.exit_code == 0, out.output
    return int((path / ".balsam-site").read_text())


def error_line(out: Result) -> str:
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output
    return lines[0]


def sites_by_name(client) -> dict:
    return {s["name"]: s for s in client.get("/sites/")["results"]}


@pytest.mark.parametrize("state", ["queued", "running", "pending_deletion"])
def test_mv_refuses_while_a_batch_job_is_in_the_scheduler(balsam_env, client, tmp_path, state) -> None:
    """Before: the directory moved; a running launcher kept the old path (its login file gone: the
    jobs it leased failed with NotLoggedIn) and a queued BatchJob started a script from the old qsubmit/."""
    from balsam.api import BatchJob

    src, dest = tmp_path / "s1", tmp_path / "s1moved"
    site_id = init(src)
    bj = BatchJob(site_id=site_id, num_nodes=1, wall_time_min=5, queue="local", project="local", job_mode="mpi")
    bj.save()
    bj.state = "queued"
    bj.scheduler_id = 4242
    bj.save()
    if state != "queued":
        bj.state = state
        bj.save()
    line = error_line(balsam("site", "mv", str(src), str(dest)))
    assert line == (f"Error: site s1 has 1 BatchJob(s) queued or running: cancel them first with `balsam queue term "
                    f"SCHEDULER_ID --site {site_id}` (see `balsam queue ls --site {site_id}`) and let the site agent "
                    "remove them from the scheduler")
    assert (src / ".balsam-site").exists() and not dest.exists()
    assert client.get(f"/sites/{site_id}")["path"] == str(src)

    bj.state = "finished"
    bj.save()
    out = balsam("site", "mv", str(src), str(dest))
    assert out.exit_code == 0 and f"Moved site {site_id} to {dest}" in out.output, out.output
    assert client.get(f"/sites/{site_id}")["path"] == str(dest)


def test_init_refuses_a_path_inside_another_site_or_holding_one(balsam_env, client, tmp_path) -> None:
    outer = tmp_path / "s2"
    outer_id = init(outer)
    nested = outer / "data" / "nested"
    line = error_line(balsam("site", "init", str(nested), "-n", "nested", "--platform", "default"))
    assert line == (f"Error: {nested} is inside the Balsam site {outer} (site id {outer_id}): choose a directory "
                    "outside any site")
    assert not nested.exists() and "nested" not in sites_by_name(client)
    # deeper, through a directory that does not exist yet
    line = error_line(balsam("site", "init", str(outer / "log" / "a" / "b"), "-n", "deep", "--platform", "default"))
    assert f"is inside the Balsam site {outer} (site id {outer_id})" in line
    assert not (outer / "log" / "a").exists()
    # a directory holding a site
    line = error_line(balsam("site", "init", str(tmp_path), "-n", "holder", "--platform", "default"))
    assert line == (f"Error: {tmp_path} holds the Balsam site {outer} (site id {outer_id}): choose a directory "
                    "holding no site")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["balsam-home", "s2"]
    assert "holder" not in sites_by_name(client)


def test_mv_refuses_a_destination_inside_another_site(balsam_env, client, tmp_path) -> None:
    outer, inner = tmp_path / "s2", tmp_path / "s3"
    outer_id, inner_id = init(outer), init(inner)
    line = error_line(balsam("site", "mv", str(inner), str(outer / "data")))
    assert line == (f"Error: {outer / 'data' / 's3'} is inside the Balsam site {outer} (site id {outer_id}): "
                    "choose a directory outside any site")
    assert (inner / ".balsam-site").exists() and client.get(f"/sites/{inner_id}")["path"] == str(inner)
    line = error_line(balsam("site", "mv", str(inner), str(outer / "data" / "renamed")))
    assert f"{outer / 'data' / 'renamed'} is inside the Balsam site {outer}" in line
    assert (inner / ".balsam-site").exists() and not (outer / "data" / "renamed").exists()


def test_rm_refuses_a_tree_holding_another_site(balsam_env, client, tmp_path) -> None:
    """Before: ``site rm s2`` deleted s2/data/s3 with it (its record left, its agent orphaned)."""
    outer, inner = tmp_path / "s2", tmp_path / "s3"
    outer_id, inner_id = init(outer), init(inner)
    # Nested by hand (or by an older balsam): rm of the outer site names it and deletes nothing.
    shutil.move(str(inner), str(outer / "data" / "s3"))
    line = error_line(balsam("site", "rm", str(outer), "-y"))
    assert line == (f"Error: {outer} holds another Balsam site, {outer / 'data' / 's3'} (site id {inner_id}): move "
                    f"it out (`balsam site mv {outer / 'data' / 's3'} NEW_PATH`) or delete it (`balsam site rm`) first")
    assert (outer / "data" / "s3" / ".balsam-site").exists()
    assert {outer_id, inner_id} <= {s["id"] for s in sites_by_name(client).values()}

    # Moving it out is allowed, and then rm goes ahead (a symbolic link to it is not followed, by rm either).
    out = balsam("site", "mv", str(outer / "data" / "s3"), str(inner))
    assert out.exit_code == 0, out.output
    (outer / "data" / "link-to-s3").symlink_to(inner)
    out = balsam("site", "rm", str(outer), "-y")
    assert out.exit_code == 0 and not outer.exists(), out.output
    assert (inner / ".balsam-site").exists() and client.get(f"/sites/{inner_id}")["path"] == str(inner)


def _count_tree_reads(monkeypatch, root: Path) -> list:
    """The directories of ``root``'s tree read by path (the nested-site search; rmtree reads by fd)."""
    reads: list = []
    real_scandir = os.scandir

    def scandir(target=".", *args, **kwargs):
        if isinstance(target, (str, Path)) and str(target).startswith(str(root)):
            reads.append(str(target))
        return real_scandir(target, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    return reads


def test_rm_searches_the_tree_only_after_the_cheap_refusals_and_bounded(balsam_env, client, tmp_path,
                                                                        monkeypatch) -> None:
    """Before: the unbounded search for a nested site ran first, before the refusal for a queued
    BatchJob (and the agent checks, and the prompt): 10-20 minutes on Lustre for a million workdirs."""
    from balsam.api import BatchJob
    from balsam.cli import site_commands

    path = tmp_path / "big"
    site_id = init(path)
    for i in range(30):
        (path / "data" / f"w{i}").mkdir()
    bj = BatchJob(site_id=site_id, num_nodes=1, wall_time_min=5, queue="local", project="local", job_mode="mpi")
    bj.save()
    bj.state = "queued"
    bj.scheduler_id = 4243
    bj.save()
    reads = _count_tree_reads(monkeypatch, path)
    line = error_line(balsam("site", "rm", str(path), "-y"))
    assert "has 1 BatchJob(s) queued or running" in line
    assert reads == []  # refused without reading the tree

    bj.state = "finished"
    bj.save()
    monkeypatch.setattr(site_commands, "RM_SEARCH_DIRS", 5, raising=False)
    out = balsam("site", "rm", str(path), "-y")
    assert out.exit_code == 0 and not path.exists(), out.output
    assert len(reads) == 5, reads
    assert (f"Note: looked for other Balsam sites in the first 5 directories of {path} only (none there); "
            "the rest is deleted unsearched") in out.output
