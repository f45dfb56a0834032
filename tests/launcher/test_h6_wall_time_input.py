"""``-t`` values that are no wall time: one line ``Error: ...`` and exit 1 before anything starts.

``-t nan`` passed the old ``<= 0`` test: the launcher stopped at once and exited 0, its log saying
"done (wall time)". ``-t inf`` (or ``1e300``) made every acquire fail, once a second (``cannot
convert float NaN to integer``, or the API's 422 for a minute count beyond 64 bits), and a serial
launcher then never went idle: it ran until it was killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "6000000"])
def test_a_wall_time_that_is_not_finite_or_beyond_ten_years_is_refused_in_one_line(value: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "log").mkdir(parents=True)
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text("launcher:\n  idle_ttl_sec: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "BALSAM_SITE_PATH"}
    result = subprocess.run([sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", value], cwd=str(site), env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.startswith("Error: wall time must be positive and finite") and result.stderr.count("\n") == 1, result.stderr
    assert f"-t {float(value)}" in result.stderr and "ten years" in result.stderr, result.stderr
    assert not list((site / "log").iterdir())  # refused before any log (or session) was opened
