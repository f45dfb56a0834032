"""``balsam launcher``: start a pilot-job launcher inside a batch allocation (the job template runs it)."""

from __future__ import annotations

import os
import sys

import click


@click.command("launcher")
@click.option("-j", "--job-mode", required=True, help="Job mode plugin: mpi or serial (or a third-party mode).")
@click.option("-t", "--wall-time-min", required=True, type=float, help="Minutes the launcher may run (allocation wall time).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only run jobs with this tag (repeatable).")
@click.option("-p", "--part", "parts", multiple=True, metavar="MODE:NODES[:KEY=VALUE]", help="A partition of the nodes (repeatable).")
@click.option("--site", "site_path", default=None, type=click.Path(file_okay=False), help="Site directory (default: $BALSAM_SITE_PATH or the cwd's site).")
@click.option("--partition-index", default=0, type=int, hidden=True)
def launcher_command(job_mode: str, wall_time_min: float, tags: tuple, parts: tuple, site_path: str, partition_index: int) -> None:
    """Run the site's runnable jobs on this allocation's nodes until wall time or idle timeout."""
    from balsam.launcher.entry import LauncherError, run_launcher

    try:
        code = run_launcher(job_mode, wall_time_min, tags, parts, site_path=site_path, partition_index=partition_index)
    except LauncherError as exc:
        if os.environ.get("BALSAM_CLI_TRACEBACK") == "1":
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


commands = [launcher_command]
