"""Balsam: HPC workflows through a REST service, site agents and pilot-job launchers."""

__version__ = "0.8.0"
