"""Theta's own limits, found running a Cobalt/Theta site end to end with fake Cobalt and aprun.

- ``-x qsub_flags="--dependencies 6"`` (docs/schedulers/cobalt.md's pass-through) was refused on
  theta-knl and thetagpu: ``qsub_flags`` was not in their ``optional_batch_job_params``.
- theta-knl's sites got ``max_concurrent_mpiruns: 1000`` (the generic default), above the ~980
  concurrent aprun ALPS allows a batch job: mpi mode's last launches would fail.
- ``threads_per_core`` above a core's hardware threads (4 on KNL, 2 on a DGX A100): mpi mode wrote
  ``aprun -j 8`` (aprun refuses it: the run failed at launch) and serial mode capped the pinning
  without a word while the node manager counted half the cores. The platforms now declare
  ``hardware_threads_per_core``, the cap every other platform uses (cores, binding, pinning, and
  the launcher's one warning per app and value).
- ``$COBALT_PARTNAME`` with a range that runs backwards (``3826-3824``) expanded to no nodes without
  a word (a launcher on fewer nodes, or "found no nodes"): now the launcher's one ``Error:`` line
  names the range.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from balsam.config import SiteConfig
from balsam.config.schema import LauncherSettings
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.mpi import MPIMode
from balsam.launcher.modes.serial import SerialMode
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import LaunchSpec, NodeInfo
from balsam.scheduler import CommandResult
from balsam.testing.fakebatch import fake_batch_env
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_platform_theta import ThetaGPUPlatform, ThetaKNLPlatform, expand_nid_ranges
from balsam_scheduler_cobalt import CobaltScheduler
from machine_jobs import job_out, run_jobs, site_for
from platform_harness import finish, start_launcher

TESTS = Path(__file__).resolve().parents[1]
KNL_ENV = {"COBALT_PARTNAME": "3824-3825", "COBALT_JOBID": "512345"}
#: 16 threads at 8 per core: on KNL's 4-thread cores, 4 cores (uncapped: 2)
OVER_CAP = Demand(threads_per_rank=16, threads_per_core=8)


def balsam_cli(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, f"balsam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# -- qsub_flags and max_concurrent_mpiruns, through site init and `balsam queue submit` -------------


def test_theta_knl_site_takes_qsub_flags_and_caps_concurrent_apruns(balsam_env, client, tmp_path: Path,
                                                                     monkeypatch) -> None:
    from balsam.site.modules.scheduler import SchedulerModule

    for key, value in fake_batch_env(TESTS / "fixtures" / "fake_cobalt", tmp_path / "server",
                                     FAKE_COBALT_PROJECTS="datascience").items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "knl"
    balsam_cli("site", "init", "--platform", "theta-knl", "-n", "knl-site", str(path), cwd=tmp_path)
    settings = yaml.safe_load((path / "settings.yml").read_text())
    assert settings["launcher"]["max_concurrent_mpiruns"] == 980
    site = SiteConfig(path)
    assert site.launcher_settings.launcher.max_concurrent_mpiruns == 980  # what mpi mode reads
    assert "qsub_flags" in settings["scheduler"]["optional_batch_job_params"]

    # The documented pass-through, as a user types it.
    balsam_cli("queue", "submit", "-n", "2", "-t", "10", "-q", "default", "-A", "datascience", "-j", "mpi",
               "-x", "qsub_flags=--dependencies 6", cwd=path)
    (batch_job,) = client.get("/batch-jobs/", params={"site_id": site.site_id})["results"]
    assert batch_job["optional_params"] == {"qsub_flags": "--dependencies 6"}

    # The agent's own check of it, and the qsub line it submits.
    empty = CommandResult(("cmd",), 0, "", "")
    runner = ReplayRunner({"qsub": load_recorded(TESTS / "schedulers" / "data" / "cobalt", "qsub_ok"),
                           "qstat": empty, "nodelist": empty})
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=CobaltScheduler(runner, user="alice"))
    module.run_cycle()
    record = client.get(f"/batch-jobs/{batch_job['id']}")
    assert record["state"] == "queued", record
    (qsub,) = [c.args for c in runner.calls if c.args[0] == "qsub"]
    assert list(qsub[-3:-1]) == ["--dependencies", "6"] and qsub[-1].endswith(".sh"), qsub


def test_thetagpu_accepts_qsub_flags() -> None:
    from balsam.batch_job_rules import check_batch_job

    scheduler = ThetaGPUPlatform().settings_defaults()["scheduler"]
    check_batch_job({"queue": "full-node", "project": "datascience", "num_nodes": 2, "wall_time_min": 30,
                     "optional_params": {"qsub_flags": "--dependencies 6", "mig_count": "7"}},
                    scheduler["allowed_queues"], scheduler["allowed_projects"], scheduler["optional_batch_job_params"])
    assert "max_concurrent_mpiruns" not in ThetaGPUPlatform().settings_defaults()["launcher"]  # mpirun: no ALPS limit


# -- threads_per_core above the cores' hardware threads ----------------------------------------------


def test_aprun_j_is_capped_at_the_knl_cores_threads() -> None:
    platform = ThetaKNLPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=["nid03824"], ranks_per_node=4, threads_per_rank=16, threads_per_core=8)
    args = platform.mpi_launch_args(spec)
    assert args[args.index("-j") + 1] == "4" and args[args.index("-d") + 1] == "16"
    # A job's own -j is passed as given (aprun says what it thinks of it).
    spec = LaunchSpec(cmdline="./app", hostnames=["nid03824"], threads_per_core=8, launch_params={"j": "2"})
    args = platform.mpi_launch_args(spec)
    assert args[args.index("-j") + 1] == "2"


def _context(tmp_path: Path, platform, job_mode: str, settings=None, site_config=None) -> LauncherContext:
    env = KNL_ENV if isinstance(platform, ThetaKNLPlatform) else {}
    nodes = platform.discover_nodes(env) if env else [NodeInfo(node_id="thetagpu05", hostname="thetagpu05",
                                                                cpu_ids=platform.cpu_ids)]
    return LauncherContext(site_config=site_config, settings=settings, site_id=1, data_path=tmp_path / "data",
                           log_path=tmp_path / "log", platform=platform, nodes=nodes, wall_time_min=10, job_mode=job_mode)


@pytest.mark.parametrize("platform_class, cap", [(ThetaKNLPlatform, 4), (ThetaGPUPlatform, 2)])
def test_mpi_mode_counts_cores_at_the_cap(platform_class, cap, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_SPAWNER", "0")  # an in-process pool: no spawner to end
    platform = platform_class({"gpu_list_dir": ""} if platform_class is ThetaGPUPlatform else None)
    mode = MPIMode(_context(tmp_path, platform, "mpi", types.SimpleNamespace(launcher=LauncherSettings())))
    assert mode.node_manager.max_threads_per_core == cap
    assert len(mode.node_manager.assign(1, OVER_CAP).cpu_ids[0]) == 16 // cap


@pytest.mark.parametrize("platform_class, cap", [(ThetaKNLPlatform, 4), (ThetaGPUPlatform, 2)])
def test_serial_mode_counts_and_pins_at_the_cap(platform_class, cap, tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text(f"launcher:\n  platform: {platform_class.name}\n")
    site_config = SiteConfig(site)
    platform = platform_class({"gpu_list_dir": ""} if platform_class is ThetaGPUPlatform else None)
    context = _context(tmp_path, platform, "serial", site_config.launcher_settings, site_config)
    config = json.loads(json.dumps(SerialMode(context).worker_config()))  # as the ranks read it

    class Built(Exception):
        pass

    def stop_at_the_node_manager(nodes, **kwargs) -> None:
        raise Built(NodeManager(nodes, **kwargs))

    monkeypatch.setattr(serial_worker, "NodeManager", stop_at_the_node_manager)
    with pytest.raises(Built) as built:
        serial_worker.build_master(config, None, [0], None, None, lambda: platform)  # type: ignore[arg-type]
    node_manager = built.value.args[0]
    assert node_manager.max_threads_per_core == cap
    cores = node_manager.assign(1, OVER_CAP).cpu_ids[0]
    assert len(cores) == 16 // cap
    assert len(platform.task_cpu_ids(cores, 8)) == 16  # each core and its cap - 1 siblings


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_a_job_over_the_knl_cap_runs_with_the_warning(mode: str, balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine([])
    site = site_for(tmp_path, "theta-knl", mpirun_allows_node_packing=False, serial_mode_startup_params={"cc": "none"})
    run_jobs(site, mode, machine.env(**KNL_ENV),
             lambda App: [App.submit(workdir="over", n=1, threads_per_rank=16, threads_per_core=8, save=False)],
             command_template="echo job {{ n }} OMP_NUM_THREADS=$OMP_NUM_THREADS")
    assert "job 1 OMP_NUM_THREADS=16" in job_out(site, "over")
    if mode == "mpi":
        (run,) = [dict(r["options"]) for r in machine.records("aprun")]
        assert run["-j"] == "4" and run["-d"] == "16", run
    # The launcher's warning (in its log, and echoed on its console), where there was none.
    logs = "".join(p.read_text(errors="replace") for p in (site[1] / "log").rglob("*.log"))
    assert "threads_per_core=8 is more than the 4 hardware threads of a core on this machine" in logs, logs[-3000:]


# -- $COBALT_PARTNAME ranges ---------------------------------------------------------------------------


def test_a_backwards_nid_range_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^\$COBALT_PARTNAME: nid range '3826-3824' runs backwards$"):
        expand_nid_ranges("3826-3824")
    with pytest.raises(ValueError, match="'3826-3825'"):
        ThetaKNLPlatform().discover_nodes({"COBALT_PARTNAME": "3820,3826-3825"})
    assert expand_nid_ranges("3824-3824,4001") == [3824, 4001]  # a one-nid range is fine


def test_the_launcher_stops_with_one_error_line_on_a_backwards_range(balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine([])
    _, path = site_for(tmp_path, "theta-knl")
    proc = start_launcher(path, "mpi", 1, machine.env(COBALT_PARTNAME="3824,3826-3825", COBALT_JOBID="512345"))
    assert finish(proc, timeout=60) == 1, Path(proc.console_path).read_text()
    lines = Path(proc.console_path).read_text().strip().splitlines()
    assert lines == ["Error: platform 'theta-knl' could not discover the nodes: "
                     "$COBALT_PARTNAME: nid range '3826-3825' runs backwards"], lines
