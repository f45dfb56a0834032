"""Perlmutter (NERSC): GPU nodes (64 cores, 4 A100) and CPU nodes (128 cores); Slurm; srun."""

from .platform import PerlmutterCPUPlatform, PerlmutterGPUPlatform, PerlmutterOptions

__all__ = ["PerlmutterCPUPlatform", "PerlmutterGPUPlatform", "PerlmutterOptions"]
