"""Theta KNL and ThetaGPU: the conformance kit, and runs on a faked machine.

- theta-knl: Cobalt nid ranges, ``aprun -n -N -L <nids> -cc depth -d -j`` (a recording ``aprun``
  runs the ranks here), no node packing in mpi mode;
- thetagpu: the job template itself, run by bash inside a faked Cobalt allocation with
  ``-x mig_count=7``: it creates the MIG instances (``nvidia-smi_mig`` recorded), records every
  node's ``nvidia-smi -L`` (a stand-in printing a recorded MIG listing) and starts the real
  launcher, which hands out the MIG UUIDs as GPU ids through Open MPI ``mpirun -x``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec, parse_nvidia_smi_list
from balsam.site.job_template import build_context, render_job_script, template_platform_options
from balsam.testing import PlatformContract
from balsam.testing.platform_contract import SERIAL_WORKER_CMDLINE
from balsam_platform_theta import ThetaGPUPlatform, ThetaKNLPlatform, expand_nid_ranges
from machine_jobs import job_out, make_runnable, run_jobs, site_for, wait_for_states

RECORDED = Path(__file__).parent / "recorded"
MIG7 = parse_nvidia_smi_list((RECORDED / "thetagpu-mig-1g.5gb-nvidia-smi-L.txt").read_text()).mig_ids()


class TestThetaKNL(PlatformContract):
    platform_class = ThetaKNLPlatform
    allocation_env = {"COBALT_PARTNAME": "3824-3826,4001", "COBALT_JOBID": "512345"}
    expected_hostnames = ["nid03824", "nid03825", "nid03826", "nid04001"]
    expected_cpu_count = 64
    expected_gpu_ids = []
    expected_scheduler_id = 512345
    launch_lines = [
        # 0.7's ThetaAprun: -L takes the nids
        (LaunchSpec(cmdline="./app", hostnames=["nid03824", "nid03825"], ranks_per_node=64, threads_per_rank=1),
         "aprun -n 128 -N 64 -L 3824,3825 -cc depth -d 1 -j 1 ./app"),
        (LaunchSpec(cmdline="./app", hostnames=["nid04001"], ranks_per_node=16, threads_per_rank=8, threads_per_core=2,
                    launch_params={"cpu_affinity": "none", "e": "FOO=1"}),
         "aprun -n 16 -N 16 -L 4001 -cc none -d 8 -j 2 -e FOO=1 ./app"),
    ]
    serial_worker_line = f"aprun -n 4 -N 1 -L 3824,3825,3826,4001 -cc depth -d 1 -j 1 {SERIAL_WORKER_CMDLINE}"
    # cpu_affinity: none (the settings default): aprun's own default would be -cc depth
    unbound_serial_worker_line = f"aprun -n 4 -N 1 -L 3824,3825,3826,4001 -cc none -d 1 -j 1 {SERIAL_WORKER_CMDLINE}"
    # KNL: core c's hardware threads are c, c+64, c+128, c+192
    task_cpu_cases = [((5,), 4, (5, 69, 133, 197)), ((5, 6), 2, (5, 6, 69, 70))]


class TestThetaGPU(PlatformContract):
    platform_class = ThetaGPUPlatform
    platform_options = {"gpu_list_dir": ""}
    allocation_env = {"COBALT_NODEFILE": "{nodefile}", "COBALT_JOBID": "10042"}
    nodefile_text = "thetagpu05\nthetagpu06\n"
    expected_hostnames = ["thetagpu05", "thetagpu06"]
    expected_cpu_count = 128
    expected_gpu_ids = [str(i) for i in range(8)]
    expected_scheduler_id = 10042
    gpu_visibility = [(["0", "5"], {"CUDA_VISIBLE_DEVICES": "0,5"}), ([MIG7[3]], {"CUDA_VISIBLE_DEVICES": MIG7[3]})]
    launch_lines = [
        (LaunchSpec(cmdline="./app", hostnames=["thetagpu05", "thetagpu06"], ranks_per_node=8, gpus_per_rank=1,
                    env_names=["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"]),
         "mpirun --oversubscribe --bind-to none -n 16 -npernode 8 -x CUDA_VISIBLE_DEVICES -x OMP_NUM_THREADS "
         "--host thetagpu05,thetagpu06 ./app"),
    ]
    serial_worker_line = f"mpirun --oversubscribe --bind-to none -n 2 -npernode 1 --host thetagpu05,thetagpu06 {SERIAL_WORKER_CMDLINE}"
    unbound_serial_worker_line = serial_worker_line  # --bind-to none already
    task_cpu_cases = [((5,), 2, (5, 133))]

    @pytest.fixture(autouse=True)
    def _no_cobalt_nodefile(self, monkeypatch):
        monkeypatch.delenv("COBALT_NODEFILE", raising=False)  # the -hostfile argument comes from the launcher's env


def test_nid_ranges() -> None:
    assert expand_nid_ranges("1001-1003,1030") == [1001, 1002, 1003, 1030]
    with pytest.raises(ValueError, match="COBALT_PARTNAME"):
        expand_nid_ranges("1001-x")


def test_theta_knl_attrs_is_accepted_and_rendered_only_when_set(tmp_path: Path) -> None:
    from balsam.batch_job_rules import check_batch_job

    platform = ThetaKNLPlatform()
    scheduler = platform.settings_defaults()["scheduler"]
    defaults = scheduler["optional_batch_job_params"]
    request = {"queue": "default", "project": "datascience", "num_nodes": 2, "wall_time_min": 30,
               "optional_params": {"attrs": "mcdram=cache:numa=quad"}}
    check_batch_job(request, scheduler["allowed_queues"], scheduler["allowed_projects"], defaults)  # -x attrs=... accepted
    base = {"id": 7, "project": "datascience", "queue": "default", "num_nodes": 2, "wall_time_min": 30,
            "job_mode": "mpi", "filter_tags": {}, "partitions": None}
    with_attrs = render_job_script(platform.job_template(), build_context(
        {**base, "optional_params": {"attrs": "mcdram=cache:numa=quad"}}, tmp_path,
        default_optional_params=defaults, call_hook=False))
    assert "#COBALT --attrs mcdram=cache:numa=quad\n" in with_attrs
    without = render_job_script(platform.job_template(), build_context(
        {**base, "optional_params": {}}, tmp_path, default_optional_params=defaults, call_hook=False))
    assert "--attrs" not in without and "#COBALT -q default\n# Rendered by balsam" in without


def test_thetagpu_template_records_gpu_lists_where_the_launcher_reads_them(tmp_path: Path) -> None:
    """``gpu_list_dir`` is one setting for both sides: the template renders it (it wrote to
    ``${BALSAM_GPU_LIST_DIR:-/var/tmp}`` while the launcher read the option)."""
    from balsam.config import SiteConfig

    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    base = {"id": 7, "project": "datascience", "queue": "full-node", "num_nodes": 2, "wall_time_min": 30,
            "job_mode": "mpi", "filter_tags": {}, "partitions": None, "optional_params": {"mig_count": "7"}}
    rendered = {}
    for name, yaml_text in (("set", "launcher:\n  platform: thetagpu\n  platform_options:\n    gpu_list_dir: /lus/my dir\n"),
                            ("default", "launcher:\n  platform: thetagpu\n")):
        (site / "settings.yml").write_text(yaml_text)
        settings = SiteConfig(site).settings
        options = template_platform_options(settings)
        rendered[name] = render_job_script(ThetaGPUPlatform().job_template(),
                                           build_context(base, site, platform_options=options, call_hook=False))
        assert ThetaGPUPlatform(options=options).options.gpu_list_dir == options["gpu_list_dir"]
    assert "gpu_list_dir='/lus/my dir'" in rendered["set"]
    assert "gpu_list_dir=/var/tmp" in rendered["default"]
    assert "BALSAM_GPU_LIST_DIR" not in rendered["set"]


def test_thetagpu_gpus_left_whole_beside_mig_instances_are_still_gpu_ids(tmp_path: Path) -> None:
    """A node with only GPU 0 split (its 7 recorded 1g.5gb instances) keeps GPUs 1-7 by index."""
    recorded = (RECORDED / "thetagpu-mig-1g.5gb-nvidia-smi-L.txt").read_text().splitlines(keepends=True)
    gpu_1 = next(i for i, line in enumerate(recorded) if line.startswith("GPU 1:"))
    mixed = "".join(recorded[:gpu_1] + [line for line in recorded[gpu_1:] if line.startswith("GPU ")])
    nodefile = tmp_path / "nodes"
    nodefile.write_text("thetagpu05\n")  # the allocation started before the template wrote the record
    (tmp_path / "balsam-thetagpu05-gpulist.txt").write_text(mixed)
    platform = ThetaGPUPlatform(options={"gpu_list_dir": str(tmp_path)})
    [node] = platform.discover_nodes({"COBALT_NODEFILE": str(nodefile)})
    assert list(node.gpu_ids) == MIG7[:7] + [str(g) for g in range(1, 8)]


def test_thetagpu_ignores_a_record_older_than_the_allocation(tmp_path: Path) -> None:
    """A record of an earlier MIG job (gpu_list_dir outlives it) named instances that may be gone."""
    record = tmp_path / "balsam-thetagpu05-gpulist.txt"
    record.write_text((RECORDED / "thetagpu-mig-1g.5gb-nvidia-smi-L.txt").read_text())
    nodefile = tmp_path / "nodes"
    nodefile.write_text("thetagpu05\n")
    started = nodefile.stat().st_mtime
    os.utime(record, (started - 3600, started - 3600))
    platform = ThetaGPUPlatform(options={"gpu_list_dir": str(tmp_path)})
    [node] = platform.discover_nodes({"COBALT_NODEFILE": str(nodefile)})
    assert list(node.gpu_ids) == [str(g) for g in range(8)]
    os.utime(record, (started, started))
    [node] = platform.discover_nodes({"COBALT_NODEFILE": str(nodefile)})
    assert list(node.gpu_ids) == MIG7


def test_thetagpu_launchers_own_node_asks_nvidia_smi_before_its_record(tmp_path: Path, monkeypatch, fake_machine) -> None:
    machine = fake_machine([socket.gethostname()])
    machine.nvidia_smi("thetagpu-nvidia-smi-L.txt")  # MIG off on this node now
    monkeypatch.setenv("PATH", machine.env()["PATH"])
    (tmp_path / f"balsam-{socket.gethostname()}-gpulist.txt").write_text(
        (RECORDED / "thetagpu-mig-1g.5gb-nvidia-smi-L.txt").read_text())
    [node] = ThetaGPUPlatform(options={"gpu_list_dir": str(tmp_path)}).discover_nodes(
        {"COBALT_NODEFILE": str(machine.node_file)})
    assert list(node.gpu_ids) == [str(g) for g in range(8)]


@pytest.mark.parametrize("mig_count", ["0", "5"])
def test_thetagpu_template_without_mig_removes_earlier_records(tmp_path: Path, mig_count: str) -> None:
    """The script itself, run by bash: records of this allocation's nodes go; other files stay."""
    gpu_lists = tmp_path / "gpulists"
    gpu_lists.mkdir()
    for host in ("thetagpu05", "thetagpu06", "thetagpu07"):
        (gpu_lists / f"balsam-{host}-gpulist.txt").write_text("GPU 0: A100 (UUID: GPU-x)\n  MIG 1g.5gb Device 0: (UUID: MIG-y)\n")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("thetagpu05\nthetagpu06\n")
    site = tmp_path / "site"
    site.mkdir()
    batch_job = {"id": 7, "project": "datascience", "queue": "full-node", "num_nodes": 2, "wall_time_min": 30,
                 "job_mode": "mpi", "filter_tags": {}, "partitions": None, "optional_params": {"mig_count": mig_count}}
    context = build_context(batch_job, site, platform_options={"gpu_list_dir": str(gpu_lists)}, call_hook=False)
    context["launcher_cmd"] = "echo launcher"  # only the part before the launcher runs here
    script = render_job_script(ThetaGPUPlatform().job_template(), context)
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COBALT_NODEFILE": str(nodefile)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in gpu_lists.iterdir()) == ["balsam-thetagpu07-gpulist.txt"]
    assert ("not using MIG" in run.stderr) == (mig_count == "5")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_jobs_on_a_faked_theta_knl(mode: str, balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine([])
    site = site_for(tmp_path, "theta-knl", mpirun_allows_node_packing=False,
                    serial_mode_startup_params={"cc": "none"})
    env = machine.env(COBALT_PARTNAME="3824-3825", COBALT_JOBID="512345")

    def jobs(App):
        made = [App.submit(workdir=f"one/{n}", n=n, threads_per_rank=4, save=False) for n in range(3)]
        if mode == "mpi":
            made.append(App.submit(workdir="two", n=9, num_nodes=2, ranks_per_node=2, save=False))
        return made

    run_jobs(site, mode, env, jobs, command_template="echo job {{ n }} OMP_NUM_THREADS=$OMP_NUM_THREADS")
    for n in range(3):
        assert f"job {n} OMP_NUM_THREADS=4" in job_out(site, f"one/{n}")
    records = machine.records("aprun")
    if mode == "mpi":
        singles = [dict(r["options"]) for r in records if r["ranks"] == 1]
        assert len(singles) == 3
        for opts in singles:
            assert opts["-N"] == "1" and opts["-L"] in ("3824", "3825") and opts["-cc"] == "depth" and opts["-d"] == "4"
        (pair,) = [dict(r["options"]) for r in records if r["ranks"] == 4]
        assert pair["-N"] == "2" and pair["-L"] == "3824,3825"
        assert job_out(site, "two").count("job 9") == 4
    else:
        (workers,) = records
        opts = dict(workers["options"])
        assert opts["-n"] == "2" and opts["-N"] == "1" and opts["-L"] == "3824,3825" and opts["-cc"] == "none"


@pytest.mark.slow
@pytest.mark.mpi
def test_thetagpu_template_creates_mig_and_launcher_hands_out_instances(balsam_env, client, fake_machine,
                                                                          tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob, Job
    from balsam.plugins.manager import get_plugin_manager

    machine = fake_machine(["thetagpu05", "thetagpu06"])
    machine.nvidia_smi("thetagpu-mig-1g.5gb-nvidia-smi-L.txt")
    mig_calls = machine.recorder("nvidia-smi_mig")
    gpu_lists = tmp_path / "gpulists"
    gpu_lists.mkdir()
    name, path = site_for(tmp_path, "thetagpu", platform_options={"gpu_list_dir": str(gpu_lists)})

    class Gpu(ApplicationDefinition):
        site = name
        command_template = "echo job {{ n }} CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"

    Gpu.sync()
    ids = make_runnable(Gpu.submit(workdir=f"mig/{n}", n=n, gpus_per_rank=1, node_packing_count=56, save=False)
                        for n in range(10))
    batch_job = BatchJob.objects.create(site_id=Gpu.resolve_site_id(), project="datascience", queue="full-node",
                                        num_nodes=2, wall_time_min=10, job_mode="mpi",
                                        optional_params={"mig_count": "7"})
    template = get_plugin_manager().load_driver("platform", "thetagpu")().job_template()
    # As the scheduler module renders it: the site's platform options reach the template.
    from balsam.config import SiteConfig

    options = template_platform_options(SiteConfig(path).settings)
    script = render_job_script(template, build_context(batch_job, path, platform_options=options, call_hook=False))
    assert "#COBALT --attrs pubnet=true:enable_ssh=1:filesystems=home,grand,eagle,theta-fs0:mig-mode=true" in script
    (path / "qsubmit" / "qlaunch.sh").write_text(script)
    run = subprocess.run(["bash", str(path / "qsubmit" / "qlaunch.sh")], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **machine.env(COBALT_NODEFILE=str(machine.node_file), COBALT_JOBID="10042")})
    assert run.returncode == 0, run.stdout + run.stderr
    # 7 rounds of `nvidia-smi_mig -cgi 19 -C` on each of the 2 nodes (1g.5gb instances)
    assert mig_calls.read_text().splitlines() == ["-cgi 19 -C"] * 14
    for host in ("thetagpu05", "thetagpu06"):
        assert "MIG 1g.5gb" in (gpu_lists / f"balsam-{host}-gpulist.txt").read_text()
    done = wait_for_states(ids, {"RUN_DONE"}, timeout=30)
    seen = [job_out((name, path), f"mig/{n}").split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for n in range(10)]
    assert len(set(seen)) == 10 and set(seen) <= set(MIG7)
    launches = [r for r in machine.records("mpirun") if r["program"][0] == "echo"]
    assert len(launches) == 10
    for r in launches:
        argv = r["argv"]
        forwarded = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
        assert {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "BALSAM_JOB_ID"} <= forwarded
        assert r["env"]["CUDA_VISIBLE_DEVICES"] in MIG7
    assert len(done) == 10 and Job.objects.filter(id=ids, state="RUN_DONE").count() == 10
