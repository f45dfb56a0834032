"""The faked machine and launcher helpers of the platform tests (see conftest.py for the fixtures)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).parent
FAKES = HERE / "fakes"
RECORDED = HERE / "recorded"
PYTHON = sys.executable
VENV_BIN = str(Path(sys.executable).parent)


class FakeMachine:
    """A directory of stand-ins: ``bin/`` (mpiexec, srun, aprun, mpirun, nvidia-smi) and a node file."""

    def __init__(self, root: Path, hosts: list[str]) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.home = root / "home"
        self.home.mkdir()
        self.log = root / "launches.jsonl"
        self.log.touch()
        self.hosts = hosts
        self.node_file = root / "nodefile"
        self.node_file.write_text("".join(f"{h}\n" for h in hosts))
        real = shutil.which("mpiexec", path=VENV_BIN) or shutil.which("mpiexec")
        assert real, "MPICH mpiexec is needed (pip install mpich)"
        self.real_mpiexec = real
        for flavour in ("mpiexec", "srun", "aprun", "mpirun"):
            self._wrapper(flavour, f'exec {PYTHON} {FAKES / "recording_launcher.py"} {flavour} "$@"')

    def _wrapper(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)

    def nvidia_smi(self, recorded: str) -> None:
        """``nvidia-smi -L`` prints the recorded output ``tests/platforms/recorded/<recorded>``."""
        self._wrapper("nvidia-smi", f'[ "$1" = "-L" ] || {{ echo "fake nvidia-smi: only -L" >&2; exit 2; }}\n'
                                    f'cat {RECORDED / recorded}')

    def recorder(self, name: str) -> Path:
        """A program ``name`` that only appends its arguments to ``<root>/<name>.calls``."""
        calls = self.root / f"{name}.calls"
        self._wrapper(name, f'echo "$@" >> {calls}')
        return calls

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join([str(self.bin), VENV_BIN, os.environ.get("PATH", "")])
        return {"PATH": path, "HOME": str(self.home), "FAKE_LAUNCH_LOG": str(self.log),
                "FAKE_REAL_MPIEXEC": self.real_mpiexec, **extra}

    def records(self, launcher: Optional[str] = None) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if launcher is None or r["launcher"] == launcher]


def start_launcher(site_path: Path, job_mode: str, wall_time_min: float, env: dict[str, str],
                   *args: str) -> subprocess.Popen:
    """``python -m balsam.launcher -j MODE -t MIN [ARGS]``, as a machine's job template runs it."""
    full_env = {**os.environ, **env, "BALSAM_SITE_PATH": str(site_path)}
    out = open(site_path / "log" / f"launcher-{time.time_ns()}.console", "wb")
    proc = subprocess.Popen([PYTHON, "-m", "balsam.launcher", "-j", job_mode, "-t", str(wall_time_min), *args],
                            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=site_path)
    proc.console_path = out.name  # type: ignore[attr-defined]
    out.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise AssertionError(f"launcher did not exit in {timeout} s:\n{Path(proc.console_path).read_text()[-3000:]}")


def run_spans(client, site_id: int) -> dict[str, tuple[int, float, float]]:
    """``{workdir: (job id, RUNNING time, RUN_DONE time)}`` from the jobs' events."""
    import datetime as dt

    from balsam.site.service_client import list_all

    workdirs = {row["id"]: row["workdir"] for row in list_all(client, "/jobs/", {"site_id": site_id})}
    times: dict[int, dict[str, float]] = {}
    for event in list_all(client, "/events/", {"job_id": list(workdirs)}):
        stamp = dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
        times.setdefault(event["job_id"], {})[event["to_state"]] = stamp
    return {workdirs[j]: (j, t["RUNNING"], t["RUN_DONE"]) for j, t in times.items() if "RUNNING" in t and "RUN_DONE" in t}


def max_sharing(spans: dict[str, tuple[int, float, float]], slots: dict[str, object]) -> int:
    """The most jobs that ran at the same time on one slot."""
    worst = 0
    for slot in set(slots.values()):
        points = sorted((t, step) for w, s in slots.items() if s == slot
                        for t, step in ((spans[w][1], 1), (spans[w][2], -1)))
        level = 0
        for _, step in points:  # an end sorts before a start at the same instant
            level += step
            worst = max(worst, level)
    return worst


AURORA_ENDED = {"RUN_DONE", "FAILED", "RUN_ERROR"}


def docs_tile_wrapper(docs: Path, tmp_path: Path) -> Path:
    """Writes the ``tile_per_rank.sh`` script of the Aurora docs page ``docs`` as an executable under ``tmp_path``."""
    import re

    (script,) = [s for s in re.findall(r"```bash\n(.*?)```", docs.read_text(), re.S) if "tile_per_rank.sh" in s]
    wrapper = tmp_path / "tile_per_rank.sh"
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    return wrapper


def run_aurora_mpi_job(machine: Any, site_path: Path, ids: list[int]) -> dict[str, Any]:
    """Runs an mpi-mode launcher on ``machine``'s fake Aurora allocation until jobs ``ids`` end; asserts they
    all end RUN_DONE and returns the one mpiexec record."""
    from launcher_helpers import wait_for_states

    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="123.aurora-pbs-0001")
    proc = start_launcher(site_path, "mpi", 2, env)
    try:
        done = wait_for_states(ids, AURORA_ENDED, timeout=120)
    finally:
        finish(proc, 60)
    assert [str(j.state) for j in done.values()] == ["RUN_DONE"] * len(ids)
    (record,) = machine.records("mpiexec")
    return record


def flat_aurora_app(fake_machine: Any, hosts: list[str], tmp_path: Path, monkeypatch: Any, name: str,
                    command_template: str) -> tuple[Any, tuple[str, Path], Any]:
    """Sets FLAT tiles, fakes the machine of ``hosts``, makes an aurora site under ``tmp_path`` and
    syncs there an app ``name`` running ``command_template``; returns ``(machine, (site name, site
    path), the app class)``."""
    from balsam.api import ApplicationDefinition
    from machine_jobs import site_for

    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    machine = fake_machine(hosts)
    site = site_for(tmp_path, "aurora")
    app = type(name, (ApplicationDefinition,), {"site": site[0], "command_template": command_template})
    app.sync()
    return machine, site, app


def polaris_site_init(tmp_path: Path, qstat_q: Path, *options: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``balsam site init --platform polaris [options] -n polaris-site`` on a login node whose
    ``qstat`` prints the recording ``qstat_q`` (for ``qstat -Q -f -F json``): the CLI's run and the
    site's path."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    qstat = fake_bin / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec cat {qstat_q}\n")
    qstat.chmod(0o755)
    path = tmp_path / "polaris-site"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([PYTHON, "-c", "from balsam.cli import main; main()", "site", "init",
                           "--platform", "polaris", *options, "-n", "polaris-site", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    return proc, path

