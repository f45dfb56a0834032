"""Two transfer items writing the same destination (two jobs staging out to one path of a location):
the real server (SQLite and PostgreSQL), the ``transfers`` module run cycle by cycle, the built-in
``local`` backend copying for real.

A backend names a done task's failed files by destination (the contract's ``file_errors``), so two
items of one task with the same destination could not be told apart: one missing file failed a try
of both, the other's delivered file with it (its job FAILED at ``max_attempts`` for a file it had).
Items with the same destination now never share a task, nor run beside a task writing it: the
later item waits (no try used) for the one before it, so each failure is its own item's and the
last copy to land is the later item's. Directories (recursive slots) of many jobs into one results
directory merge, as before, in one task (that first version sent them one job per task, one after
another: 8 jobs, 8 tasks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam.api import ApplicationDefinition, Job
from transfer_test_utils import (finish_as_a_launcher, init_transfer_site, job_state, make_site, run_cycles,
                                 transfers_module)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def out_item(client: Any, job_id: int) -> dict:
    (row,) = client.get("/transfers/", params={"job_id": job_id, "direction": "out"})["results"]
    return row


def test_two_stage_outs_to_one_path_fail_and_land_each_on_its_own(env: Any, tmp_path: Path) -> None:
    client, site, site_id, step, _, module = make_site(tmp_path, "xfer-same-dest", max_attempts=1)
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "latest.txt"
    jobs = [Job(f"runs/{name}", step, transfers={"result": f"shared:{target}"}) for name in ("a", "b")]
    for job in jobs:
        job.save()
    a, b = jobs
    data = Path(site.data_path)
    # a's run wrote no result.txt (its stage-out fails); b's did.
    (data / "runs/b").mkdir(parents=True)
    (data / "runs/b/result.txt").write_text("b's result\n")
    for job in jobs:
        finish_as_a_launcher(client, site_id, job.id)
    assert out_item(client, a.id)["state"] == out_item(client, b.id)["state"] == "pending"
    try:
        module.run_cycle()
        first, second = out_item(client, a.id), out_item(client, b.id)
        run_cycles(module, lambda: job_state(client, b.id) in ("JOB_FINISHED", "FAILED"), "b's stage-out")
        # a's missing file failed a alone (one try: its job FAILED); b's file was delivered.
        assert out_item(client, b.id)["state"] == "done"
        assert job_state(client, b.id) == "JOB_FINISHED"
        assert out_item(client, a.id)["state"] == "error"
        assert job_state(client, a.id) == "FAILED"
        assert target.read_text() == "b's result\n"
        # Not one task for both: b waited for a's (no try used), with the reason.
        assert first["state"] == "active" and second["state"] == "pending"
        assert second["transfer_info"]["reason"].startswith("waiting for an earlier transfer that writes the same file")
        assert not second["transfer_info"].get("attempts")
    finally:
        module.close()


def test_results_directories_of_many_jobs_merge_into_one_directory_in_one_task(env: Any, tmp_path: Path) -> None:
    client, site = init_transfer_site(tmp_path, "xfer-merge")
    app = type("Merge", (ApplicationDefinition,), {
        "site": site.site_id, "command_template": "true",
        "transfers": {"out": {"required": True, "direction": "out", "local_path": "results", "recursive": True}}})
    app.sync()
    shared = tmp_path / "shared" / "all-results"
    shared.mkdir(parents=True)
    data = Path(site.data_path)
    jobs = []
    for n in range(8):
        job = Job(f"runs/{n}", app, transfers={"out": f"shared:{shared}"})
        job.save()
        (data / f"runs/{n}/results").mkdir(parents=True)
        (data / f"runs/{n}/results/job_{n}.txt").write_text(f"{n}\n")
        jobs.append(job)
    for job in jobs:
        finish_as_a_launcher(client, site.site_id, job.id)
    module = transfers_module(site, client, transfer_batch_size=100, max_concurrent_transfers=5)
    backend = module.backend("local")
    sizes: list[int] = []
    real = backend.submit

    def submit(location: Any, direction: Any, files: Any, token: Any = None) -> str:
        sizes.append(len(files))
        return real(location, direction, files, token)

    backend.submit = submit  # type: ignore[method-assign]
    try:
        run_cycles(module, lambda: all(job_state(client, j.id) == "JOB_FINISHED" for j in jobs), "every job finished")
    finally:
        module.close()
    assert sizes == [8]  # one task for the 8 directories (not 8 tasks one after another)
    assert sorted(p.name for p in shared.iterdir()) == [f"job_{n}.txt" for n in range(8)]
