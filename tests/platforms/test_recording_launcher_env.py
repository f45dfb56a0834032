"""The recording launcher gives its ranks the environment the real launcher would: PALS ``mpiexec
--env NAME=value`` over ``--envall`` (its default), ``--envnone`` and ``--envlist``; ``srun
--export``; ``aprun -e``; Open MPI ``mpirun -x NAME=value``. Without it a job given its GPUs by
``--env`` (an Aurora multi-node job's mask) ran in the tests without them, and tests asserted that."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from platform_harness import FAKES, PYTHON, FakeMachine

_spec = importlib.util.spec_from_file_location("recording_launcher", FAKES / "recording_launcher.py")
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)  # type: ignore[union-attr]

CALLER = {"PATH": "/bin", "HOME": "/home/u", "ZE_AFFINITY_MASK": "7", "OMP_NUM_THREADS": "2", "OTHER": "x"}


def ranks_get(flavour: str, *argv: str) -> dict[str, str]:
    options, _ = launcher.parse(flavour, [*argv, "app"])
    return launcher.rank_environment(flavour, options, dict(CALLER))


def test_pals_env_over_envall() -> None:
    env = ranks_get("mpiexec", "-n", "2", "--envall", "--env", "ZE_AFFINITY_MASK=0,1", "--env", "A=b=c")
    assert env == {**CALLER, "ZE_AFFINITY_MASK": "0,1", "A": "b=c"}
    assert ranks_get("mpiexec", "--env", "X=1", "--env", "X=2")["X"] == "2"  # the later one
    assert ranks_get("mpiexec", "--env=X=1") == {**CALLER, "X": "1"}
    assert ranks_get("mpiexec", "-n", "1") == CALLER  # --envall is the default


def test_pals_envnone_and_envlist() -> None:
    assert ranks_get("mpiexec", "--envnone", "--env", "X=1") == {"PATH": "/bin", "HOME": "/home/u", "X": "1"}
    assert ranks_get("mpiexec", "--envlist", "OTHER,OMP_NUM_THREADS") == {
        "PATH": "/bin", "HOME": "/home/u", "OTHER": "x", "OMP_NUM_THREADS": "2"}


def test_srun_export() -> None:
    assert ranks_get("srun", "-n", "1") == CALLER
    assert ranks_get("srun", "--export=ALL,CUDA_VISIBLE_DEVICES=1") == {**CALLER, "CUDA_VISIBLE_DEVICES": "1"}
    assert ranks_get("srun", "--export", "NONE") == {"PATH": "/bin", "HOME": "/home/u"}
    assert ranks_get("srun", "--export=OTHER,Y=2") == {"PATH": "/bin", "HOME": "/home/u", "OTHER": "x", "Y": "2"}


def test_aprun_e_and_mpirun_x() -> None:
    assert ranks_get("aprun", "-n", "1", "-e", "OMP_NUM_THREADS=4") == {**CALLER, "OMP_NUM_THREADS": "4"}
    assert ranks_get("mpirun", "-x", "OTHER", "-x", "Z=3") == {**CALLER, "Z": "3"}


def test_bad_env_option_is_refused() -> None:
    with pytest.raises(SystemExit, match="--env 'NOVALUE': expected NAME=value"):
        ranks_get("mpiexec", "--env", "NOVALUE")


@pytest.mark.mpi
def test_ranks_see_env_and_the_record_says_so(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path / "machine", ["h1"])
    env = machine.env(ZE_AFFINITY_MASK="launcher")
    out = subprocess.run([str(machine.bin / "mpiexec"), "-n", "2", "--envall", "--env", "ZE_AFFINITY_MASK=0.0,0.1",
                          PYTHON, "-c", "import os; print(os.environ['ZE_AFFINITY_MASK'])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.0,0.1", "0.0,0.1"]
    (record,) = machine.records("mpiexec")
    assert record["env"]["ZE_AFFINITY_MASK"] == "0.0,0.1" and record["caller_env"]["ZE_AFFINITY_MASK"] == "launcher"
