"""Built-in plugin ``sharpness``: top-k Hessian eigenvalues against the edge-of-stability threshold.

Tags:

- ``sharpness/lambda_max`` and ``sharpness/lambda_<i>``, i = 1..k: top eigenvalues of the Hessian of
  the loss on the probe data (algebraically largest, Lanczos);
- ``sharpness/threshold``: the stability threshold of the optimizer at this step (2/η for SGD,
  (2+2μ)/η with heavy-ball momentum, (2+2μ)/(η(1+2μ)) Nesterov, (2+2β1)/((1−β1)η) for Adam on the
  preconditioned sharpness; MATH.md §1.1–1.2);
- ``sharpness/eos_ratio``: sharpness / threshold (≈ 1 at the edge of stability); the sharpness is
  ``preconditioned_lambda_max`` when the optimizer preconditions (Adam, or parameter groups with
  different learning rates), else ``lambda_max``;
- ``sharpness/preconditioned_lambda_max``: λ_max(P⁻¹H) for Adam/AdamW (P from the optimizer state)
  or for per-group learning rates (P⁻¹ = diag(η_g/η));
- ``sharpness/lanczos_matvecs`` and ``sharpness/lanczos_residual`` (largest relative Ritz residual).

An optimizer with no known threshold gets the eigenvalues and one warning, never a guessed threshold.
"""

from __future__ import annotations

import warnings

import sgdprobe


class Sharpness:
    """Top-``k`` Hessian eigenvalues and the edge-of-stability ratio."""

    name = "sharpness"

    def __init__(self, k: int = 1):
        if not isinstance(k, int) or k < 1:
            raise sgdprobe.ConfigError(f"sharpness: k must be a positive integer, got {k!r}")
        self.k = k
        self.preconditioned = False

    @sgdprobe.hookimpl
    def sgdprobe_configure(self, config: sgdprobe.ProbeConfig) -> None:
        config.request_eigenpairs(self.k)
        info = sgdprobe.describe_optimizer(config.optimizer, config.lr)
        self.preconditioned = info.preconditioned
        if self.preconditioned:
            config.request_eigenpairs(1, preconditioned=True)
        if sgdprobe.stability_threshold(info) is None:
            warnings.warn(
                f"sgdprobe: no stability threshold is known for {info.name}; sharpness/lambda_max is logged "
                "without sharpness/threshold and sharpness/eos_ratio (known: SGD with or without momentum "
                "and Nesterov, Adam, AdamW).",
                sgdprobe.ProbeWarning,
                stacklevel=2,
            )

    @sgdprobe.hookimpl
    def sgdprobe_layout(self):
        quantity = "sharpness/preconditioned_lambda_max" if self.preconditioned else "sharpness/lambda_max"
        return {
            "sharpness vs. stability threshold": [quantity, "sharpness/threshold"],
            "edge-of-stability ratio": ["sharpness/eos_ratio"],
        }

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        eig = snapshot.hessian_eigenpairs(self.k)
        values = eig.eigenvalues.tolist()
        scale = max(abs(values[0]), 1e-30)
        out = {"sharpness/lambda_max": values[0]}
        out.update({f"sharpness/lambda_{i + 1}": v for i, v in enumerate(values)})
        out["sharpness/lanczos_matvecs"] = eig.n_matvecs
        out["sharpness/lanczos_residual"] = float(eig.residuals.max()) / scale
        sharp = values[0]
        if self.preconditioned:
            pre = snapshot.hessian_eigenpairs(1, preconditioned=True)
            sharp = float(pre.eigenvalues[0])
            out["sharpness/preconditioned_lambda_max"] = sharp
        threshold = snapshot.stability_threshold()
        if threshold is not None:
            out["sharpness/threshold"] = threshold
            out["sharpness/eos_ratio"] = sharp / threshold
        return out
