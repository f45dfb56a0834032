"""A job variable longer than exec can pass is FAILED when the job is prepared, naming it.

Linux passes at most 131,072 bytes in one exec string, its terminating NUL included
(MAX_ARG_STRLEN). A job whose app set a longer variable ended RUN_ERROR at its start with
``could not start the job: [Errno 7] Argument list too long: '/usr/bin/true'`` (mpi mode:
``'.../mpiexec'``): the message named the program, whose arguments were empty, not the variable.
The boundary is checked against the kernel itself.
"""

from __future__ import annotations

import subprocess
import types
from pathlib import Path
from typing import Any

import pytest


def _job() -> Any:
    return types.SimpleNamespace(id=1, app_id=1, workdir="w", num_nodes=1, ranks_per_node=1, threads_per_rank=1,
                                 threads_per_core=1, gpus_per_rank=0, node_packing_count=1, launch_params={},
                                 parameters={}, serialized_parameters="", get_parameters=lambda: {})


def _app(variables: dict[str, str]) -> Any:
    from balsam.api import ApplicationDefinition

    class Env(ApplicationDefinition):
        site = 1
        command_template = "true"
        environment_variables = variables

    return Env


def test_a_variable_over_exec_s_limit_fails_the_job_naming_it(tmp_path: Path) -> None:
    from balsam.launcher.app_run import MAX_ARG_BYTES, JobBuildError, JobPreparer

    fits = "A" * (MAX_ARG_BYTES - len("BIG=") - 1)  # "BIG=...": 131,071 bytes, and its NUL
    over = fits + "A"
    # The kernel's own verdict on both.
    assert subprocess.run(["true"], env={"BIG": fits}).returncode == 0
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run(["true"], env={"BIG": over})

    prepared = JobPreparer(tmp_path, load_app=lambda _app_id: _app({"SMALL": "1", "BIG": fits})).prepare(_job())
    assert prepared.env["BIG"] == fits
    with pytest.raises(JobBuildError) as error:
        JobPreparer(tmp_path, load_app=lambda _app_id: _app({"SMALL": "1", "BIG": over})).prepare(_job())
    assert str(error.value).startswith("environment variable 'BIG' (131,072 bytes) is too long"), error.value
    assert "MAX_ARG_STRLEN" in str(error.value) and "SMALL" not in str(error.value)
    # Bytes, not characters: 'é' is two ("WIDE=" and 65,536 of them).
    with pytest.raises(JobBuildError, match=r"environment variable 'WIDE' \(131,077 bytes\) is too long"):
        JobPreparer(tmp_path, load_app=lambda _app_id: _app({"WIDE": "é" * 65_536})).prepare(_job())
