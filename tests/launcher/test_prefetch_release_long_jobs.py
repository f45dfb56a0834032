"""A full serial launcher gives back the jobs it leased ahead once they have waited the bound with
every slot busy, and then leases only as slots free: with long jobs, a campaign larger than the
allocation's slots stays visible to the elastic queue (its backlog, ``leased=false``), which can
request another allocation for it now instead of after a slot's whole run.

Real components: a uvicorn server, the serial launcher as the job template starts it (one node of
2 CPUs, jobs packed 2 to a node: 2 slots), jobs that sleep, and the backlog request the elastic
queue sends (``GET /sites/{id}/backlog`` with its runnable states and ``leased=false``). No timing
is asserted: the test waits for states (the bound, PREFETCH_RELEASE_SEC, is 5 s)."""

from __future__ import annotations

import time

import pytest

from launcher_harness import end_allocation, serial_launcher_on_cpus
from launcher_helpers import make_runnable, run_counts, synced_app, wait_for_states

RUNNABLE = ["PREPROCESSED", "RESTART_READY"]


def _backlog(site_id: int, leased: bool) -> int:
    """The runnable jobs the backlog route counts (leased=false: what the elastic queue reads as demand)."""
    from balsam.client.default import get_default_client

    states = get_default_client().get(f"/sites/{site_id}/backlog",
                                      params={"state": RUNNABLE, "leased": "true" if leased else "false"})["states"]
    return sum(int(s["count"]) for s in states.values())


def _wait_for(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.3)


@pytest.mark.slow
def test_a_full_launcher_gives_back_what_it_leased_ahead_and_leases_again_as_slots_free(new_site) -> None:
    from balsam.api import Job

    name, path = new_site(idle_ttl_sec=600)
    site_id = int((path / ".balsam-site").read_text())
    Sleeper = synced_app(name, "Sleeper", "sleep {{ secs }}")
    # Leased in id order: the first two end soon (their slots free once), the others run for long.
    ids = make_runnable(Sleeper.submit(workdir=f"s/{i}", node_packing_count=2, secs=8 if i < 2 else 600, save=False)
                        for i in range(12))
    with serial_launcher_on_cpus(path, [0, 1], 5) as proc:
        wait_for_states(ids[:2], {"RUN_DONE"}, timeout=90)

        def settled() -> bool:
            states = [str(j.state) for j in Job.objects.filter(id=ids)]
            return states.count("RUNNING") == 2 and _backlog(site_id, leased=True) == 0

        # Before the fix the launcher kept its floor (up to 8 jobs) leased behind two busy slots for
        # their whole run: the elastic queue saw 4 jobs of demand where 8 waited.
        _wait_for(f"leased jobs not started stay hidden from the elastic queue: leased={_backlog(site_id, True)}, "
                  f"backlog={_backlog(site_id, False)}", settled)
        assert _backlog(site_id, leased=False) == 8  # every job not running is demand for a new allocation
        assert end_allocation(proc) == 0
    # Slots that freed were filled again (two more jobs ran), and nothing ran twice.
    runs = run_counts(ids)
    assert sorted(runs.values()) == [0] * 8 + [1] * 4, runs
    assert _backlog(site_id, leased=True) == 0
    # The two running at the stop are re-run (RUN_TIMEOUT); the others are runnable again, unheld.
    assert _backlog(site_id, leased=False) == 8
