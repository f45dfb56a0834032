"""A due stage-in waiting for a submission slot (``max_concurrent_transfers`` tasks in flight) showed
no reason at all (``pending``, ``-`` in `balsam transfer ls`), as an item no agent had read. It now
says why it waits, written once (not every cycle), and the reason goes when it is submitted (real
server, real module, real local copies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.api import ApplicationDefinition, Job
from transfer_test_utils import hold_copies, init_transfer_site, job_state, run_cycles, settled, transfers_module

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")

SLOT_REASON = ("waiting for a free transfer slot: all transfers.max_concurrent_transfers (1) are taken (by tasks in "
               "flight, or by a submission refused this cycle)")


def test_items_waiting_for_a_slot_say_so_once(env: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, site = init_transfer_site(tmp_path, "slots")
    shared = tmp_path / "shared"
    shared.mkdir()
    app = type("Slotted", (ApplicationDefinition,), {"site": site.site_id, "command_template": "true", "transfers": {
        "inp": {"required": False, "direction": "in", "local_path": "in.txt"}}})
    app.sync()
    jobs = []
    for n in range(3):
        (shared / f"{n}.txt").write_text(f"input {n}")
        jobs.append(Job(f"w/{n}", app, transfers={"inp": f"shared:{shared}/{n}.txt"}))
        jobs[-1].save()
    gate = hold_copies(monkeypatch, "w/0/in.txt")  # the first task stays in flight until set
    module = transfers_module(site, client, max_concurrent_transfers=1, transfer_batch_size=1)
    patched: list[int] = []
    real_patch = module.client.patch

    def patch(path: str, **kw: object) -> object:
        patched.extend(int(row["id"]) for row in kw["json"])  # type: ignore[index]
        return real_patch(path, **kw)

    monkeypatch.setattr(module.client, "patch", patch)
    try:
        module.run_cycle()
        rows = {r["job_id"]: r for r in client.get("/transfers/", params={"site_id": site.site_id})["results"]}
        assert rows[jobs[0].id]["state"] == "active"
        for job in jobs[1:]:
            assert rows[job.id]["state"] == "pending"
            assert rows[job.id]["transfer_info"]["reason"] == SLOT_REASON
        # Still full: the reason is not written again.
        patched.clear()
        module.run_cycle()
        assert not set(patched) & {rows[job.id]["id"] for job in jobs[1:]}
    finally:
        gate.set()
    run_cycles(module, lambda: settled(client, site.site_id), "every stage-in done")
    for job in jobs:
        assert job_state(client, job.id) == "STAGED_IN"
        assert (Path(site.data_path) / job.workdir / "in.txt").read_text() == f"input {str(job.workdir)[-1]}"
    for row in client.get("/transfers/", params={"site_id": site.site_id})["results"]:
        assert "reason" not in row["transfer_info"], row
