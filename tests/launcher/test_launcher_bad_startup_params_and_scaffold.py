"""Three fixes, each shown failing before it:

1. A ``launcher.serial_mode_startup_params`` value the platform refuses (``cpu-bind: depht`` on a
   faked Polaris or Aurora allocation) stopped a real serial launcher with a Python traceback (rc 1)
   whose last line was the platform's one-line ValueError; the launcher's log did not have it, nor
   the BatchJob. It now ends the serial mode's start as the workers' refused start does
   (``serial mode did not start: <the line>``: the log, stderr, the BatchJob's
   ``status_info["error"]``, exit 1); the site's jobs are free the moment it exits (its Session
   is gone), none ran and none is left held.
2. ``balsam plugins new platform NAME`` generated a launch-param loop that wrote ``--key True``
   for a boolean (``mpiexec`` then took ``True`` for the program to run); the generated driver now
   calls core's ``launch_param_args`` (a flag for True, nothing for False).
3. ``pals_cpu_bind_problem`` refused a comma-separated ``mask:`` list, the form HPE's ``cray
   mpiexec`` documents ("comma-separated bitmasks of CPUs"); the colon-separated one stays taken.

Real uvicorn server, real ``python -m balsam.launcher`` processes (recording ``mpiexec`` first on
PATH, as the platform tests fake a machine).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "platforms"))  # platform_harness: the faked machine

from launcher_harness import finish, make_site  # noqa: E402
from launcher_helpers import make_runnable  # noqa: E402
from platform_harness import FakeMachine, start_launcher  # noqa: E402

HOSTS = ["x3001c0s1b0n0", "x3001c0s7b0n0"]
LINE = ("launcher.serial_mode_startup_params 'cpu-bind' is not a PALS --cpu-bind: expected one of none, core, depth, "
        "numa, socket, thread, ")


def _free_now(site_id: int, count: int) -> list[int]:
    """The ids a new Session of the site leases now (one acquire, no retry); deleted after, which
    gives them back."""
    from balsam.launcher.service_calls import open_raw_lease

    lease = open_raw_lease(site_id, None)
    try:
        return sorted(int(row["id"]) for row in lease.acquire(count + 10))
    finally:
        lease.close(retry_count=0)


@pytest.mark.mpi
@pytest.mark.parametrize("platform", ["polaris", "aurora"])
def test_a_bad_serial_startup_param_stops_the_serial_launcher_in_one_line(platform: str, balsam_env,
                                                                          tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job, Site

    name = f"sp-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": platform, "idle_ttl_sec": 2,
                                             "serial_mode_startup_params": {"cpu-bind": "depht"}})

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo ran"

    Echo.sync()
    ids = make_runnable([Echo.submit(workdir=f"e/{i}", save=False) for i in range(3)])
    site_id = Site.objects.get(name=name).id
    batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=2,
                                        wall_time_min=5, job_mode="serial")
    machine = FakeMachine(tmp_path / "machine", HOSTS)
    # The BatchJob's id as the job template exports it: the launcher opens its Session early.
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="9.pbs", BALSAM_BATCH_JOB_ID=str(batch_job.id))
    proc = start_launcher(path, "serial", 5, env)
    rc = finish(proc, timeout=90)
    free = _free_now(site_id, len(ids))  # at once: no job left held by a Session of the launcher
    console = Path(proc.console_path).read_text()
    assert rc == 1, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    (said,) = [line for line in console.splitlines() if LINE in line]
    assert said.endswith("got 'depht'"), console[-3000:]
    log = "".join(p.read_text() for p in (path / "log").glob("serial_mode_*.log"))
    assert LINE in log and "got 'depht'" in log, log[-3000:]
    error = BatchJob.objects.get(id=batch_job.id).status_info.get("error", "")
    assert LINE in error and "\n" not in error, error
    assert machine.records("mpiexec") == []  # no workers started with a line mpiexec refuses
    assert free == sorted(ids), free
    assert {str(j.state) for j in Job.objects.filter(id=ids)} == {"PREPROCESSED"}
    assert not [e for e in EventLog.objects.filter(job_id=ids) if str(e.to_state) == "RUNNING"]


def test_the_scaffolded_platform_writes_boolean_launch_params_as_core_does(tmp_path: Path, monkeypatch) -> None:
    from balsam.cli.plugin_scaffold import scaffold
    from balsam.platform import LaunchSpec

    name = f"brook{uuid.uuid4().hex[:6]}"
    package = scaffold("platform", name, tmp_path)
    monkeypatch.syspath_prepend(str(package))
    module = importlib.import_module(f"balsam_platform_{name}")
    platform = getattr(module, f"{name.capitalize()}Platform")(options={})
    params = {"verbose": True, "quiet": False, "debug": "true", "trace": "False", "env": "A=1", "exclusive": ""}
    args = platform.mpi_launch_args(LaunchSpec(cmdline="./app", hostnames=["nid001"], ranks_per_node=2,
                                               launch_params=params))
    assert args[args.index("nid001") + 1:] == ["--verbose", "--debug", "--env", "A=1", "--exclusive"], args
    source = (package / f"balsam_platform_{name}" / "__init__.py").read_text()
    assert "launch_param_args(spec.launch_params)" in source  # core's rule, not a copy of its own
    # The generated package's own tests (its launch-line case with launch params among them) pass.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=package,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout.splitlines()[-1], proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("bind", [
    "mask:0xff,0xff00",              # HPE's `cray mpiexec` help: "comma-separated bitmasks of CPUs"
    "verbose,mask:ff,ff00,ff0000",
    "mask:0xff:0xff00",              # one mask per rank, ':' as list: separates its ranks (taken before)
    "mask:0xff",
])
def test_a_comma_separated_mask_list_is_a_pals_cpu_bind(bind: str) -> None:
    from balsam.platform import pals_cpu_bind_problem

    assert pals_cpu_bind_problem(bind) is None


@pytest.mark.parametrize("bind, said", [
    ("mask:0xff,zz", "rank 1's CPUs 'zz' in 'mask:0xff,zz' are not hex masks"),
    ("mask:0xff,", "rank 1's CPUs '' in 'mask:0xff,' are not hex masks"),
    ("mask:", "rank 0's CPUs '' in 'mask:' are not hex masks"),
    ("list:0-3:x", "rank 1's CPUs 'x' in 'list:0-3:x' are not CPU ids and ranges like 0-7,32-39"),
])
def test_a_mask_or_list_pals_refuses_is_still_refused_in_one_line(bind: str, said: str) -> None:
    from balsam.platform import pals_cpu_bind_problem

    problem = pals_cpu_bind_problem(bind)
    assert problem is not None and problem.startswith(said) and "\n" not in problem, problem
