"""Slurm scheduler driver for balsam (entry point ``balsam.schedulers: slurm``)."""

from .scheduler import SLURM_STATES, SlurmOptions, SlurmScheduler

__all__ = ["SLURM_STATES", "SlurmOptions", "SlurmScheduler"]
