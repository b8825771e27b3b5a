"""Built-in plugin ``gradient_covariance``: conditioning of the gradient covariance and the break-even
condition of Jastrzebski et al. (arXiv 2002.09572; MATH.md §4).

    K_g = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ

over the n probe examples (g_i = ∇ℓ_i, ℓ_i = ``loss_fn`` on example i alone; ḡ their mean), computed
through the n×n Gram matrix, never P×P: K_g has the non-zero spectrum of (1/n) C Gram C, C = I − 11ᵀ/n.

Tags:

- ``grad_cov/lambda_max``: λ_K^1, the largest eigenvalue of K_g;
- ``grad_cov/lambda_min_nonzero`` and ``grad_cov/conditioning``: λ_K^*, the smallest non-zero eigenvalue,
  and λ_K^*/λ_K^1. Rank rule (MATH.md §4): K_g has rank ≤ n − 1 (L − 1 for the mini-batch estimator)
  and ≤ P; an eigenvalue counts as non-zero when it exceeds ``rank_rtol``·λ_K^1, default
  m·ε₆₄ + 100·ε² (m the size of the Gram matrix, ε₆₄ float64's machine epsilon for the eigensolver,
  ε the measurement dtype's for the gradients: the Gram matrix is accumulated in float64, so an
  eigenvalue λ carries a relative error ≈ 2ε·√(λ_K^1/λ), ≈ 20 % at the default cut in float32 and
  below 1 % from ratios 1e-9 up; measure with ``dtype=torch.float64`` to resolve smaller ones); λ_K^*
  is the rank-th largest;
- ``grad_cov/rank``: that rank; ``grad_cov/trace``: tr K_g = (1/n) Σ_i ||g_i − ḡ||²;
- ``grad_cov/break_even_lhs``: (1 − ηλ_1)² + s²η²(N − S)/(S(N − 1)), Wu et al.'s stability condition
  of plain SGD along the top Hessian eigenvector v_1 (shared Lanczos run), s² = Var_i[v_1ᵀ H_i v_1] the
  variance over probe examples (1/n) of the per-example curvature, S the training batch size, N the
  dataset size, η the learning rate at this step. ≤ 1: stable along v_1; the break-even point is where
  it first reaches 1. ``grad_cov/curvature_variance``: s².

Estimators (``estimator=``):

- ``"per_example"`` (default): exact K_g on the probe data from per-example gradients (the Gram matrix is
  formed from stored gradients, or block by block under the engine's memory limit);
- ``"minibatch"`` (the paper's App. C): L = ``num_batches`` gradients g̃_l of disjoint random mini-batches
  of M = ``minibatch_size`` probe examples (default: the training batch size, at most n/L), one backward
  each, so it works where per-example gradients do not (BatchNorm in train mode). The eigenvalues of
  (1/L) Σ_l (g̃_l − ḡ)(g̃_l − ḡ)ᵀ are multiplied by (n − 1)LM / (n(L − 1)), which makes the estimate of
  K_g unbiased for disjoint batches (it equals the paper's M(N − 1)/(N − M) when LM = n) [D]; its rank
  is at most L − 1, so its conditioning is that of an L-sample estimate.
"""

from __future__ import annotations

import torch

import sgdprobe

_ESTIMATORS = ("per_example", "minibatch")


