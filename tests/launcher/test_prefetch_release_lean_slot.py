"""A lean serial launcher (it gave back jobs held while every slot was busy) fills a slot that frees
beside a job that cannot be placed now, and does not give that job back while the slot is free.

Before: with a whole-node job held (it cannot share the node with the long job still running) the
lean prefetcher leased nothing for the slot the first job freed, and the loop gave the whole-node
job back every 5 s and leased it again (0 of 8 small jobs finished in 30 s; 8 of 8 without the
giving back). Real components: a uvicorn server, the serial launcher as the job template starts it
(one node of 2 CPUs, jobs packed 2 to a node: 2 slots), jobs that sleep. No timed assertion: the
test waits for states (the bound, PREFETCH_RELEASE_SEC, is 5 s)."""

from __future__ import annotations

import pytest

from launcher_harness import end_allocation, serial_launcher_on_cpus
from launcher_helpers import make_runnable, run_counts, site_logs, synced_app, wait_for_states

DONE = {"RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"}


@pytest.mark.slow
def test_a_lean_launcher_fills_the_slot_beside_a_job_that_needs_the_whole_node(new_site) -> None:
    name, path = new_site(idle_ttl_sec=600)
    Sleeper = synced_app(name, "Sleeper", "sleep {{ secs }}")
    # Leased in id order: J0 (8 s) and J1 (300 s) fill the 2 slots; B needs the whole node; then small jobs.
    specs = [(2, 8), (2, 300), (1, 1)] + [(2, 1)] * 8
    ids = make_runnable(Sleeper.submit(workdir=f"s/{i}", node_packing_count=packing, secs=secs, save=False)
                        for i, (packing, secs) in enumerate(specs))
    with serial_launcher_on_cpus(path, [0, 1], 10) as proc:
        wait_for_states(ids[:1], DONE, timeout=90)
        # The slot J0 freed runs the small jobs while J1 runs and B waits for the whole node.
        wait_for_states(ids[3:], DONE, timeout=90)
        assert end_allocation(proc) == 0
    runs = run_counts(ids)
    assert runs.get(ids[2], 0) == 0 and all(runs.get(i, 0) == 1 for i in ids[:2] + ids[3:]), runs
    logs = site_logs(path)
    # Given back while both slots were busy (at the start), not every 5 s while a slot was free.
    assert logs.count("given back to the server") <= 2, logs.count("given back to the server")
