"""Aurora and Sunspot (ALCF): 104-core nodes with six Intel GPUs of two tiles each, PBS, PALS mpiexec."""

from .platform import AuroraOptions, AuroraPlatform, SunspotPlatform, affinity_mask, tile_ids

__all__ = ["AuroraOptions", "AuroraPlatform", "SunspotPlatform", "affinity_mask", "tile_ids"]
