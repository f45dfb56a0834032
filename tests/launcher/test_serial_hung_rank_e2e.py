"""A serial worker rank that hangs (SIGSTOP) rather than dies, against a live server and real MPICH.

Two "nodes" on this host (rank 0 the master, rank 1 a worker); rank 1 is stopped while it runs
tasks. Its jobs come back RUN_TIMEOUT with the reason once it has been silent for
``$BALSAM_SERIAL_RANK_SILENCE_SEC`` (10 s here, 30 s by default), run again on the master's node
(the rank's node is out), the launcher goes idle and exits with 0 and records the node taken out
(it used to hold every job of that rank RUNNING, and the whole allocation, until the wall time).
The unit tests of the same rules are ``test_serial_hung_rank.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Optional

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config import SiteConfig
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.serial import SerialMode
from balsam.platform import NodeInfo
from launcher_helpers import events_of, make_runnable, rerun_timeouts_until_done, worker_rank_pid

#: Far beyond the test: a RUN_TIMEOUT here is the launcher's, never the expiry sweep's.
EXPIRE_SEC = 300
WALL_MIN = 5
#: How long the master lets a rank be silent ($BALSAM_SERIAL_RANK_SILENCE_SEC; 30 s by default): over
#: three heartbeats (serial_worker.HEARTBEAT_SEC, 3 s), so that a rank slowed by a loaded machine is
#: not taken out before it is stopped, and 20 s shorter than the default for the suite's time.
SILENCE_SEC = 10.0


@pytest.fixture(scope="session")
def _long_expiry_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_long_expiry_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _long_expiry_server
    return _long_expiry_server.url


def test_the_silence_is_read_from_the_environment_and_a_bad_value_is_named_and_ignored(monkeypatch: Any,
                                                                                       caplog: Any) -> None:
    monkeypatch.delenv(serial_worker.RANK_SILENCE_ENV, raising=False)
    assert serial_worker.rank_silence_sec() == serial_worker.RANK_SILENCE_SEC == 30.0  # the default
    monkeypatch.setenv(serial_worker.RANK_SILENCE_ENV, "12.5")
    assert serial_worker.rank_silence_sec() == 12.5
    for raw in ("5.5", "1e2"):  # under two heartbeats; not plain digits
        monkeypatch.setenv(serial_worker.RANK_SILENCE_ENV, raw)
        with caplog.at_level(logging.WARNING, logger="balsam.launcher.serial"):
            assert serial_worker.rank_silence_sec() == 30.0
        assert f"{serial_worker.RANK_SILENCE_ENV}={raw!r} is not a number from 6 to 86400" in caplog.text, caplog.text


@pytest.mark.slow
@pytest.mark.mpi
def test_a_hung_serial_worker_rank_is_taken_out_and_its_jobs_run_elsewhere(new_site: Any, monkeypatch: Any) -> None:
    from balsam.api import ApplicationDefinition, BatchJob, Job

    assert SILENCE_SEC >= serial_worker.MIN_RANK_SILENCE_SEC
    monkeypatch.setenv(serial_worker.RANK_SILENCE_ENV, repr(SILENCE_SEC))
    name, path = new_site(idle_ttl_sec=5, delay_sec=1)

    class Short(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo run >> runs; sleep 2'"

    Short.sync()
    ids = make_runnable(Short.submit(workdir=f"h/{i}", node_packing_count=2, save=False) for i in range(8))
    batch_job = BatchJob.objects.create(site_id=Short.resolve_site_id(), project="local", queue="local", num_nodes=2,
                                        wall_time_min=WALL_MIN, job_mode="serial")
    host = socket.gethostname()
    nodes = [NodeInfo(str(i), host, [0, 1]) for i in range(2)]
    site_config = SiteConfig(path)
    context = LauncherContext(site_config=site_config, settings=site_config.settings, site_id=site_config.site_id,
                              data_path=site_config.data_path, log_path=site_config.log_path, platform=DefaultPlatform(),
                              nodes=nodes, wall_time_min=WALL_MIN, job_mode="serial", batch_job_id=batch_job.id)
    mode = SerialMode(context)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", mode.run()), daemon=True)
    thread.start()
    victim: Optional[int] = None
    try:
        # Stop rank 1 once both nodes run tasks.
        deadline = time.monotonic() + 60
        while True:
            victim = worker_rank_pid(path)
            if victim and Job.objects.filter(id=ids, state="RUNNING").count() >= 4:
                break
            assert time.monotonic() < deadline, "the tasks did not start"
            time.sleep(0.2)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Act as the processing module's default handle_timeout: re-queue what comes back RUN_TIMEOUT.
        requeued = rerun_timeouts_until_done(ids, stopped_at + SILENCE_SEC + 60 - time.monotonic())
        # Idle (nothing left; the rank taken out is not busy), then the MPI launcher that waits
        # for the stopped rank is ended: the launcher returns on its own, with 0.
        thread.join(SILENCE_SEC + 60)
        assert not thread.is_alive() and result.get("rc") == 0, result
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if thread.is_alive():
            mode.request_stop("test over")
            thread.join(60)

    assert requeued  # the stopped rank held jobs
    history = events_of(ids)
    for job_id in ids:
        rows = history[job_id]
        assert [e.to_state for e in rows].count("RUN_DONE") == 1, job_id  # none lost, none finished twice
        timeouts = [e for e in rows if e.to_state == "RUN_TIMEOUT"]
        assert len(timeouts) == (job_id in requeued), job_id
        for event in timeouts:
            reason = str((event.data or {}).get("reason"))
            assert reason.startswith(f"serial worker rank 1 on {host} unresponsive for "), reason
            assert "its task there may still be running" in reason, reason
            silent_sec = float(reason.split(" unresponsive for ")[1].split(" s")[0])
            assert silent_sec >= SILENCE_SEC - 0.5, reason  # taken out only once silent that long (rounded)
        if job_id in requeued:
            # Run again after the take-out: started anew by the master (rank 1's node is out, its
            # reports are dropped), so on the master's node, and done there.
            after = [e.to_state for e in rows[rows.index(timeouts[0]) + 1:]]
            assert "RESTART_READY" in after and "RUN_DONE" in after, (job_id, after)
            rerun = after[after.index("RESTART_READY"):]
            assert rerun.index("RUNNING") < rerun.index("RUN_DONE"), (job_id, after)
    info = BatchJob.objects.get(id=batch_job.id).status_info or {}
    assert f"serial worker rank 1 on {host} unresponsive" in info.get("nodes_out", ""), info
    assert "error" not in info, info  # the launcher went on with its other node: no failure
