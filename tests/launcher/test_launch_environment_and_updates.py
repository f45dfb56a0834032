"""The launch environment (GPU visibility, the balsam_launch_environment hook) and the BulkStatusUpdater,
against a live server."""

from __future__ import annotations

import socket

import pytest

from launcher_helpers import events_of, make_runnable

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def _context(path, nodes, wall_time_min=1.0):
    from balsam.config import SiteConfig
    from balsam.launcher.job_mode import LauncherContext
    from balsam.plugins.manager import get_plugin_manager

    site_config = SiteConfig(path)
    platform = get_plugin_manager().load_driver("platform", "default")()
    return LauncherContext(site_config=site_config, settings=site_config.settings, site_id=site_config.site_id,
                           data_path=site_config.data_path, log_path=site_config.log_path, platform=platform,
                           nodes=nodes, wall_time_min=wall_time_min, job_mode="mpi")


def test_hook_balsam_launch_environment(new_site) -> None:
    """A plugin's balsam_launch_environment sees each job, its env (with GPU visibility) and its hosts."""
    from balsam.api import ApplicationDefinition
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.platform import NodeInfo
    from balsam.plugins.hookspecs import hookimpl
    from balsam.plugins.manager import get_plugin_manager, reset_plugin_manager

    name, path = new_site(idle_ttl_sec=1)

    class Show(ApplicationDefinition):
        site = name
        environment_variables = {"FROM_APP": "app-value"}
        command_template = "bash -c 'echo hook=$FROM_HOOK app=$FROM_APP gpus=${CUDA_VISIBLE_DEVICES:-none}'"

    Show.sync()
    ids = make_runnable([Show.submit(workdir="gpu", gpus_per_rank=1, save=False),
                         Show.submit(workdir="cpu", save=False)])
    seen = []

    class Plugin:
        @hookimpl
        def balsam_launch_environment(self, job, env, node_hostnames):
            seen.append((job.id, env.get("FROM_APP"), env.get("CUDA_VISIBLE_DEVICES"), list(node_hostnames)))
            env["FROM_HOOK"] = f"job{job.id}@{','.join(node_hostnames)}"

    host = socket.gethostname()
    try:
        get_plugin_manager().add_plugin(Plugin(), name="test-launch-env")
        # One node with two (nominal) GPUs: the platform hook makes the assigned one visible.
        MPIMode(_context(path, [NodeInfo("0", host, [0, 1], ["0", "1"])])).run()
    finally:
        reset_plugin_manager()
    assert sorted(seen) == sorted([(ids[0], "app-value", "0", [host]), (ids[1], "app-value", None, [host])])
    gpu_out = (path / "data" / "gpu" / "job.out").read_text().strip()
    cpu_out = (path / "data" / "cpu" / "job.out").read_text().strip()
    assert gpu_out == f"hook=job{ids[0]}@{host} app=app-value gpus=0"
    assert cpu_out == f"hook=job{ids[1]}@{host} app=app-value gpus=none"


def test_sigterm_request_stop_ends_jobs_as_run_timeout(new_site) -> None:
    """request_stop() (what the SIGTERM handler calls) ends running jobs as RUN_TIMEOUT and returns."""
    import threading
    import time

    from balsam.api import ApplicationDefinition, Job
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.platform import NodeInfo

    name, path = new_site(idle_ttl_sec=30)

    class Long(ApplicationDefinition):
        site = name
        command_template = "sleep 300"

    Long.sync()
    ids = make_runnable([Long.submit(workdir="long", save=False)])
    mode = MPIMode(_context(path, [NodeInfo("0", socket.gethostname(), [0, 1])], wall_time_min=10))
    runner = threading.Thread(target=mode.run)
    runner.start()
    deadline = time.monotonic() + 30
    while str(Job.objects.get(id=ids[0]).state) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    mode.request_stop("signal 15")
    runner.join(30)
    assert not runner.is_alive()
    event = events_of(ids)[ids[0]][-1]
    assert event.to_state == "RUN_TIMEOUT" and "signal 15" in event.data["reason"]


def test_bulk_status_updater_batches_and_isolates_refused_updates(new_site) -> None:
    from balsam.api import ApplicationDefinition, Job, Session
    from balsam.client.status_updater import BulkStatusUpdater

    name, path = new_site()

    class Noop(ApplicationDefinition):
        site = name
        command_template = "true"

    Noop.sync()
    ids = make_runnable(Noop.submit(workdir=f"n/{i}", save=False) for i in range(50))
    session = Session.objects.create(site_id=Noop.resolve_site_id())
    acquired = session.acquire_jobs(50)
    assert sorted(j.id for j in acquired) == sorted(ids)
    calls = []
    updater = BulkStatusUpdater(max_wait_sec=0.5)
    original = updater._patch

    def counting(chunk, key=None):
        calls.append(len(chunk))
        return original(chunk, key)

    updater._patch = counting
    for job_id in ids:
        updater.put(job_id, "RUNNING", state_data={"num_nodes": 1.0})
    for job_id in ids[:-1]:
        updater.put(job_id, "RUN_DONE", return_code=0)
    updater.put(ids[-1], "JOB_FINISHED")  # RUNNING -> JOB_FINISHED is not a valid move: refused
    assert updater.flush(30)
    updater.close()
    # One call with all 100 (a job's RUNNING and RUN_DONE together, applied in order), refused as a
    # whole, then split in halves (sent in order) until the bad one is alone.
    assert calls[0] == 100 and len(calls) <= 1 + 2 * 7
    assert [u["id"] for u, _ in updater.dropped] == [ids[-1]]
    states = {j.id: str(j.state) for j in Job.objects.filter(id=ids)}
    assert states == {**{i: "RUN_DONE" for i in ids[:-1]}, ids[-1]: "RUNNING"}
    history = events_of(ids[:2])
    assert [e.to_state for e in history[ids[0]]][-2:] == ["RUNNING", "RUN_DONE"]
    assert history[ids[0]][-2].data == {"num_nodes": 1.0}
    session.delete()


def test_send_soon_sends_without_waiting_for_the_batch_window() -> None:
    """A launcher with nothing left running (or the processing module after a cycle) has the queued
    updates sent at once; otherwise they wait for the batch window to gather more."""
    import threading

    from balsam.client.status_updater import BulkStatusUpdater

    sent: list[list[int]] = []
    arrived = threading.Event()

    def send(chunk):
        sent.append([u["id"] for u in chunk])
        arrived.set()

    updater = BulkStatusUpdater(send=send, max_wait_sec=3600)  # a window nobody waits out
    try:
        updater.send_soon()  # nothing queued: nothing to send, nothing breaks
        updater.put(1, "RUNNING")
        updater.put(2, "RUNNING")
        assert not arrived.wait(0.3)  # gathering for the window
        updater.send_soon()
        assert arrived.wait(30)
        assert sent == [[1, 2]]
    finally:
        updater.close()
