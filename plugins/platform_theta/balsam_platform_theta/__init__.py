"""Theta (ALCF, retired): the KNL Cray XC40 partition (aprun) and ThetaGPU (DGX A100 nodes, MIG)."""

from .platform import ThetaGPUOptions, ThetaGPUPlatform, ThetaKNLOptions, ThetaKNLPlatform, expand_nid_ranges

__all__ = ["ThetaGPUOptions", "ThetaGPUPlatform", "ThetaKNLOptions", "ThetaKNLPlatform", "expand_nid_ranges"]
