"""Serial mode checks its own start (issue 8 item 6), against a live server and real MPICH: a launch
command that does not start one worker per node makes the launch fail loudly, with the reason in the
BatchJob's status_info; a one-node partition on a platform that declares
``serial_workers_without_mpi`` runs its master in the launcher process."""

from __future__ import annotations

import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config import SiteConfig
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes.serial import SerialMode
from balsam.platform import LaunchSpec, NodeInfo
from launcher_helpers import make_runnable, synced_app, wait_for_states

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


class TwoLoneMastersPlatform(DefaultPlatform):
    """A broken launch line: runs the worker command twice without MPI, so that each copy is a
    singleton MPI process that thinks it is rank 0 of 1 (what a platform whose launcher ignores
    the rank count does)."""

    name = "two-lone-masters"
    serial_workers_without_mpi = False

    def mpi_command_line(self, spec: LaunchSpec) -> str:
        return f"bash -c {shlex.quote(spec.cmdline + ' & ' + spec.cmdline + ' & wait')}"


def _context(path: Path, platform: Any, nodes: list[NodeInfo], batch_job_id: Any = None) -> LauncherContext:
    site_config = SiteConfig(path)
    return LauncherContext(site_config=site_config, settings=site_config.settings, site_id=site_config.site_id,
                           data_path=site_config.data_path, log_path=site_config.log_path, platform=platform,
                           nodes=nodes, wall_time_min=2, job_mode="serial", batch_job_id=batch_job_id)


def test_two_lone_masters_fail_the_launch_and_say_why_on_the_batch_job(new_site: Any) -> None:
    from balsam.api import BatchJob, Job

    name, path = new_site(idle_ttl_sec=2)
    Echo = synced_app(name, "Echo", "echo hi")
    ids = make_runnable([Echo.submit(workdir="e0", save=False)])
    batch_job = BatchJob.objects.create(site_id=Echo.resolve_site_id(), project="local", queue="local", num_nodes=2,
                                        wall_time_min=2, job_mode="serial")
    nodes = [NodeInfo(str(i), f"nid0000{i}", [0]) for i in range(2)]
    mode = SerialMode(_context(path, TwoLoneMastersPlatform(), nodes, batch_job.id))
    assert mode.run() == 1
    info = BatchJob.objects.get(id=batch_job.id).status_info
    assert "serial mode did not start" in info["error"] and "1 worker rank(s) for the 2 node(s)" in info["error"]
    assert "2 masters said so" in info["error"]
    assert str(Job.objects.get(id=ids[0]).state) == "PREPROCESSED"  # no job was leased or run


def test_a_one_node_partition_runs_its_master_in_the_launcher_process(new_site: Any, monkeypatch: Any) -> None:
    name, path = new_site(idle_ttl_sec=1)
    Echo = synced_app(name, "Echo", "echo hi")
    ids = make_runnable([Echo.submit(workdir=f"e{i}", node_packing_count=4, save=False) for i in range(6)])
    mode = SerialMode(_context(path, DefaultPlatform(), [NodeInfo("0", socket.gethostname(), [0, 1])]))
    assert mode.runs_in_process()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # a subprocess start would fail
    assert mode.run() == 0
    wait_for_states(ids, {"RUN_DONE"}, timeout=5)
    assert not list((path / "log").glob("serial_mode_*.serial.json"))  # no worker program was started


def test_sigterm_stops_an_in_process_master(new_site: Any) -> None:
    name, path = new_site(idle_ttl_sec=60)
    Long = synced_app(name, "Long", "sleep 300")
    ids = make_runnable([Long.submit(workdir="long", save=False)])
    mode = SerialMode(_context(path, DefaultPlatform(), [NodeInfo("0", socket.gethostname(), [0])]))
    runner = threading.Thread(target=mode.run)
    runner.start()
    wait_for_states(ids, {"RUNNING"}, timeout=30)
    mode.request_stop("signal 15")
    t0 = time.monotonic()
    runner.join(30)
    assert not runner.is_alive() and time.monotonic() - t0 < 20
    wait_for_states(ids, {"RUN_TIMEOUT", "RESTART_READY"}, timeout=5)
