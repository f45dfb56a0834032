"""`bash scripts/demo.sh --site-path DIR` from another directory: a relative DIR is the caller's.

demo.sh went to the repository before running `balsam demo`, so `--site-path my-site` made the site
inside the repository checkout (and left it among the untracked files), not where the user stood.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_balsam_demo_runs_in_the_callers_directory(tmp_path):
    # A copy of the repository's demo.sh with a bootstrap that installs nothing and a `balsam` that
    # says where it runs and with which arguments.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "demo.sh", repo / "scripts" / "demo.sh")
    (repo / "scripts" / "bootstrap.sh").write_text("exit 0\n")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "balsam"
    fake.write_text('#!/bin/sh\necho "cwd=$(pwd) args=$*"\n')
    fake.chmod(0o755)
    caller = tmp_path / "work"
    caller.mkdir()

    proc = subprocess.run(["bash", str(repo / "scripts" / "demo.sh"), "--site-path", "my-site"], cwd=caller,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PWD": str(caller)})

    assert proc.returncode == 0, proc.stderr
    assert f"cwd={caller} args=demo --site-path my-site" in proc.stdout, proc.stdout
