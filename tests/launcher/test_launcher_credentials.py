"""A launcher on its BatchJob's own credential; revoking it stops the launcher with nothing lost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from launcher_helpers import make_runnable, wait_for_states
from launcher_harness import start_launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def test_revoked_launcher_credential_stops_the_launcher_cleanly(new_site) -> None:
    """Before: a launcher whose token went bad ran blind (388 jobs started, 296 outcomes recorded).
    Now it stops acquiring and ends what runs; the server already returned its jobs to the pool."""
    from balsam.api import ApplicationDefinition, BatchJob, Job, Session, get_default_client
    from balsam.site.launcher_credentials import LauncherCredentials

    name, path = new_site(idle_ttl_sec=30)

    class Quick(ApplicationDefinition):
        site = name
        command_template = "echo quick"

    class Slow(ApplicationDefinition):
        site = name
        command_template = "sleep 300"

    Quick.sync()
    Slow.sync()
    site_id = int((path / ".balsam-site").read_text())
    # Acquired in order of node_packing_count (highest first): the quick ones start first.
    quick = make_runnable([Quick.submit(workdir=f"quick/{i}", save=False, node_packing_count=8) for i in range(3)])
    slow = make_runnable([Slow.submit(workdir=f"slow/{i}", save=False, node_packing_count=2) for i in range(2)])
    bj = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1, wall_time_min=10,
                                 job_mode="mpi")
    client = get_default_client()
    credentials = LauncherCredentials(client, path, site_id)
    credentials.mint({"id": bj.id, "wall_time_min": 10})
    proc = start_launcher(path, "mpi", 10, env={"BALSAM_BATCH_JOB_ID": str(bj.id)})
    try:
        wait_for_states(quick, {"RUN_DONE"}, timeout=60)
        wait_for_states(slow, {"RUNNING"}, timeout=60)
        cred_id = credentials.stored(bj.id).credential_id
        t0 = time.monotonic()
        client.delete(f"/auth/credentials/{cred_id}")
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = "\n".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
    assert "using the launcher credential" in log
    assert "refused this launcher's credential" in log, Path(proc.console_path).read_text()[-2000:]
    assert took < 45, f"the launcher took {took:.0f} s to stop"
    assert code == 0
    # Nothing lost: finished work is recorded, the running jobs came back as RUN_TIMEOUT (run again
    # by the processing module), and no session holds anything.
    states = {j.id: str(j.state) for j in Job.objects.filter(id=quick + slow)}
    assert all(states[i] == "RUN_DONE" for i in quick), states
    assert all(states[i] == "RUN_TIMEOUT" for i in slow), states
    assert not [s for s in Session.objects.all() if s.batch_job_id == bj.id]
