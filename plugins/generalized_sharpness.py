"""Built-in plugin ``generalized_sharpness``: SGD's exact mean-square stability threshold (Mulayoff &
Michaeli, COLT 2024; MATH.md §3, COLT equation numbers; math in :mod:`sgdprobe.linalg.mean_square`).

SGD with step η and batches of B drawn without replacement from N examples is mean-square stable at a
minimum iff η ≤ η* = 2 / λ_max(C†D) (Thm 3, eqs. 12–13), with C = ½ H ⊕ H, D = (1 − p) H⊗H +
(p/n) Σ H_i⊗H_i, p = (N − B)/(B(N − 1)); λ_max(C†D) is the *generalized sharpness* (= λ_max(H) at
B = N). The H_i are the Hessians of the user's ``loss_fn`` on each probe example alone, H their mean
(the loss must be mean-reduced); with the probe data a subset of the training set, these are sample
estimates of the training-set quantities. The theory holds at a minimum; elsewhere the numbers are those
of the dynamics linearized at the current parameters (see ``null_rtol`` in
:func:`~sgdprobe.linalg.mean_square.generalized_sharpness` for negative curvature).

Modes (``mode=``): ``"exact"`` forms the per-example Hessians (n·P² numbers) and computes the value
matrix-free; ``"bounds"`` needs only Vᵀ H_i V for the top-``rank`` Lanczos eigenvectors V (shared run)
and logs certified lower bounds on the generalized sharpness (upper bounds on η*: necessary conditions
for stability; certified at a regular minimum, H_i ⪰ 0, and otherwise up to the Lanczos residual of V,
whose columns must be eigenvectors of H for X = V A Vᵀ to lie in range(C)); ``"auto"`` (default) is
exact up to ``max_exact_params`` parameters (README: measured cost).

Tags (``<r>`` = ``rank``):

- exact mode: ``generalized_sharpness/value`` (λ_max(C†D)), ``/threshold_lr`` (η* = 2/value),
  ``/lr_ratio`` (η/η*: > 1 means mean-square unstable), ``/exact_residual`` (Lanczos residual relative
  to the value), and the bounds below (all of them, ``eq16`` included);
- bounds (both modes): ``/lower_bound_eq15`` (Prop. 3, along the top Hessian eigenvector),
  ``/lower_bound_eq16`` (exact mode only: needs every ‖H_i‖_F), ``/lower_bound_rank1`` (eq. 25, on the
  sphere), ``/lower_bound_rank<r>`` (PSD X of rank ≤ r, beyond the paper), each with its
  ``/threshold_lr_upper_bound_<name>`` = 2/bound;
- bounds mode only: ``/lower_bound`` (the best), ``/threshold_lr_upper_bound`` and
  ``/lr_ratio_lower_bound`` = η·best/2 (> 1 proves mean-square instability);
- always: ``/lr`` (η), ``/p``, ``/hessian_lambda_max`` (λ_max(H); 2/λ_max(H) is the GD threshold).
"""

from __future__ import annotations

import warnings

import torch

import sgdprobe
from sgdprobe.linalg import mean_square as ms

_MODES = ("auto", "exact", "bounds")


