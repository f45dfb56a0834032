"""PBS Pro / OpenPBS scheduler driver for balsam (entry point ``balsam.schedulers: pbs``)."""

from .scheduler import PBS_STATES, PBSOptions, PBSScheduler

__all__ = ["PBS_STATES", "PBSOptions", "PBSScheduler"]
