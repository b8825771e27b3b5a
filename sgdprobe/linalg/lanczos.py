"""Top-k eigenpairs of a symmetric operator by Lanczos with full re-orthogonalization (MATH.md §6).

The Krylov basis stays on the operator's device; only the small tridiagonal matrix goes to the CPU.
Convergence is judged on Ritz residuals ||A y − θ y|| = β_m |s_{m,k}|, never on an iteration count:
a run that hits ``max_iter`` is returned with ``converged=False`` and its residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from sgdprobe.errors import MeasurementError


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

    :param matvec: v ↦ A v on flat vectors of length ``dim``. Its result is updated in place, so it
        must not be a tensor the operator keeps (returning ``v`` itself or a view is handled).
    :param tol: stop when every wanted Ritz residual is ≤ ``tol``·|θ_1| (θ_1 the largest-magnitude
        Ritz value, an estimate of ||A||).
    :param max_iter: at most this many matvecs (capped at ``dim``).
    :param v0: start vector (e.g. the previous measurement's top eigenvector); random if ``None``.
    :param seed: seeds a private generator for random start/restart vectors (no global RNG is used).

    Each step applies the three-term recurrence and then re-orthogonalizes against the whole basis by
    classical Gram–Schmidt, with a second pass only when the first removed more than 1/√2 of the norm
    (the Daniel–Gragg–Kaufman–Stewart test: "twice is enough"), which keeps the basis orthogonal to
    working precision at one pass over the basis per step in the usual case. A breakdown (invariant
    subspace found) restarts with a random vector orthogonal to the basis, so multiplicities beyond the
    first copy can still be found (a breakdown is β ≤ max(1e-10, 100 ε)·|θ_1|, ε of ``dtype``: in float32
    on large operators rounding can exceed that, and an exactly repeated eigenvalue's hidden copies can
    then be missed; float64 resolves them). The basis grows in blocks that are never copied, and the vector
    updates are in place: on a CPU, fresh multi-GB buffers cost more in page faults than the arithmetic.
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

    basis = _Basis(dim, max_iter, first_block=2 * k + 16, device=device, dtype=dtype)
    # β at the level of the products' rounding means the Krylov space is (numerically) invariant;
    # 1e-10 alone would never be reached in float32, and a hidden copy of an eigenvalue would be missed.
    breakdown_tol = max(1e-10, 100 * torch.finfo(dtype).eps)
    alphas: list[float] = []
    betas: list[float] = []
    v = random_vector() if v0 is None else v0.detach().reshape(-1).to(device=device, dtype=dtype).clone()
    v = basis.append(v / v.norm())
    result = None
    for j in range(max_iter):
        w = matvec(v).detach().reshape(-1).to(dtype)
        # The updates below are in place: copy a product that aliases v, is a strided or broadcast
        # view, or is an inference tensor (not writable outside inference mode).
        inference = w.is_inference() and not torch.is_inference_mode_enabled()
        if inference or w.data_ptr() == v.data_ptr() or not w.is_contiguous():
            w = w.clone(memory_format=torch.contiguous_format)
        alpha = torch.dot(w, v)
        w.addcmul_(v, alpha.neg())  # in place: no fresh dim-sized buffer
        if j > 0 and betas[-1] != 0.0:
            w.sub_(basis.row(j - 1), alpha=betas[-1])
        beta_val = basis.orthogonalize(w)
        alphas.append(float(alpha))
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta_val)):
            raise MeasurementError(
                f"the operator returned non-finite values at Lanczos step {j + 1} (an overflowing or NaN "
                "Hessian-vector product: check the loss and the parameters at this step)"
            )
        # The tridiagonal matrix is tiny (m × m, m ≤ max_iter): LAPACK on numpy arrays, no torch ops.
        theta, S = scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))
        order = np.argsort(theta)[::-1][:k]
        residuals = beta_val * np.abs(S[-1, order])
        scale = float(np.abs(theta).max()) or 1.0  # largest |Ritz value| of all: an estimate of ||A||
        result = (theta[order], S[:, order], residuals, j + 1, scale)
        breakdown = beta_val <= breakdown_tol * scale
        # After a breakdown the Krylov space is invariant: its Ritz pairs are exact, but a second copy
        # of an eigenvalue (or a part of the spectrum the start vector missed) would be invisible, so
        # the run restarts instead of stopping there.
        done = len(order) == k and bool((residuals <= tol * scale).all()) and not breakdown
        if done or j + 1 == max_iter:
            break
        if breakdown:  # restart orthogonally to the basis (the zero β decouples T's blocks)
            w = random_vector()
            basis.orthogonalize(w, always_twice=True)
            betas.append(0.0)
            v = basis.append(w / w.norm())
        else:
            betas.append(beta_val)
            v = basis.append(w.div_(beta_val))
    theta, S, residuals, m, scale = result
    theta, residuals = torch.from_numpy(theta.copy()), torch.from_numpy(residuals.copy())
    vectors = basis.combine(torch.from_numpy(S.copy()).to(device=device, dtype=dtype))
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    # The same scale as the stopping test above (all Ritz values, not only the k returned), so a run
    # that stopped because it met the tolerance is never reported as unconverged.
    converged = len(theta) == k and bool((residuals <= tol * scale).all())
    return Eigenpairs(theta, vectors, residuals, converged, m)


class _Basis:
    """The Lanczos vectors as rows of blocks that are allocated as needed and never copied."""

    def __init__(self, dim: int, capacity: int, first_block: int, device, dtype):
        self.dim, self.capacity, self.device, self.dtype = dim, capacity, device, dtype
        self.blocks: list[torch.Tensor] = []
        self.size = 0
        self._next_block = min(first_block, capacity)

    def append(self, vector: torch.Tensor) -> torch.Tensor:
        """Store ``vector`` as the next row; returns the stored row (a view)."""
        allocated = sum(b.shape[0] for b in self.blocks)
        if self.size == allocated:
            rows = min(self._next_block, self.capacity - allocated)
            self.blocks.append(torch.empty(rows, self.dim, device=self.device, dtype=self.dtype))
            self._next_block = allocated + rows  # the next block doubles the total
        row = self.row(self.size)
        row.copy_(vector)
        self.size += 1
        return row

    def row(self, i: int) -> torch.Tensor:
        for block in self.blocks:
            if i < block.shape[0]:
                return block[i]
            i -= block.shape[0]
        raise IndexError(i)

    def _filled(self) -> list[torch.Tensor]:
        out, left = [], self.size
        for block in self.blocks:
            if left <= 0:
                break
            out.append(block[: min(left, block.shape[0])])
            left -= block.shape[0]
        return out

    def orthogonalize(self, w: torch.Tensor, always_twice: bool = False) -> float:
        """w ← (I − V Vᵀ) w in place by classical Gram–Schmidt, with a second pass when the first
        removed more than 1/√2 of ‖w‖ (or always); returns ‖w‖ after."""
        filled = self._filled()
        norm = float(w.norm())
        for _ in range(2):
            before = norm
            coefficients = [block @ w for block in filled]
            for block, c in zip(filled, coefficients):
                w.addmv_(block.T, c, alpha=-1)
            norm = float(w.norm())
            if not always_twice and norm >= before / 2**0.5:
                break
            always_twice = False
        return norm

    def combine(self, S: torch.Tensor) -> torch.Tensor:
        """V S for the (size × k) matrix ``S``: the Ritz vectors as the columns of a (dim × k) tensor."""
        out, offset = None, 0
        for block in self._filled():
            n = block.shape[0]
            coefficients = S[offset : offset + n].T
            # (k × dim), reading each block row by row; one output buffer for all blocks
            out = coefficients @ block if out is None else out.addmm_(coefficients, block)
            offset += n
        return out.T.contiguous()  # (dim, k) row-major, as callers may ``view`` it