class GradientCovariance:
    """Spectrum of the per-example gradient covariance K_g and the break-even condition."""

    name = "gradient_covariance"

    def __init__(
        self,
        estimator: str = "per_example",
        num_batches: int = 25,
        minibatch_size: int | None = None,
        break_even: bool | None = None,
        rank_rtol: float | None = None,
        chunk_size: int | None = None,
        max_memory: int | None = None,
    ):
        """:param estimator: ``"per_example"`` or ``"minibatch"`` (see the module docstring).
        :param num_batches: L, mini-batch gradients of the mini-batch estimator.
        :param minibatch_size: M of the mini-batch estimator (default: training batch size, ≤ n/L).
        :param break_even: log the break-even condition (default: whenever per-example Hessians exist).
        :param rank_rtol: relative threshold of the rank rule (default m·ε₆₄ + 100·ε²).
        :param chunk_size: at most this many examples per chunk of the per-example engine.
        :param max_memory: about this many bytes of per-example work per chunk."""
        if estimator not in _ESTIMATORS:
            raise sgdprobe.ConfigError(
                f"gradient_covariance: estimator must be one of {_ESTIMATORS}, got {estimator!r}"
            )
        if not isinstance(num_batches, int) or num_batches < 2:
            raise sgdprobe.ConfigError(
                f"gradient_covariance: num_batches must be an integer >= 2, got {num_batches!r}"
            )
        if minibatch_size is not None and (not isinstance(minibatch_size, int) or minibatch_size < 1):
            raise sgdprobe.ConfigError(
                f"gradient_covariance: minibatch_size must be a positive integer, got {minibatch_size!r}"
            )
        if rank_rtol is not None and not (0 < rank_rtol < 1):
            raise sgdprobe.ConfigError(f"gradient_covariance: rank_rtol must be in (0, 1), got {rank_rtol!r}")
        self.estimator = estimator
        self.num_batches = num_batches
        self.minibatch_size = minibatch_size
        self.break_even = break_even
        self.rank_rtol = rank_rtol
        self.chunk_size = chunk_size
        self.max_memory = max_memory

    @sgdprobe.hookimpl
    def sgdprobe_configure(self, config: sgdprobe.ProbeConfig) -> None:
        mixed = config.examples_mixed_by
        if self.estimator == "per_example" or self.break_even:
            sgdprobe.require_per_example(
                config,
                self.name,
                "per-example gradients" if self.estimator == "per_example" else "the break-even condition",
                "use the mini-batch estimator: "
                "plugins={'gradient_covariance': {'estimator': 'minibatch', 'break_even': False}}",
            )
        if self.break_even is None:
            self.break_even = not mixed
        n = config.num_examples
        if self.estimator == "minibatch":
            need = self.num_batches * (self.minibatch_size or 1)
            if n < need:
                raise sgdprobe.ConfigError(
                    f"gradient_covariance: {self.num_batches} disjoint mini-batches of "
                    f"{self.minibatch_size or 1} need {need} probe examples, the probe data has {n}. Pass "
                    "more probe data (num_batches= of attach) or lower num_batches / minibatch_size."
                )
        if self.break_even:
            sgdprobe.require_sizes(
                config, self.name, batch_size=config.optimizer is None and config.batch_size is None
            )
            config.request_eigenpairs(1)
        config.limit_per_example_memory(self.chunk_size, self.max_memory)

    @sgdprobe.hookimpl
    def sgdprobe_layout(self):
        charts = {
            "gradient covariance": ["grad_cov/lambda_max", "grad_cov/trace"],
            "gradient covariance conditioning": ["grad_cov/conditioning"],
        }
        if self.break_even:
            charts["break-even condition (<= 1 stable)"] = ["grad_cov/break_even_lhs"]
        return charts

    def _spectrum(self, snapshot: sgdprobe.Snapshot) -> tuple[torch.Tensor, int]:
        """Eigenvalues of K_g (descending, float64) from the centred Gram matrix, and the largest rank."""
        if self.estimator == "per_example":
            gram = snapshot.per_example_gram().to(torch.float64)
            n = gram.shape[0]
            C = torch.eye(n, dtype=torch.float64, device=gram.device) - 1.0 / n
            eig = torch.linalg.eigvalsh(C @ gram @ C / n).flip(0)
            return eig, min(n - 1, snapshot.num_params)
        n, L = snapshot.num_examples, self.num_batches
        M = self.minibatch_size or min(snapshot.batch_size or n, n // L)
        rows = snapshot.minibatch_gradients(M, L).to(torch.float64)
        A = rows - rows.mean(0)
        scale = (n - 1) * L * M / (n * (L - 1))
        eig = torch.linalg.eigvalsh(A @ A.T / L).flip(0) * scale
        return eig, min(L - 1, snapshot.num_params)

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        eig, max_rank = self._spectrum(snapshot)
        top = float(eig[0])
        rtol = self.rank_rtol
        if rtol is None:
            rtol = eig.numel() * torch.finfo(torch.float64).eps + 100 * torch.finfo(snapshot.dtype).eps ** 2
        rank = min(int((eig > rtol * top).sum()), max_rank) if top > 0 else 0
        out = {"grad_cov/lambda_max": top, "grad_cov/trace": float(eig.sum()), "grad_cov/rank": rank}
        if rank > 0:
            out["grad_cov/lambda_min_nonzero"] = float(eig[rank - 1])
            out["grad_cov/conditioning"] = float(eig[rank - 1]) / top
        if self.break_even:
            out.update(self._break_even(snapshot))
        return out

    def _break_even(self, snapshot: sgdprobe.Snapshot) -> dict[str, float]:
        S, N = snapshot.batch_size, snapshot.dataset_size
        if S is None or N is None:
            raise sgdprobe.MeasurementError(
                "the break-even condition needs the training batch size and dataset size: pass "
                "batch_size=... and dataset_size=... to attach() or measure()."
            )
        pair = snapshot.hessian_eigenpairs(1)
        lam, v = float(pair.eigenvalues[0]), pair.eigenvectors[:, 0]
        curv = snapshot.per_example_quadratic_forms(v)[:, 0, 0].to(torch.float64)
        s2 = float(curv.var(unbiased=False))
        p = (N - S) / (S * (N - 1)) if N > 1 else 0.0
        eta = snapshot.lr
        return {
            "grad_cov/break_even_lhs": (1 - eta * lam) ** 2 + s2 * eta**2 * p,
            "grad_cov/curvature_variance": s2,
        }
