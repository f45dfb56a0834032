"""A launcher whose nodes have no GPU leaves the jobs that need one for another launcher.

Before: with ``nvidia-smi -L`` answering ``No devices were found`` (exit 6, a CPU partition of a mixed
site) or failing (exit 9, a driver that does not answer for a while), the launcher found 0 GPUs,
leased every GPU job and marked each FAILED ("job asks for 1 CPUs and 1 GPUs on one node; the nodes
have at most 2 CPUs and 0 GPUs"): a terminal state, a whole GPU campaign lost to one bad node. Now
such a launcher acquires with ``max_gpus_per_node: 0`` (a SessionAcquire filter, one condition in
the acquire's one query): the server never leases it those jobs, they stay PREPROCESSED, unleased,
and the next launcher with GPUs runs them. Jobs that do not fit for another reason (more CPUs than
a node has) are still FAILED with the reason.

Real uvicorn server (SQLite, and PostgreSQL for the acquire filter), real ``python -m
balsam.launcher`` processes, real MPICH; ``nvidia-smi`` is a stand-in on PATH printing what the
real one prints (the GPU listing is the recorded Polaris one).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, make_site, start_launcher
from launcher_helpers import make_runnable, wait_for_states

RECORDED = Path(__file__).parent.parent / "platforms" / "recorded"
NO_DEVICES = 'echo "No devices were found"; exit 6'
DRIVER_FAILED = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver. Make sure that '
                 'the latest NVIDIA driver is installed and running."; exit 9')
FOUR_GPUS = f'cat {RECORDED / "polaris-nvidia-smi-L.txt"}'
CPUS = len(os.sched_getaffinity(0))


def nvidia_smi_env(tmp_path: Path, body: str) -> dict[str, str]:
    """The launcher's environment: an ``nvidia-smi`` running the bash ``body`` first on PATH."""
    bin_dir = tmp_path / f"bin-{uuid.uuid4().hex[:6]}"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/bash\n[ \"$1\" = \"-L\" ] || exit 2\n{body}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run_launcher(path: Path, mode: str, env: dict[str, str]) -> str:
    """One launcher until its idle timeout; its console."""
    proc = start_launcher(path, mode, 5, env=env)
    console_path = Path(proc.console_path)
    assert finish(proc, timeout=120) == 0, console_path.read_text()
    return console_path.read_text()


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode,nvidia_smi,why", [
    ("mpi", NO_DEVICES, "nvidia-smi: exited 6: No devices were found"),
    ("mpi", DRIVER_FAILED, "nvidia-smi: exited 9: NVIDIA-SMI has failed because it couldn't communicate"),
    ("serial", NO_DEVICES, "nvidia-smi: exited 6: No devices were found"),
], ids=["mpi-no-devices", "mpi-driver-failed", "serial-no-devices"])
def test_gpu_jobs_wait_for_a_launcher_with_gpus(mode, nvidia_smi, why, new_site, tmp_path, monkeypatch) -> None:
    from balsam.api import ApplicationDefinition, Job

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    name, path = new_site(idle_ttl_sec=2)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo ran {{ n }}"

    Echo.sync()
    gpu_ids = make_runnable(Echo.submit(workdir=f"g{i}", n=i, gpus_per_rank=1, save=False) for i in range(8))
    cpu_ids = make_runnable(Echo.submit(workdir=f"c{i}", n=i, save=False) for i in range(2))
    [too_big] = make_runnable([Echo.submit(workdir="big", n=0, threads_per_rank=CPUS + 1, save=False)])

    console = run_launcher(path, mode, nvidia_smi_env(tmp_path, nvidia_smi))
    jobs = {j.id: j for j in Job.objects.filter(id=gpu_ids + cpu_ids + [too_big])}
    assert {str(jobs[i].state) for i in cpu_ids} == {"RUN_DONE"}, console
    assert str(jobs[too_big].state) == "FAILED"  # impossible anywhere here: failed with the reason, as before
    # Not FAILED: unstarted, unleased, for another launcher.
    assert {str(jobs[i].state) for i in gpu_ids} == {"PREPROCESSED"}, console
    assert {jobs[i].batch_job_id for i in gpu_ids} == {None}
    assert console.count("jobs that need GPUs are not acquired: this launcher's nodes have none") == 1, console
    assert why in console, console
    assert "1 GPUs on one node" not in console  # no job was failed for the GPUs it asks for

    # A launcher with GPUs (4, recorded on Polaris) runs them.
    console = run_launcher(path, mode, nvidia_smi_env(tmp_path, FOUR_GPUS))
    wait_for_states(gpu_ids, {"RUN_DONE"}, timeout=60)
    assert "jobs that need GPUs are not acquired" not in console


