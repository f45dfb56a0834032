"""Polaris (ALCF): 32-core AMD EPYC nodes with four NVIDIA A100 GPUs, PBS, PALS mpiexec."""

from .platform import PolarisOptions, PolarisPlatform

__all__ = ["PolarisOptions", "PolarisPlatform"]
