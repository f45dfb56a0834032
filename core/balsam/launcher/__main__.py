"""``python -m balsam.launcher ...`` (the job template's launcher command)."""

import sys

from balsam.util import pause_gc_for_start_up

# The collector stays off while the launcher imports and reads its settings: it is turned back on
# (with the start-up's objects frozen) as the job mode starts (balsam.launcher.entry).
pause_gc_for_start_up()

# httpx imports its command-line tool (rich, pygments: 40-70 ms of a launcher's start-up) whenever
# those are installed, and falls back to a stub when that import fails. A launcher never runs it:
# a None entry in sys.modules makes the import fail as if they were missing (this process only).
sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]

from balsam.cli.launcher import launcher_command  # noqa: E402

if __name__ == "__main__":
    launcher_command(prog_name="python -m balsam.launcher")
