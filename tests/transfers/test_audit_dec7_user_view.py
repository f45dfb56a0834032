"""Data staging as a user meets it (transfers audit, Dec 7).

- A stage-out whose source in the workdir is a symbolic link to a file or directory outside it (a
  run's result written in scratch and linked into the workdir) failed its job at once, not retried:
  ``local_path 'result.h5' leads outside the job's workdir (/scratch/...)``, with every backend.
  Balsam 0.7 read ``workdir/local_path``, and docs/transfers.md says a single-file item whose source
  is a link arrives as what it points to. A stage-out's source is read wherever its link points; a
  stage-in (what writes) through a link out of the workdir is still refused.
- The cycle's INFO summary counted the updates that wrote only a reason or progress (items waiting
for a free transfer slot) under ``'?'``: ``updates {'active': 1, '?': 2}`` read as two items in an
unknown state. They are counted under a name that says what they are.

The first on the live server with a real site, the built-in ``local`` and ``rsync`` backends
copying for real; the second with the FakeAPI of transfer_test_utils in the server's place."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from balsam.api import ApplicationDefinition, Job
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from transfer_test_utils import FakeAPI, finish_as_a_launcher, init_transfer_site, run_cycles, settled, transfers_module

LOCATIONS = {"proj": "local://", "rs": "rsync:///"}


def _failures(client: Any, job_id: int) -> list[str]:
    return [e["data"]["error"] for e in client.get("/events/", params={"job_id": job_id})["results"]
            if e["data"].get("error")]


def _run_until_settled(site: Any, client: Any, what: str) -> None:
    """The site's transfers module, cycle after cycle, until no item of the site is in flight."""
    module = transfers_module(site, client, locations=LOCATIONS)
    try:
        run_cycles(module, lambda: settled(client, site.site_id), what)
    finally:
        module.close()


def test_a_symlinked_result_is_staged_out_as_what_it_points_to(balsam_env: Any, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    (scratch / "tree" / "sub").mkdir(parents=True)
    (scratch / "run42.h5").write_text("the result")
    (scratch / "tree" / "sub" / "f.txt").write_text("in the tree")
    client, site = init_transfer_site(tmp_path, "symlinked-results", LOCATIONS)
    slots = {"result": {"required": True, "direction": "out", "local_path": "result.h5"},
             "tree": {"required": True, "direction": "out", "local_path": "tree", "recursive": True}}
    app = type("Sim", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true", "transfers": slots})
    app.sync()
    data, results = Path(site.data_path), tmp_path / "results"
    jobs = {}
    for alias in LOCATIONS:
        job = Job(f"runs/{alias}", app, transfers={"result": f"{alias}:{results}/{alias}.h5",
                                                   "tree": f"{alias}:{results}/{alias}-tree"})
        job.save()
        jobs[alias] = job
        (data / job.workdir).mkdir(parents=True)
        os.symlink(scratch / "run42.h5", data / job.workdir / "result.h5")  # the run linked its outputs
        os.symlink(scratch / "tree", data / job.workdir / "tree")
        finish_as_a_launcher(client, site.site_id, job.id)
    _run_until_settled(site, client, "the end of the stage-outs")
    for alias, job in jobs.items():
        assert (client.get(f"/jobs/{job.id}")["state"], _failures(client, job.id)) == ("JOB_FINISHED", []), alias
        shipped, tree = results / f"{alias}.h5", results / f"{alias}-tree"
        assert not shipped.is_symlink() and shipped.read_text() == "the result", alias
        assert not tree.is_symlink() and (tree / "sub" / "f.txt").read_text() == "in the tree", alias


def test_a_stage_in_through_a_link_out_of_the_workdir_is_still_refused(balsam_env: Any, tmp_path: Path) -> None:
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (shared / "in.h5").write_text("input")
    client, site = init_transfer_site(tmp_path, "linked-inputs", LOCATIONS)
    slots = {"raw": {"required": True, "direction": "in", "local_path": "inputs/raw.h5"}}
    app = type("Fetch", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true", "transfers": slots})
    app.sync()
    jobs = {}
    for alias in LOCATIONS:
        job = Job(f"fetch/{alias}", app, transfers={"raw": f"{alias}:{shared}/in.h5"})
        job.save()
        jobs[alias] = job
        (Path(site.data_path) / job.workdir).mkdir(parents=True)
        os.symlink(outside, Path(site.data_path) / job.workdir / "inputs")
    _run_until_settled(site, client, "the end of the stage-ins")
    for alias, job in jobs.items():
        assert client.get(f"/jobs/{job.id}")["state"] == "FAILED", alias
        (error,) = _failures(client, job.id)
        assert error == f"local_path 'inputs/raw.h5' leads outside the job's workdir ({outside.resolve() / 'raw.h5'})"
    assert list(outside.iterdir()) == []

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def test_cycle_summary_names_the_updates_that_wrote_only_a_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    items, jobs = [], []
    for i in (1, 2, 3):
        (src / f"{i}.h5").write_text(f"data {i}")
        items.append({"id": i, "job_id": i, "direction": "in", "location_alias": "proj", "remote_path": str(src / f"{i}.h5"),
                      "local_path": "in.h5", "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}})
        jobs.append({"id": i, "workdir": f"job{i}", "state": "READY"})
    api = FakeAPI(items, jobs)
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1), TransfersOptions(transfer_locations={"proj": "local://"}, max_concurrent_transfers=1,
                                                          transfer_batch_size=1, service_period=1), api)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.transfers")
    try:
        module.run_cycle()
    finally:
        module.close()
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle:")]
    assert api.states() == {"active": 1, "pending": 2}
    assert "waiting for a free transfer slot" in str(api.items[2])
    assert "'?'" not in summary, summary
    assert summary.endswith("updates {'active': 1, 'no new state': 2}"), summary
