"""Cobalt scheduler driver for balsam (entry point ``balsam.schedulers: cobalt``)."""

from .scheduler import COBALT_STATES, CobaltScheduler

__all__ = ["COBALT_STATES", "CobaltScheduler"]
