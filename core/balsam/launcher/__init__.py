"""Launchers (pilot jobs): run a site's runnable jobs inside a batch allocation.

``python -m balsam.launcher -j mpi|serial -t WALL_MIN [--tag K=V] [--part MODE:NODES[:K=V]]``
(the job template's ``launcher_cmd``), or ``balsam launcher ...``. Job modes are plugins
(:class:`balsam.launcher.job_mode.JobMode`, entry-point group ``balsam.job_modes``).
"""

from .job_mode import JobMode, LauncherContext

__all__ = ["JobMode", "LauncherContext"]