class GeneralizedSharpness:
    """Generalized sharpness λ_max(C†D) and the mean-square stability threshold η* of SGD."""

    name = "generalized_sharpness"

    def __init__(
        self,
        mode: str = "auto",
        max_exact_params: int = 200,
        rank: int = 4,
        exact_tol: float = 1e-10,
        optimize_steps: int = 50,
    ):
        """:param mode: ``"auto"``, ``"exact"`` or ``"bounds"`` (see the module docstring).
        :param max_exact_params: ``"auto"`` is exact up to this many parameters (README: timings).
        :param rank: r of the rank-r bound, and the number of Lanczos eigenvectors in bounds mode.
        :param exact_tol: Lanczos residual tolerance of the exact value, relative to it.
        :param optimize_steps: L-BFGS iterations of the rank-one and rank-r bounds (0: no optimisation;
            any iterate is a certified bound, so this trades time for tightness only)."""
        if mode not in _MODES:
            raise sgdprobe.ConfigError(f"generalized_sharpness: mode must be one of {_MODES}, got {mode!r}")
        for key, value in (("max_exact_params", max_exact_params), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise sgdprobe.ConfigError(
                    f"generalized_sharpness: {key} must be a positive integer, got {value!r}"
                )
        if not (0 < exact_tol < 1):
            raise sgdprobe.ConfigError(
                f"generalized_sharpness: exact_tol must be in (0, 1), got {exact_tol!r}"
            )
        if not isinstance(optimize_steps, int) or optimize_steps < 0:
            raise sgdprobe.ConfigError(
                f"generalized_sharpness: optimize_steps must be an integer >= 0, got {optimize_steps!r}"
            )
        self.mode = mode
        self.max_exact_params = max_exact_params
        self.rank = rank
        self.exact_tol = exact_tol
        self.optimize_steps = optimize_steps
        self.exact: bool | None = None

    @sgdprobe.hookimpl
    def sgdprobe_configure(self, config: sgdprobe.ProbeConfig) -> None:
        sgdprobe.require_per_example(
            config, self.name, "per-example Hessians", "replace BatchNorm by GroupNorm/LayerNorm"
        )
        sgdprobe.require_sizes(config, self.name, batch_size=False)  # B may come from the training loop
        params = dict(config.model.named_parameters())
        num_params = sum(params[n].numel() for n in config.param_names)
        self.exact = self.mode == "exact" or (self.mode == "auto" and num_params <= self.max_exact_params)
        if not self.exact:
            config.request_eigenpairs(self.rank)
        info = sgdprobe.describe_optimizer(config.optimizer, config.lr)
        plain = info.kind == "sgd" and info.momentum == 0 and info.weight_decay == 0 and info.uniform_lr
        if not plain:
            warnings.warn(
                f"sgdprobe: generalized_sharpness is the mean-square stability threshold of plain SGD "
                f"(no momentum, no weight decay, one learning rate); the optimizer is {info.name}"
                f"{' with momentum' if info.momentum else ''}"
                f"{' with weight decay' if info.weight_decay else ''}: its lr_ratio compares η with "
                "the SGD threshold only.",
                sgdprobe.ProbeWarning,
                stacklevel=2,
            )

    @sgdprobe.hookimpl
    def sgdprobe_layout(self):
        g = "generalized_sharpness/"
        bounds = [f"{g}threshold_lr_upper_bound_{b}" for b in ("eq15", "rank1", f"rank{self.rank}")]
        if self.exact is False:
            return {
                "SGD learning rate vs. mean-square threshold (upper bounds)": [
                    f"{g}lr",
                    f"{g}threshold_lr_upper_bound",
                    *bounds,
                ],
                "η / η* (lower bound; > 1: mean-square unstable)": [f"{g}lr_ratio_lower_bound"],
            }
        return {
            "SGD learning rate vs. mean-square threshold η*": [
                f"{g}lr",
                f"{g}threshold_lr",
                f"{g}threshold_lr_upper_bound_eq16",
                *bounds,
            ],
            "η / η* (> 1: mean-square unstable)": [f"{g}lr_ratio"],
        }

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        B, N = snapshot.batch_size, snapshot.dataset_size
        if B is None:
            raise sgdprobe.MeasurementError(
                "generalized_sharpness needs the training batch size: pass batch_size=... to attach() or "
                "measure()"
            )
        try:
            p = ms.mixing_weight(int(B), int(N))
        except ValueError as exc:
            raise sgdprobe.MeasurementError(
                f"generalized_sharpness: {exc}; check batch_size and dataset_size"
            ) from exc
        eta = snapshot.lr
        g = "generalized_sharpness/"
        out: dict[str, float] = {f"{g}lr": eta, f"{g}p": p}
        if self.exact:
            out.update(self._exact(snapshot, p))
        else:
            out.update(self._bounds(snapshot, p))
        for key in [k for k in out if k.startswith(f"{g}lower_bound_")]:
            out[f"{g}threshold_lr_upper_bound_{key[len(g) + len('lower_bound_'):]}"] = 2.0 / out[key]
        if self.exact:
            out[f"{g}threshold_lr"] = 2.0 / out[f"{g}value"]
            out[f"{g}lr_ratio"] = eta * out[f"{g}value"] / 2.0
        else:
            best = max(out[k] for k in out if k.startswith(f"{g}lower_bound_"))
            out[f"{g}lower_bound"] = best
            out[f"{g}threshold_lr_upper_bound"] = 2.0 / best
            out[f"{g}lr_ratio_lower_bound"] = eta * best / 2.0
        return out

    # ----------------------------------------------------------------- exact mode
    def _exact(self, snapshot: sgdprobe.Snapshot, p: float) -> dict[str, float]:
        hessians = snapshot.per_example_hessians()
        v = torch.randn(hessians.shape[1], generator=torch.Generator().manual_seed(0), dtype=hessians.dtype)
        _check_mean_hessian(hessians.mean(0) @ v.to(hessians.device), snapshot.hvp(v.to(hessians.device)))
        result = ms.generalized_sharpness(hessians, p, tol=self.exact_tol, seed=snapshot.seed % (2**31))
        if not result.converged:
            raise sgdprobe.MeasurementError(
                f"generalized_sharpness: Lanczos did not reach exact_tol={self.exact_tol} in "
                f"{result.n_matvecs} steps (relative residual {result.residual:.2e}); raise exact_tol"
            )
        g = "generalized_sharpness/"
        out = {
            f"{g}value": result.value,
            f"{g}exact_residual": result.residual,
            f"{g}hessian_lambda_max": float(result.hessian_eigenvalues[0]),
        }
        out.update(self._bounds_from_forms(hessians, p, full=True))
        return out

    # ----------------------------------------------------------------- bounds mode
    def _bounds(self, snapshot: sgdprobe.Snapshot, p: float) -> dict[str, float]:
        eig = snapshot.hessian_eigenpairs(self.rank)
        forms = snapshot.per_example_quadratic_forms(eig.eigenvectors)  # (n, r, r) = Vᵀ H_i V
        _check_mean_hessian(forms.mean(0).diagonal().double().cpu(), eig.eigenvalues.double())
        out = {"generalized_sharpness/hessian_lambda_max": float(eig.eigenvalues[0])}
        out.update(self._bounds_from_forms(forms, p, full=False))
        return out

    def _bounds_from_forms(self, forms: torch.Tensor, p: float, full: bool) -> dict[str, float]:
        """Bounds from Vᵀ H_i V: V = I (dense, ``full``) or the top Lanczos eigenvectors."""
        g = "generalized_sharpness/"
        rtol = 1e-10 if forms.dtype == torch.float64 else 1e-5  # float32 Hessians: rounding below 1e-5
        forms = forms.detach().to("cpu", torch.float64)
        lam, _, inner = ms.positive_part(forms, null_rtol=rtol)
        if lam.numel() == 0:
            raise sgdprobe.MeasurementError(
                "generalized_sharpness: the Hessian has no positive eigenvalue here, so no bound is defined"
            )
        out = {f"{g}lower_bound_eq15": ms.bound_eq15(inner[:, 0, 0], p)}
        if full:
            out[f"{g}lower_bound_eq16"] = ms.bound_eq16(inner, p)  # = eq. (16) of forms (same P_+)
        out[f"{g}lower_bound_rank1"] = ms.rank_one_bound(inner, p, steps=self.optimize_steps)[0]
        value, _ = ms.rank_r_bound(inner, p, min(self.rank, lam.numel()), steps=self.optimize_steps)
        out[f"{g}lower_bound_rank{self.rank}"] = value
        return out


def _check_mean_hessian(mean_hv: torch.Tensor, hv: torch.Tensor) -> None:
    """H = mean_i H_i holds only for a mean-reduced loss (L = (1/n) Σ ℓ_i): compare one product with H."""
    scale = float(hv.norm()) or 1.0
    if float((mean_hv - hv).norm()) > 1e-3 * scale:
        raise sgdprobe.MeasurementError(
            "generalized_sharpness: the Hessian of the probe loss is not the mean of the per-example "
            f"Hessians (relative mismatch {float((mean_hv - hv).norm()) / scale:.3g}); the theory needs "
            "L = (1/n) Σ ℓ_i. "
            "Use a mean-reduced loss_fn (reduction='mean') and no dropout in train mode."
        )
