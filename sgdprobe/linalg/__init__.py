"""Curvature linear algebra on flat parameter vectors: HVPs, Lanczos, per-example quantities."""

from sgdprobe.linalg import per_example
from sgdprobe.linalg.hvp import HVP_METHODS, HessianVectorProduct, flatten, unflatten
from sgdprobe.linalg.lanczos import Eigenpairs, lanczos
from sgdprobe.linalg.per_example import per_example_quadratic_forms

__all__ = [
    "HVP_METHODS",
    "Eigenpairs",
    "HessianVectorProduct",
    "flatten",
    "lanczos",
    "per_example",
    "per_example_quadratic_forms",
    "unflatten",
]
