"""Symbolic links that lead nowhere, loops, and links inside a copied tree (a review of 3845f23).

- A link loop where a stage-in writes (``inputs -> inputs``, ``local_path: inputs/raw.h5``) made
  ``item_transfer_paths`` raise RuntimeError (Python 3.11's ``Path.resolve``), neither a
  TransferError nor an OSError: it left the cycle, every cycle, and no item of any job of the site
  moved. Now the item fails for good with an error naming its ``local_path`` and the loop, and any
  other unexpected error of one item's paths fails that item only (in ``_submit``; in
  ``_recover_dests`` the item stays without its destination), never the cycle.
- A stage-out whose source is a link to nothing, or a loop, read ``no such file or directory:
  <path>`` (``ls`` lists it) and was retried ``max_attempts`` times with backoff. Now it fails at
  once, naming the link (``... is a symbolic link to X, which does not exist``), and the rsync
  backend's look before it runs says the same.
- In a recursive item, ``local`` and ``rsync`` treated links differently: a link out of the tree to
  nothing was copied dangling by ``local`` (the job finished) and failed the item with rsync; a
  directory linked in from scratch was copied by ``local`` with its own absolute links still
  pointing into scratch, where rsync copied their files. Now ``local`` judges every link as rsync's
  ``--copy-unsafe-links`` does, inside a directory so copied too, and fails a link out of the tree
  that leads nowhere.
- The cycle's summary counted a running task's progress update under ``'active'`` (the state its
  items already had). Now a state is counted only when it changed; the rest is ``'no new state'``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import balsam.site.modules.transfers as transfers_mod
from balsam.api import ApplicationDefinition, Job
from balsam.builtin.local_transfer import LocalTransfer
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule, TransfersOptions, item_transfer_paths
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TaskStatus, TransferError, TransferFile, TransferLocation, build_backend
from transfer_test_utils import FakeAPI, init_transfer_site, run_cycles, settled, transfers_module

LOCATIONS = {"proj": "local://", "rs": "rsync:///"}
LOOP = "leads through a symbolic link loop in the job's workdir"


def _module(site: Path, api: FakeAPI, **opts: Any) -> TransfersModule:
    options = dict(transfer_locations={"proj": "local://"}, service_period=1, retry_backoff_sec=3600, max_attempts=3)
    options.update(opts)
    return TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                           TransfersOptions(**options), api)


def _item(item_id: int, direction: str, local_path: str, remote_path: str, **more: Any) -> dict:
    return {"id": item_id, "job_id": item_id, "direction": direction, "location_alias": "proj", "remote_path": remote_path,
            "local_path": local_path, "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}, **more}


def _cycles_until_still(module: TransfersModule, api: FakeAPI, cycles: int = 50) -> None:
    """Cycles until no item is in flight (the count only keeps a broken test from hanging)."""
    for _ in range(cycles):
        module.run_cycle()
        if not any(it["state"] in ("active", "inactive") for it in api.items.values()):
            return
    raise AssertionError(f"items still in flight: {api.states()}")


# -- a loop where a stage-in writes -------------------------------------------------------------


def test_a_stage_in_through_a_link_loop_fails_its_job_and_the_job_beside_it_is_staged_in(balsam_env: Any,
                                                                                          tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.h5").write_text("input")
    client, site = init_transfer_site(tmp_path, "link-loop", LOCATIONS)
    One = type("One", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true",
               "transfers": {"raw": {"required": True, "direction": "in", "local_path": "inputs/raw.h5"}}})
    One.sync()
    data = Path(site.data_path)
    jobs = {}
    for alias in LOCATIONS:
        # The loop's job between two healthy ones of the same location (one batch each way of ids).
        for name in ("healthy", "loop", "healthy2"):
            job = Job(f"in/{name}-{alias}", One, transfers={"raw": f"{alias}:{shared}/in.h5"})
            job.save()
            workdir = data / job.workdir
            workdir.mkdir(parents=True)
            if name == "loop":
                os.symlink("inputs", workdir / "inputs")
            jobs[(name, alias)] = job
    module = transfers_module(site, client, locations=LOCATIONS, max_attempts=3)
    try:
        # Before: RuntimeError: Symlink loop from '.../inputs/raw.h5' out of every cycle.
        run_cycles(module, lambda: settled(client, site.site_id), "the end of the stage-ins", cycles=60)
    finally:
        module.close()
    for (name, alias), job in jobs.items():
        state = client.get(f"/jobs/{job.id}")["state"]
        if name == "loop":
            assert state == "FAILED", (name, alias, state)
            errors = [e["data"]["error"] for e in client.get("/events/", params={"job_id": job.id})["results"]
                      if e["data"].get("error")]
            assert any(f"local_path 'inputs/raw.h5' {LOOP}" in e for e in errors), errors
        else:
            assert state == "STAGED_IN", (name, alias, state)
            assert (data / job.workdir / "inputs" / "raw.h5").read_text() == "input"


def test_item_transfer_paths_turns_a_loop_into_a_transfer_error_naming_the_local_path(tmp_path: Path) -> None:
    workdir = tmp_path / "job"
    workdir.mkdir()
    os.symlink("inputs", workdir / "inputs")
    with pytest.raises(TransferError) as caught:
        item_transfer_paths({"direction": "in", "local_path": "inputs/raw.h5", "remote_path": "/r/raw.h5"}, workdir)
    assert not caught.value.retryable
    assert str(caught.value) == (f"local_path 'inputs/raw.h5' {LOOP} ({workdir}/inputs is a symbolic link to inputs: "
                                 "a symbolic link loop)")


def test_an_unexpected_error_of_one_items_paths_fails_that_item_not_the_cycle(tmp_path: Path, monkeypatch,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2):
        (src / f"{i}.h5").write_text(f"data {i}")
    api = FakeAPI([_item(i, "in", "in.h5", str(src / f"{i}.h5")) for i in (1, 2)],
                  [{"id": i, "workdir": f"job{i}", "state": "READY"} for i in (1, 2)])
    real = transfers_mod.item_transfer_paths

    def paths(item, workdir):
        if item["id"] == 1:
            raise KeyError("something no one expected")
        return real(item, workdir)

    monkeypatch.setattr(transfers_mod, "item_transfer_paths", paths)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.transfers")
    module = _module(site, api)
    try:
        _cycles_until_still(module, api)
    finally:
        module.close()
    assert api.items[1]["state"] == "error"
    assert api.items[1]["transfer_info"]["error"] == "unexpected error reading its paths: KeyError: 'something no one expected'"
    assert api.items[2]["state"] == "done"
    assert (site / "data" / "job2" / "in.h5").read_text() == "data 2"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "something no one expected" in r.getMessage()]
    assert len(lines) == 1 and "items 1 (job 1)" in lines[0], lines


def test_an_item_re_attached_from_the_journal_through_a_loop_does_not_stop_the_cycle(tmp_path: Path) -> None:
    """_recover_dests: the agent died after submitting, its task line is in the journal."""
    site = tmp_path / "site"
    workdir = site / "data" / "job1"
    workdir.mkdir(parents=True)
    os.symlink("inputs", workdir / "inputs")
    src = tmp_path / "raw.h5"
    src.write_text("raw")
    api = FakeAPI([_item(1, "in", "inputs/raw.h5", str(src))], [{"id": 1, "workdir": "job1", "state": "READY"}])
    (site / JOURNAL_NAME).write_text('{"task_id": "local:gone", "item_ids": [1], "holds": [0]}\n')
    module = _module(site, api)
    try:
        module.run_cycle()  # before: RuntimeError: Symlink loop from '.../inputs/raw.h5'
        _cycles_until_still(module, api)
        module.run_cycle()  # the item put back (its task unknown) is submitted: refused for good
    finally:
        module.close()
    assert api.items[1]["state"] == "error", api.items[1]
    assert LOOP in api.items[1]["transfer_info"]["error"]


def test_an_unexpected_error_re_attaching_an_item_leaves_it_without_its_destination(tmp_path: Path, monkeypatch,
                                                                                    caplog) -> None:
    site = tmp_path / "site"
    (site / "data" / "job1").mkdir(parents=True)
    api = FakeAPI([_item(1, "in", "in.h5", "/r/raw.h5")], [{"id": 1, "workdir": "job1", "state": "READY"}])
    (site / JOURNAL_NAME).write_text('{"task_id": "local:gone", "item_ids": [1], "holds": [0]}\n')
    monkeypatch.setattr(transfers_mod, "item_transfer_paths", lambda item, workdir: {}["boom"])
    caplog.set_level(logging.INFO, logger="balsam.site.modules.transfers")
    module = _module(site, api)
    try:
        module.run_cycle()
    finally:
        module.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == ["transfer item 1 (job 1): unexpected error reading its paths: KeyError: 'boom'"], lines


# -- a stage-out's source that is a link to nothing, or a loop ------------------------------------


@pytest.mark.parametrize("alias,url", [("proj", "local://"), ("rs", "rsync:///")])
@pytest.mark.parametrize("shape", ["dangling", "chain", "selfloop", "loop-above"])
def test_a_stage_out_of_a_broken_link_is_an_error_naming_the_link(tmp_path: Path, shape: str, alias: str,
                                                                    url: str) -> None:
    site = tmp_path / "site"
    workdir = site / "data" / "job1"
    workdir.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    local_path = "result.h5"
    if shape == "dangling":
        os.symlink(scratch / "run42.h5", workdir / "result.h5")
        error = f"{workdir}/result.h5 is a symbolic link to {scratch}/run42.h5, which does not exist"
    elif shape == "chain":
        os.symlink(scratch / "run42.h5", workdir / "inner.h5")
        os.symlink("inner.h5", workdir / "result.h5")
        error = (f"{workdir}/result.h5 is a symbolic link to inner.h5 (which leads to {scratch}/run42.h5), "
                 "which does not exist")
    elif shape == "selfloop":
        os.symlink("result.h5", workdir / "result.h5")
        error = f"{workdir}/result.h5 is a symbolic link to result.h5: a symbolic link loop"
    else:
        os.symlink(scratch / "a", scratch / "b")
        os.symlink(scratch / "b", scratch / "a")
        os.symlink(scratch / "a", workdir / "out")
        local_path = "out/result.h5"
        error = f"{workdir}/out is a symbolic link to {scratch}/a: a symbolic link loop"
    item = {**_item(1, "out", local_path, str(tmp_path / "results" / "r.h5")), "location_alias": alias}
    api = FakeAPI([item], [{"id": 1, "workdir": "job1", "state": "POSTPROCESSED"}])
    module = _module(site, api, transfer_locations={alias: url})
    try:
        _cycles_until_still(module, api)
    finally:
        module.close()
    # Before: 'no such file or directory: <workdir>/result.h5' for every shape. A loop stays a loop:
    # failed at once. A link to nothing is retried as a missing plain file is (its target may yet
    # appear: an NFS client's cached "not found"), with the error naming the link.
    assert api.items[1]["state"] == ("pending" if shape in ("dangling", "chain") else "error"), api.items[1]
    assert api.items[1]["transfer_info"]["error"] == error


def test_the_rsync_backend_names_a_broken_link_as_the_agent_does(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.h5", tmp_path / "result.h5")
    dest = tmp_path / "out" / "r.h5"
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync:///"), TransferDirection.stage_out,
                              [TransferFile(str(tmp_path / "result.h5"), str(dest))])
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert dict(status.file_errors) == {
        str(dest): f"{tmp_path}/result.h5 is a symbolic link to {tmp_path}/gone.h5, which does not exist"}
    assert not dest.parent.exists()


# -- links inside a recursive item: local and rsync alike ----------------------------------------

BACKENDS = {"local": (LocalTransfer, "local", "local://"), "rsync": (RsyncTransfer, "rsync", "rsync:///")}


def _copy(kind: str, src: Path, dest: Path) -> TaskStatus:
    cls, name, url = BACKENDS[kind]
    backend = build_backend(cls, name, {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("x", url), TransferDirection.stage_out,
                              [TransferFile(str(src), str(dest), recursive=True)])
        return wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()


def _listing(path: Path) -> list[str]:
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_symlink():
            out.append(f"{rel} -> {os.readlink(p)}")
        elif p.is_dir():
            out.append(f"{rel}/")
        else:
            out.append(f"{rel}: {p.read_text()}")
    return out


def _scratch(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    (scratch / "tree" / "sub").mkdir(parents=True)
    (scratch / "run42.h5").write_text("the result")
    (scratch / "tree" / "sub" / "f.txt").write_text("in the tree")
    os.symlink("sub/f.txt", scratch / "tree" / "rel_in")
    os.symlink("../run42.h5", scratch / "tree" / "rel_up")
    os.symlink(scratch / "run42.h5", scratch / "tree" / "abs_out")
    return scratch


def test_a_directory_linked_into_a_tree_arrives_the_same_from_local_and_rsync(tmp_path: Path) -> None:
    scratch = _scratch(tmp_path)
    tree = tmp_path / "job" / "tree"
    tree.mkdir(parents=True)
    (tree / "own.txt").write_text("own")
    os.symlink(scratch / "tree", tree / "dirout")
    os.symlink("own.txt", tree / "mine")
    os.symlink("missing", tree / "inside_dangling")  # within the tree: a link, as it is
    os.symlink("loop", tree / "loop")
    got = {}
    for kind in BACKENDS:
        status = _copy(kind, tree, tmp_path / f"out-{kind}")
        assert status.state == TaskState.done and dict(status.file_errors) == {}, (kind, status)
        got[kind] = _listing(tmp_path / f"out-{kind}")
    # Before: local kept dirout/abs_out -> <scratch>/run42.h5, a link into scratch.
    assert got["local"] == got["rsync"] == [
        "dirout/", "dirout/abs_out: the result", "dirout/rel_in -> sub/f.txt", "dirout/rel_up -> ../run42.h5",
        "dirout/sub/", "dirout/sub/f.txt: in the tree", "inside_dangling -> missing", "loop -> loop",
        "mine -> own.txt", "own.txt: own"]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("shape", ["dangling", "loop"])
def test_a_link_out_of_a_tree_that_leads_nowhere_fails_the_item_with_both_backends(tmp_path: Path, kind: str,
                                                                                   shape: str) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tree = tmp_path / "job" / "tree"
    tree.mkdir(parents=True)
    (tree / "own.txt").write_text("own")
    if shape == "dangling":
        os.symlink(scratch / "missing", tree / "out")
    else:
        os.symlink(scratch / "b", scratch / "a")
        os.symlink(scratch / "a", scratch / "b")
        os.symlink(scratch / "a", tree / "out")
    dest = tmp_path / "results"
    status = _copy(kind, tree, dest)
    assert status.state == TaskState.done, status
    (error,) = status.file_errors.values()
    if kind == "local":
        # Before: local copied the link as it was, dangling, and the job finished.
        assert error == (f"{tree}/out is a symbolic link to {scratch}/missing, which does not exist" if shape == "dangling"
                         else f"{tree}/out is a symbolic link to {scratch}/a: a symbolic link loop")
        assert not dest.exists()
    else:
        assert "rsync exited 23" in error and f"{tree}/out" in error, error


def test_local_refuses_a_link_to_a_directory_holding_it_instead_of_copying_it_into_itself(tmp_path: Path) -> None:
    tree = tmp_path / "job" / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("f")
    os.symlink(tree, tree / "sub" / "again")
    status = _copy("local", tree, tmp_path / "results")
    assert dict(status.file_errors) == {str(tmp_path / "results"): (
        f"{tree}/sub/again is a symbolic link to {tree}, a directory holding it (its copy would hold itself, "
        "without end)")}
    assert not (tmp_path / "results").exists()


# -- the cycle's summary ----------------------------------------------------------------------------


def test_a_progress_update_of_a_running_task_is_not_counted_as_a_new_state(tmp_path: Path, monkeypatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    api = FakeAPI([_item(1, "in", "x", "/x", state="active", task_id="local:t1", transfer_info={"submitted": now})],
                  [{"id": 1, "workdir": "j", "state": "READY"}])
    module = _module(site, api)
    monkeypatch.setattr(module.backend("local"), "poll_tasks",
                        lambda ids: {t: TaskStatus(TaskState.active, info={"files": 1, "files_done": 0}) for t in ids})
    caplog.set_level(logging.DEBUG, logger="balsam.site.modules.transfers")
    try:
        module.run_cycle()
    finally:
        module.close()
    assert api.items[1]["transfer_info"]["task"]["files"] == 1  # the progress was written
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle:")]
    # Before: "updates {'active': 1}", as if the item had just become active.
    assert summary.endswith("updates {'no new state': 1}"), summary
    assert [r.levelno for r in caplog.records if r.getMessage().startswith("cycle:")] == [logging.DEBUG]
