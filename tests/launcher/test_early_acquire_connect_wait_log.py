"""A launcher that waits for its server at start-up says so in its log file, not on stderr alone.

The Session is opened in the background as the launcher starts (EarlyLease), before its log file is
opened: the client's first retry warning (the connect wait's start: "retrying for up to 1 s before
giving up ($BALSAM_CLIENT_CONNECT_WAIT_SEC...)") went to stderr only, and the later retries
nowhere. Now the start-up's records are held and replayed into the log file once it opens; the
warning still reaches stderr at once, and once. So does the CLI's notice of the variable ("server
outages longer than 1 s end this launcher"), logged before the launcher starts.

Real ``python -m balsam.launcher`` process against a port nobody listens on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher_helpers import closed_port, offline_site


def test_the_connect_wait_at_start_up_is_in_the_launcher_log_file(tmp_path: Path) -> None:
    site, env = offline_site(tmp_path, f"http://127.0.0.1:{closed_port()}")
    # A BatchJob id in the environment: the Session is opened early, before the log file.
    env.update({"BALSAM_BATCH_JOB_ID": "5", "BALSAM_CLIENT_CONNECT_WAIT_SEC": "1"})
    proc = subprocess.run([sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "1", "--site", str(site)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "retrying for up to 1 s" in ln]
    assert len(said) == 1, proc.stderr  # at once on stderr (as before it was held), and once
    logs = sorted((site / "log").glob("mpi_mode_*.log"))
    assert logs, f"no launcher log file:\n{proc.stderr}"
    text = "".join(p.read_text() for p in logs)
    assert "retrying for up to 1 s before giving up ($BALSAM_CLIENT_CONNECT_WAIT_SEC" in text, text
    # The CLI's notice of the variable, logged before the launcher starts: on stderr once, and in
    # the log file (it was on stderr alone).
    notice = "$BALSAM_CLIENT_CONNECT_WAIT_SEC=1: server outages longer than 1 s end this launcher"
    assert sum(notice in ln for ln in proc.stderr.splitlines()) == 1, proc.stderr
    assert notice in text, text
