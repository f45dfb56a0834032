"""Scheduler driver tests: make the shared helpers importable (tests/ has no packages)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
