"""scripts/bootstrap.sh leaves balsam's own sources compiled, as pip does for a regular install.

The installs are editable, so without it a process that may not write bytecode
(``PYTHONDONTWRITEBYTECODE=1``, common in containers and CI) compiles every balsam module it imports,
each time it starts: a launcher, the agent, each CLI call and each Python ``run()`` job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAMP = REPO / ".venv" / ".balsam-bootstrap-1"  # what `scripts/bootstrap.sh --with-test-plugins` writes


def compiled_from_source(code: str) -> list[str]:
    """The repository's source files that ``python -c code`` compiled, not allowed to write bytecode."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-v", "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    # `python -v` names what it loads: "# code object from '.../__pycache__/x.cpython-311.pyc'" for
    # cached bytecode, "# code object from /path/x.py" (no quotes) for a source compiled now.
    prefix = "# code object from "
    return [line[len(prefix):] for line in proc.stderr.splitlines()
            if line.startswith(prefix) and line.endswith(".py") and line[len(prefix):].startswith(str(REPO))]


@pytest.mark.skipif(not STAMP.exists(), reason="this environment was not made by scripts/bootstrap.sh --with-test-plugins")
def test_bootstrap_compiles_the_sources_that_a_python_run_job_and_a_launcher_import():
    # scripts/test.sh ran the script just before pytest, so its stamp matches: this is the quick
    # path, which installs nothing and compiles what changed since.
    proc = subprocess.run(["bash", "scripts/bootstrap.sh", "--with-test-plugins"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stdout, "the stamp matched, so nothing should have been installed"
    code = "import balsam._api.python_runner, balsam.api, balsam.launcher.entry, balsam.cli, balsam.site.agent"
    assert compiled_from_source(code) == []
