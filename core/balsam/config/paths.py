"""Where balsam keeps per-user state."""

from __future__ import annotations

import os
from pathlib import Path


def balsam_home() -> Path:
    """``$BALSAM_HOME``, else ``~/.balsam`` (not created here)."""
    home = os.environ.get("BALSAM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".balsam"
