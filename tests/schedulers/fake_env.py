"""Put a fake batch system (tests/fixtures/fake_pbs or fake_cobalt) on PATH for a test."""

from __future__ import annotations

import getpass
import os
import sys
import time
from pathlib import Path
from typing import Callable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: Hostnames that all reach this host (MPICH's hydra runs local hosts without ssh).
FAKE_NODES = "localhost,127.0.0.1"


def fake_batch_env(kind: str, state_dir: Path, **settings: str) -> dict[str, str]:
    env = {
        "PATH": f"{FIXTURES / kind}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_BATCH_DIR": str(state_dir),
        "FAKE_BATCH_NODES": FAKE_NODES,
        "FAKE_BATCH_QUEUES": "debug,prod",
        "FAKE_BATCH_KEEP_SEC": "30",
        "FAKE_BATCH_START_DELAY_SEC": "0.3",
        "USER": getpass.getuser(),
    }
    env.update(settings)
    return env


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