# -- the acquire filter itself -------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env_on(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_acquire_leaves_jobs_needing_more_gpus_per_node(env_on, tmp_path) -> None:
    from balsam.api import ApplicationDefinition
    from balsam.client.lease import acquire_request

    name = f"site-{uuid.uuid4().hex[:8]}"
    site_path = make_site(tmp_path / name, name)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo {{ n }}"

    Echo.sync()
    # per node: 0, 0, 1, 0.5, 2 (2 ranks x 1), 4 GPUs
    demands = [dict(), dict(gpus_per_rank=0), dict(gpus_per_rank=1), dict(gpus_per_rank=0.5),
               dict(gpus_per_rank=1, ranks_per_node=2), dict(gpus_per_rank=2, ranks_per_node=2)]
    ids = make_runnable(Echo.submit(workdir=f"j{i}", n=i, save=False, **d) for i, d in enumerate(demands))
    site_id = int((site_path / ".balsam-site").read_text())
    with env_on.http() as http:
        def lease(**filters: Any) -> list[int]:
            session = http.post("/sessions/", json={"site_id": site_id})
            assert session.status_code == 201, session.text
            answer = http.post(f"/sessions/{session.json()['id']}", json=acquire_request(100, **filters))
            assert answer.status_code == 200, answer.text
            assert http.delete(f"/sessions/{session.json()['id']}").status_code == 204  # gives them back
            return sorted(job["id"] for job in answer.json())

        assert lease(max_gpus_per_node=0) == ids[:2]
        assert lease(max_gpus_per_node=1) == ids[:4]
        assert lease(max_gpus_per_node=2, max_aggregate_nodes=10) == ids[:5]  # mpi mode's packing acquire
        assert lease() == ids  # without the filter (an older client): every job, as before
        session = http.post("/sessions/", json={"site_id": site_id}).json()["id"]
        refused = http.post(f"/sessions/{session}", json={**acquire_request(1), "max_gpus_per_node": -1})
        assert refused.status_code == 422 and "max_gpus_per_node" in refused.text
        http.delete(f"/sessions/{session}")


def test_the_field_is_sent_only_when_set() -> None:
    """A server older than the field refuses unknown fields: a launcher with GPUs must not send it."""
    from balsam.client.lease import acquire_request

    assert "max_gpus_per_node" not in acquire_request(4)
    assert acquire_request(4, max_gpus_per_node=0)["max_gpus_per_node"] == 0


def test_a_launcher_with_gpus_sets_no_filter(tmp_path, caplog) -> None:
    from balsam.launcher.job_mode import gpuless_acquire_filter
    from balsam.platform import NodeInfo

    assert gpuless_acquire_filter([NodeInfo("0", "h0", [0, 1], ["0"]), NodeInfo("1", "h1", [0, 1])]) == {}
    with caplog.at_level(logging.INFO, logger="balsam.launcher.job_mode"):
        assert gpuless_acquire_filter([NodeInfo("0", "h0", [0, 1])], env={"CUDA_VISIBLE_DEVICES": ""}) == {
            "max_gpus_per_node": 0}
    assert "(CUDA_VISIBLE_DEVICES='')" in caplog.text
