"""libEnsemble 1.5.0's BalsamExecutor through the whole real stack: ``balsam server start``, ``balsam
site start`` and the launcher of its ``submit_allocation()`` on the ``local`` scheduler (the API-level
run with a simulated site is tests/api/test_seeds_and_libensemble.py). Tasks are submitted, polled
and waited on as libEnsemble's workers do, one is killed while queued, and the allocation revoked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import yaml

pytestmark = pytest.mark.slow


def balsam(home: Path, *args: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, BALSAM_HOME=str(home), BALSAM_CLIENT_PATH=str(home / "client.yml"))
    proc = subprocess.run([str(Path(sys.executable).with_name("balsam")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"balsam {' '.join(args)}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    return proc.stdout


@pytest.fixture(autouse=True)
def _fresh_api_state() -> Iterator[None]:
    """This test's client reads the login of its own server: none before it, none left after."""
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client

    reset_default_client()
    ApplicationDefinition.clear_cache()
    yield
    reset_default_client()
    ApplicationDefinition.clear_cache()


@pytest.mark.timeout(600)
def test_libensemble_executor_runs_tasks_on_a_real_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(home / "client.yml"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    site_name = f"libe-{uuid.uuid4().hex[:6]}"
    site_path = tmp_path / site_name
    balsam(home, "server", "start", "--port", "0")
    try:
        balsam(home, "site", "init", str(site_path), "-n", site_name, "--platform", "default")
        # The agent polls the scheduler every second, not every 10 s: the allocation's launcher
        # starts, and the revoked allocation is deleted, without waiting out a default sync_period
        # (what tests/schedulers/e2e_helpers.py's FAST settings do; the period is not the subject).
        settings_path = site_path / "settings.yml"
        settings = yaml.safe_load(settings_path.read_text()) or {}
        settings["scheduler"] = {**(settings.get("scheduler") or {}), "sync_period": 1}
        settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        balsam(home, "site", "start", cwd=site_path)
        try:
            run_libensemble_tasks(site_name)
        finally:
            balsam(home, "site", "stop", cwd=site_path)
    finally:
        balsam(home, "server", "stop")


def run_libensemble_tasks(site_name: str) -> None:
    from libensemble.executors.balsam_executor import BalsamExecutor
    from libensemble.executors.executor import Executor

    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job, Site

    site = Site.objects.get(name=site_name)

    class Sim(ApplicationDefinition):
        site = site_name
        command_template = "echo sim {{ x }}"

    exctr = BalsamExecutor()
    try:
        exctr.register_app(Sim, app_name="sim")
        allocation = exctr.submit_allocation(site_id=site.id, num_nodes=1, wall_time_min=10, job_mode="serial",
                                             queue="local", project="local")
        tasks = [exctr.submit(app_name="sim", app_args={"x": i}, num_nodes=1, procs_per_node=1,
                              max_tasks_per_node=2, workdir=f"sim{i}") for i in range(6)]
        # A libEnsemble worker's loop: poll until done (wait() on each is the same reads).
        deadline = time.monotonic() + 300
        while not all(t.finished for t in tasks) and time.monotonic() < deadline:
            for task in tasks:
                task.poll()
            time.sleep(0.5)
        assert [t.state for t in tasks] == ["FINISHED"] * 6, [(t.name, t.state, t.process.state) for t in tasks]
        assert all(t.success and t.runtime >= 0 for t in tasks)
        ids = [t.process.id for t in tasks]
        outputs = {job.id: job.state.value for job in Job.objects.filter(id=ids)}
        assert set(outputs.values()) == {"JOB_FINISHED"}
        assert EventLog.objects.filter(job_id=ids, to_state="RUNNING").count() == 6  # each ran once

        # Killed while queued (libEnsemble's kill() deletes the Job): gone, never run.
        exctr.revoke_allocation(allocation, timeout=60)
        killed = exctr.submit(app_name="sim", app_args={"x": 99}, num_nodes=1, procs_per_node=1, workdir="killed")
        killed_id = killed.process.id
        killed.kill()
        assert killed.state == "USER_KILLED" and not Job.objects.filter(id=[killed_id]).count()
        assert BatchJob.objects.get(id=allocation.id).state.value in ("pending_deletion", "finished")
    finally:
        Executor.executor = None
