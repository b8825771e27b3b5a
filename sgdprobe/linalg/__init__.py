"""Curvature linear algebra on flat parameter vectors: HVPs, Lanczos."""

from sgdprobe.linalg.hvp import HVP_METHODS, HessianVectorProduct, flatten, unflatten
from sgdprobe.linalg.lanczos import Eigenpairs, lanczos

__all__ = ["HVP_METHODS", "Eigenpairs", "HessianVectorProduct", "flatten", "lanczos", "unflatten"]
