"""Polaris and Perlmutter count ``cpu_ids`` as cores and add each core's second hardware thread
themselves (Polaris ``c + 32``; Perlmutter ``c + 64`` on GPU nodes, ``c + 128`` on CPU nodes).
The node's logical CPUs as ``lscpu`` lists them (Polaris ``0-63``, a Perlmutter GPU node
``0-127``) were taken as cores: every core was handed out twice (a job on cores 0-7 and one on
"cores" 32-39, its second threads) and bindings named CPUs the node does not have
(``list:56-63,88-95`` on a 64-CPU node). Such a value is now refused in one line naming the option,
as Aurora's already was."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from balsam_platform_perlmutter.platform import PerlmutterCPUPlatform, PerlmutterGPUPlatform, PerlmutterOptions
from balsam_platform_polaris.platform import PolarisOptions, PolarisPlatform
from launcher_harness import make_site


def test_polaris_logical_cpus_as_cpu_ids_are_refused() -> None:
    assert PolarisOptions(cpu_ids="0-63").validate() == {
        "cpu_ids": "32-63 are hardware threads, not cores: the ids are cores 0-31 (balsam adds core c's second "
                   "hardware thread, c + 32, itself at threads_per_core=2)"}
    with pytest.raises(ValueError, match=r"^launcher\.platform_options\.cpu_ids: 32-63 are hardware threads"):
        PolarisPlatform(options={"cpu_ids": "0-63"})
    # Cores, or a smaller hyperthread_offset's cores, stay as they were.
    assert PolarisOptions(cpu_ids="0-31").validate() == {} and PolarisPlatform(options={"cpu_ids": "1-31"})
    assert PolarisOptions(cpu_ids="0-63", hyperthread_offset=64).validate() == {}


@pytest.mark.parametrize("platform,logical,cores", [(PerlmutterGPUPlatform, "0-127", 64),
                                                     (PerlmutterCPUPlatform, "0-255", 128)])
def test_perlmutter_logical_cpus_as_cpu_ids_are_refused(platform, logical: str, cores: int) -> None:
    with pytest.raises(ValueError, match=rf"^launcher\.platform_options\.cpu_ids on {platform.name} nodes: "
                                         rf"{cores}-{2 * cores - 1} are hardware threads, not cores"):
        platform(options={"cpu_ids": logical})
    assert platform(options={"cpu_ids": f"0-{cores - 1}"}).cpu_ids == tuple(range(cores))
    assert platform().cpu_ids == tuple(range(cores))


def test_perlmutter_settings_check_refuses_what_no_node_type_has() -> None:
    # The options do not say the node type: beyond 127 is a thread on both.
    assert "128-255 are hardware threads" in PerlmutterOptions(cpu_ids="0-255").validate()["cpu_ids"]
    assert PerlmutterOptions(cpu_ids="0-127").validate() == {} and PerlmutterOptions().validate() == {}


def test_the_launcher_names_it_in_one_line(balsam_env, tmp_path: Path) -> None:
    """The launcher on a faked Perlmutter GPU node with ``cpu_ids: 0-127``: one line, no traceback."""
    name = f"pm-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": "perlmutter-gpu", "platform_options": {"cpu_ids": "0-127"}})
    proc = subprocess.run([sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "1"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BALSAM_SITE_PATH": str(path),
                                                       "SLURM_JOB_NODELIST": "nid001234", "SLURM_JOB_ID": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "platform_options.cpu_ids on perlmutter-gpu nodes: 64-127 are hardware" in line
