"""Helpers of the foundation tests: run the real `balsam` executable and Python in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BALSAM_EXE = Path(sys.executable).parent / "balsam"
PLUGIN_ENV = ("BALSAM_PLUGINS", "BALSAM_DISABLE_PLUGIN_AUTOLOAD", "BALSAM_TESTPLUGIN_FAULTS", "BALSAM_CLI_TRACEBACK")


def run_balsam(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
    """Run the installed `balsam` executable in a fresh process (real entry-point discovery)."""
    full_env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [str(BALSAM_EXE), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120):
    full_env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
