"""Perlmutter GPU and CPU nodes: the conformance kit, site init (QOS queues through the Slurm
scheduler's queue_flag option) and runs through the real launcher on a faked Perlmutter allocation
(``$SLURM_JOB_NODELIST`` nid ranges, a recording ``srun`` first on PATH)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from balsam.platform import LaunchSpec
from balsam.testing import PlatformContract
from balsam.testing.platform_contract import SERIAL_WORKER_CMDLINE
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from machine_jobs import balsam_client, done_site_id, job_out, run_jobs, site_for
from platform_harness import max_sharing, run_spans

HOSTS = ["nid001234", "nid001235"]


class TestPerlmutterGPU(PlatformContract):
    platform_class = PerlmutterGPUPlatform
    allocation_env = {"SLURM_JOB_NODELIST": "nid[001234-001235]", "SLURM_JOB_ID": "31415926"}
    expected_hostnames = HOSTS
    expected_cpu_count = 64
    expected_gpu_ids = ["0", "1", "2", "3"]
    expected_scheduler_id = 31415926
    gpu_visibility = [(["2"], {"CUDA_VISIBLE_DEVICES": "2"})]
    launch_lines = [
        # 0.7's PerlmutterRun: one rank gets --gres=craynetwork:0; --cpus-per-task counts logical CPUs
        # (2 threads -> 2 cores -> 4 hardware threads) and --cpu-bind=cores, NERSC's rule
        (LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=1, gpus_per_rank=1, threads_per_rank=2),
         "srun --gres=craynetwork:0 -n 1 --ntasks-per-node 1 --gpus-per-task 1 --nodelist nid001234 --nodes 1 "
         "--cpus-per-task 4 --cpu-bind=cores --overlap ./app"),
        # the job's cpu-bind replaces the default one
        (LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=4, threads_per_rank=16, gpus_per_rank=1,
                    launch_params={"cpu-bind": "threads"}),
         "srun -n 8 --ntasks-per-node 4 --gpus-per-task 1 --nodelist nid001234,nid001235 --nodes 2 "
         "--cpus-per-task 32 --cpu-bind=threads --overlap ./app"),
        # half a GPU: no srun GPU request (two such jobs share one GPU through CUDA_VISIBLE_DEVICES)
        (LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=2, gpus_per_rank=0.5),
         "srun -n 2 --ntasks-per-node 2 --nodelist nid001234 --nodes 1 --cpus-per-task 2 --cpu-bind=cores --overlap ./app"),
    ]
    # a worker owns its node: NERSC's -c 2 * floor(64 cores / 1 task) (it had -c 2, one core, for
    # every task it pins)
    serial_worker_line = (f"srun -n 2 --ntasks-per-node 1 --nodelist nid001234,nid001235 --nodes 2 "
                          f"--cpus-per-task 128 --cpu-bind=cores --overlap {SERIAL_WORKER_CMDLINE}")
    # cpu_affinity: none (the settings default): the worker gets every logical CPU of its node
    unbound_serial_worker_line = (f"srun -n 2 --ntasks-per-node 1 --nodelist nid001234,nid001235 --nodes 2 "
                                  f"--cpus-per-task 128 --cpu-bind=cores --overlap {SERIAL_WORKER_CMDLINE}")
    # core c's second hardware thread is c + 64
    task_cpu_cases = [((3,), 2, (3, 67))]


class TestPerlmutterCPU(TestPerlmutterGPU):
    platform_class = PerlmutterCPUPlatform
    expected_cpu_count = 128
    expected_gpu_ids = []
    gpu_visibility = []
    launch_lines = [
        (LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=128, threads_per_rank=2, threads_per_core=2),
         "srun -n 256 --ntasks-per-node 128 --nodelist nid001234,nid001235 --nodes 2 --cpus-per-task 2 "
         "--cpu-bind=cores --overlap ./app"),
    ]
    serial_worker_line = (f"srun -n 2 --ntasks-per-node 1 --nodelist nid001234,nid001235 --nodes 2 "
                          f"--cpus-per-task 256 --cpu-bind=cores --overlap {SERIAL_WORKER_CMDLINE}")
    unbound_serial_worker_line = (f"srun -n 2 --ntasks-per-node 1 --nodelist nid001234,nid001235 --nodes 2 "
                                  f"--cpus-per-task 256 --cpu-bind=cores --overlap {SERIAL_WORKER_CMDLINE}")
    task_cpu_cases = [((3,), 2, (3, 131))]


def test_cpus_per_task_counts_hardware_threads() -> None:
    """srun's -c counts logical CPUs (2 per core): it was threads_per_rank, so a rank of 16 threads
    got 8 cores. Launch params replace the computed options under any of their spellings."""
    platform = PerlmutterGPUPlatform()

    def options(**kw):
        args = platform.mpi_launch_args(LaunchSpec(cmdline="app", hostnames=HOSTS[:1], **kw))
        return args[1:]

    def value(args, option):
        return args[args.index(option) + 1]

    assert value(options(threads_per_rank=16), "--cpus-per-task") == "32"  # 16 cores
    assert value(options(threads_per_rank=16, threads_per_core=2), "--cpus-per-task") == "16"  # 8 cores
    assert value(options(threads_per_rank=3, threads_per_core=2), "--cpus-per-task") == "3"  # 3 hardware threads
    # Ranks that share a core get one logical CPU each: 2 (a whole core) asked srun for twice the
    # node's 256 logical CPUs for a node of 256 one-thread ranks at 2 threads per core.
    cpu = PerlmutterCPUPlatform().mpi_launch_args(LaunchSpec(cmdline="app", hostnames=HOSTS[:1], ranks_per_node=256,
                                                             threads_per_rank=1, threads_per_core=2))
    assert value(cpu, "--cpus-per-task") == "1"
    # --ntasks-per-node is the job's ranks_per_node, as balsam placed it: a launch param naming it is
    # not passed (tests/platforms/test_launch_params_reserved.py), whatever its value
    assert value(options(launch_params={"ntasks-per-node": "2"}), "--ntasks-per-node") == "1"
    assert options(launch_params={"ntasks-per-node": ""}).count("--ntasks-per-node") == 1
    assert value(options(), "--cpus-per-task") == "2" and "--cpu-bind=cores" in options()
    for key in ("cpus-per-task", "--cpus-per-task", "c", "-c"):
        args = options(launch_params={key: "8"})
        assert value(args, "--cpus-per-task") == "8" and args.count("--cpus-per-task") == 1 and "-c" not in args, key
    for key in ("gres", "--gres"):
        args = options(launch_params={key: "gpu:1"})
        assert "--gres=gpu:1" in args and "--gres" not in args and "--gres=craynetwork:0" not in args
    # an empty value leaves a computed option out (srun has no bare --gpus-per-task); never ''
    args = options(gpus_per_rank=1, launch_params={"gpu-bind": "none", "gpus-per-task": ""})
    assert "--gpus-per-task" not in args and "" not in args and args[-3:] == ["--gpu-bind", "none", "--overlap"]
    assert "--cpu-bind=cores" not in options(launch_params={"cpu_bind": ""})


def test_site_init_uses_qos_queues(balsam_env, client, tmp_path: Path) -> None:
    from balsam.config import load_settings
    from balsam.plugins.manager import get_plugin_manager
    from balsam.scheduler import SubmitRequest
    from balsam.site.site_ops import init_site

    init_site(tmp_path / "pm", "pm-gpu", "perlmutter-gpu", client, projects=["m1234"])
    raw = yaml.safe_load((tmp_path / "pm" / "settings.yml").read_text())
    assert raw["scheduler"]["name"] == "slurm" and raw["scheduler"]["options"]["queue_flag"] == "--qos"
    assert set(raw["scheduler"]["allowed_queues"]) == {"regular", "debug", "shared"} and raw["scheduler"]["allowed_projects"] == ["m1234"]
    assert raw["launcher"]["serial_mode_startup_params"] == {"cpus-per-task": "128"}
    settings = load_settings(tmp_path / "pm" / "settings.yml")
    scheduler = get_plugin_manager().load_driver("scheduler", "slurm")(options=settings.scheduler.options)
    command = scheduler.render_submit(SubmitRequest(
        script_path=tmp_path / "pm" / "qsubmit" / "qlaunch1.sh", project="m1234", queue="regular", num_nodes=2,
        wall_time_min=30, job_name="balsam-1", optional_params=settings.scheduler.optional_batch_job_params))
    assert "--qos" in command.args and command.args[command.args.index("--qos") + 1] == "regular"
    assert "--constraint=gpu" in command.args and "--partition" not in command.args
    template = (tmp_path / "pm" / "job-template.sh").read_text()
    # The queue goes on the sbatch line only (queue_flag): a template line too would ask for a QOS named
    # after the partition once a site sets queue_flag back to --partition.
    assert "#SBATCH --qos" not in template and "#SBATCH --partition" not in template and '"gpu"' in template


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_jobs_on_a_faked_perlmutter_gpu(mode: str, balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine([])
    site = site_for(tmp_path, "perlmutter-gpu", serial_mode_startup_params={"cpus-per-task": "128"})
    env = machine.env(SLURM_JOB_NODELIST="nid[001234-001235]", SLURM_JOB_ID="31415926")
    done = run_jobs(site, mode, env, lambda App: [
        App.submit(workdir=f"gpu/{n}", n=n, gpus_per_rank=1, threads_per_rank=8, node_packing_count=4, save=False)
        for n in range(8)])
    seen = {}
    for n in range(8):
        out = job_out(site, f"gpu/{n}")
        assert f"job {n} " in out and "OMP_NUM_THREADS=8" in out, out
        seen[f"gpu/{n}"] = out.split("CUDA_VISIBLE_DEVICES=")[1].split()[0]
    assert set(seen.values()) <= {"0", "1", "2", "3"}
    # At most one job per GPU of each node at a time (the node of a serial-mode task is not recorded).
    assert max_sharing(run_spans(balsam_client(), done_site_id(done)), seen) <= len(HOSTS)
    records = machine.records("srun")
    if mode == "mpi":
        assert len(records) == 8
        for r in records:
            opts = dict(r["options"])
            # 8 threads, one per core: 8 cores of 2 hardware threads. Packed on a node: no GPU asked
            # of Slurm (it would pick GPU 0 for every --overlap step: test_perlmutter_slurm_gres_*);
            # the program runs under the GPU balsam gave the job.
            # Its CPUs likewise: the step spans the node's 128 and is bound by mask to balsam's 8 cores
            # (Slurm bound every --overlap step to the first cores: test_perlmutter_packed_cpus_recorded);
            # the app sees the job's own 16.
            assert "--gpus-per-task" not in opts and opts["--cpus-per-task"] == "128" and "--overlap" in opts
            # The task is a /bin/sh wrapper exporting them, then running the command (srun's lookup).
            assert r["program"][:2] == ["/bin/sh", "-c"] and r["program"][3] == "sh"
            env = dict(a.split("=", 1) for a in r["program"][4:r["program"].index("--")])
            assert env["SLURM_CPUS_PER_TASK"] == "16"
            assert env["CUDA_VISIBLE_DEVICES"] in {"0", "1", "2", "3"}
            assert opts["--cpu-bind"].startswith("mask_cpu:") and bin(int(opts["--cpu-bind"][9:], 16)).count("1") == 16
            assert opts["--nodelist"] in HOSTS and opts["--gres"] == "craynetwork:0"
    else:
        (workers,) = records
        opts = dict(workers["options"])
        assert opts["-n"] == "2" and opts["--ntasks-per-node"] == "1" and opts["--cpus-per-task"] == "128"
        assert opts["--gpus-per-task"] == "4" and opts["--nodelist"] == ",".join(HOSTS)
