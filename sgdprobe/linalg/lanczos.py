"""Top-k eigenpairs of a symmetric operator by Lanczos with full re-orthogonalization (MATH.md §6).

The Krylov basis stays on the operator's device; only the small tridiagonal matrix goes to the CPU.
Convergence is judged on Ritz residuals ||A y − θ y|| = β_m |s_{m,k}|, never on an iteration count:
a run that hits ``max_iter`` is returned with ``converged=False`` and its residuals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Eigenpairs:
    """Top-k eigenpairs, largest (algebraic) first.

    ``eigenvalues`` and ``residuals`` are float64 CPU tensors of shape (k,); ``eigenvectors`` has shape
    (dim, k) on the operator's device, unit columns. Each eigenvalue lies within its residual of a
    true eigenvalue; with a gap g to the rest of the spectrum the error is at most residual²/g.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    n_matvecs: int

    def __len__(self) -> int:
        return int(self.eigenvalues.numel())

    def top(self, k: int) -> Eigenpairs:
        """The first ``k`` pairs."""
        return Eigenpairs(
            self.eigenvalues[:k], self.eigenvectors[:, :k], self.residuals[:k], self.converged, self.n_matvecs
        )


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    v0: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Eigenpairs:
    """Top-``k`` (algebraically largest) eigenpairs of the symmetric operator ``matvec``.

    :param matvec: v ↦ A v on flat vectors of length ``dim``.
    :param tol: stop when every wanted Ritz residual is ≤ ``tol``·|θ_1| (θ_1 the largest-magnitude
        Ritz value, an estimate of ||A||).
    :param max_iter: at most this many matvecs (capped at ``dim``).
    :param v0: start vector (e.g. the previous measurement's top eigenvector); random if ``None``.
    :param seed: seeds a private generator for random start/restart vectors (no global RNG is used).

    Full re-orthogonalization by two classical Gram–Schmidt passes keeps the basis orthogonal to
    working precision; a breakdown (invariant subspace found) restarts with a random vector orthogonal
    to the basis, so multiplicities beyond the first copy can still be found.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > dim:
        raise ValueError(f"asked for {k} eigenpairs of an operator of dimension {dim}")
    max_iter = min(max(max_iter, k + 1), dim)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def random_vector() -> torch.Tensor:
        return torch.randn(dim, generator=generator, device=device, dtype=dtype)

    basis = torch.empty(min(max_iter, 2 * k + 16), dim, device=device, dtype=dtype)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    v = random_vector() if v0 is None else v0.detach().reshape(-1).to(device=device, dtype=dtype).clone()
    v = v / v.norm()
    result = None
    for j in range(max_iter):
        if j == basis.shape[0]:
            grown = torch.empty(min(2 * j, max_iter), dim, device=device, dtype=dtype)
            grown[:j] = basis
            basis = grown
        basis[j] = v
        w = matvec(v).reshape(-1).to(dtype)
        alpha = torch.dot(w, v)
        alphas.append(alpha)
        active = basis[: j + 1]
        for _ in range(2):  # CGS2: "twice is enough"
            w = w - active.T @ (active @ w)
        beta = w.norm()
        T = _tridiagonal(alphas, betas)
        theta, S = torch.linalg.eigh(T)
        order = torch.argsort(theta, descending=True)[:k]
        beta_val = float(beta)
        residuals = beta_val * S[-1, order].abs()
        scale = float(theta.abs().max()) or 1.0  # largest |Ritz value| of all: an estimate of ||A||
        result = (theta[order], S[:, order], residuals, j + 1, scale)
        breakdown = beta_val <= 1e-10 * scale
        # After a breakdown the Krylov space is invariant: its Ritz pairs are exact, but a second copy
        # of an eigenvalue (or a part of the spectrum the start vector missed) would be invisible, so
        # the run restarts instead of stopping there.
        done = len(order) == k and bool((residuals <= tol * scale).all()) and not breakdown
        if done or j + 1 == max_iter:
            break
        if breakdown:  # restart orthogonally to the basis
            w = random_vector()
            for _ in range(2):
                w = w - active.T @ (active @ w)
            betas.append(torch.zeros((), dtype=torch.float64))
            v = w / w.norm()
        else:
            betas.append(beta.detach().to("cpu", torch.float64))
            v = w / beta
    theta, S, residuals, m, scale = result
    vectors = basis[:m].T @ S.to(device=device, dtype=dtype)
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    # The same scale as the stopping test above (all Ritz values, not only the k returned), so a run
    # that stopped because it met the tolerance is never reported as unconverged.
    converged = len(theta) == k and bool((residuals <= tol * scale).all())
    return Eigenpairs(theta.clone(), vectors, residuals.clone(), converged, m)


def _tridiagonal(alphas: list[torch.Tensor], betas: list[torch.Tensor]) -> torch.Tensor:
    a = torch.stack([x.detach().to("cpu", torch.float64) for x in alphas])
    T = torch.diag(a)
    if betas:
        b = torch.stack(betas[: len(alphas) - 1])
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return T
