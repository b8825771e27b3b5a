"""Lanczos against dense eigendecompositions (MATH.md §6 oracle: spectrum {50,30,20,10,5} ∪ U(-1,1))."""

import numpy as np
import pytest
import torch

from sgdprobe.linalg import lanczos


def rotated(spectrum: np.ndarray, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(spectrum), len(spectrum))))
    return torch.tensor(Q @ np.diag(spectrum) @ Q.T)


@pytest.fixture(scope="module")
def oracle_matrix():
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[50, 30, 20, 10, 5], rng.uniform(-1, 1, 395)])
    return rotated(spectrum)


def explicit_residuals(A, result):
    Y = result.eigenvectors
    return (A @ Y - Y * result.eigenvalues.to(Y)).norm(dim=0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_matches_dense(oracle_matrix, k):
    A = oracle_matrix
    result = lanczos(lambda v: A @ v, A.shape[0], k, tol=1e-10, max_iter=200, dtype=torch.float64)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues.numpy(), [50, 30, 20, 10, 5][:k], rtol=1e-10)
    w, V = torch.linalg.eigh(A)
    cos = (V[:, -k:].flip(1) * result.eigenvectors).sum(0).abs()
    assert (cos > 1 - 1e-10).all()


def test_residuals_are_the_true_residuals(oracle_matrix):
    A = oracle_matrix
    result = lanczos(lambda v: A @ v, A.shape[0], 5, tol=1e-14, max_iter=10, dtype=torch.float64)
    assert not result.converged  # 10 iterations are not enough for the 5th pair (oracle: resid 4.6e-3)
    assert result.n_matvecs == 10
    np.testing.assert_allclose(result.residuals.numpy(), explicit_residuals(A, result).numpy(), atol=1e-12)
    assert result.residuals[4] > 1e-4


def test_warm_start_from_an_exact_eigenvector_still_finds_the_others(oracle_matrix):
    A = oracle_matrix
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    result = lanczos(lambda v: A @ v, A.shape[0], 3, tol=1e-10, max_iter=200, v0=top, dtype=torch.float64)
    np.testing.assert_allclose(result.eigenvalues.numpy(), [50, 30, 20], rtol=1e-10)


def test_repeated_top_eigenvalue_found_after_breakdown():
    A = rotated(np.array([4.0, 4.0, 1.0, 0.5, 0.25, 0.0]), seed=1)
    result = lanczos(lambda v: A @ v, 6, 2, tol=1e-10, max_iter=6, dtype=torch.float64)
    np.testing.assert_allclose(result.eigenvalues.numpy(), [4.0, 4.0], rtol=1e-10)


def test_algebraically_largest_not_largest_magnitude():
    A = rotated(np.array([-10.0, 3.0, 2.0, 1.0]))
    result = lanczos(lambda v: A @ v, 4, 1, tol=1e-12, dtype=torch.float64)
    assert result.eigenvalues[0].item() == pytest.approx(3.0, rel=1e-10)


def test_bad_k():
    with pytest.raises(ValueError):
        lanczos(lambda v: v, 3, 4)


def test_stopping_and_reported_convergence_use_the_same_scale():
    """tol is relative to the largest |Ritz value| (≈ ||A||): with a very negative eigenvalue far
    below a small top one, a run that stops on the tolerance must report converged=True, and its
    top residual must be within tol·||A||."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.tensor([-1000.0, 1.0]), torch.rand(198, generator=g, dtype=torch.float64) * 0.9])
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(w.double()) @ Q.T
    res = lanczos(lambda v: A @ v, 200, 1, tol=1e-3, max_iter=200, dtype=torch.float64)
    assert res.n_matvecs < 200  # it stopped on the tolerance ...
    assert res.converged  # ... and says so
    assert float(res.residuals[0]) <= 1e-3 * 1000 * 1.01


def test_long_run_has_no_ghost_copies(oracle_matrix):
    """A long run (40 pairs, 35 of them inside the uniform cluster, so the basis grows over several
    blocks): without working-precision re-orthogonalization, converged eigenvalues reappear as
    spurious copies ("ghosts") and push true ones out of the top-k."""
    A = oracle_matrix
    result = lanczos(lambda v: A @ v, A.shape[0], 40, tol=1e-10, max_iter=A.shape[0], dtype=torch.float64)
    assert result.n_matvecs > 150
    exact = torch.linalg.eigvalsh(A).flip(0)[:40]
    np.testing.assert_allclose(result.eigenvalues.numpy(), exact.numpy(), atol=1e-8)
    Y = result.eigenvectors
    torch.testing.assert_close(Y.T @ Y, torch.eye(40, dtype=torch.float64), atol=1e-8, rtol=0)


def test_gram_schmidt_takes_a_second_pass_when_the_first_cancels():
    """A vector almost inside the basis' span loses most of its norm in the first pass; one pass leaves
    it orthogonal only to ε·(norm before / norm after) ≈ 1e-7 here, the second pass to ε."""
    from sgdprobe.linalg.lanczos import _Basis

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(500, 20, generator=g, dtype=torch.float64))
    basis = _Basis(500, 20, first_block=8, device="cpu", dtype=torch.float64)  # three blocks
    for column in Q.T:
        basis.append(column)
    noise = torch.randn(500, generator=g, dtype=torch.float64)
    w = Q @ torch.randn(20, generator=g, dtype=torch.float64) + 1e-9 * noise
    basis.orthogonalize(w)
    assert float((Q.T @ w).abs().max() / w.norm()) < 1e-13


@pytest.mark.parametrize(
    "matvec, top",
    [
        (lambda v: v, 1.0),  # returns its input
        (lambda v: torch.stack([3 * v, v], 1)[:, 0], 3.0),  # a strided view
        (lambda v: v.sum().expand(v.shape[0]), 30.0),  # 1 1ᵀ as a broadcast (stride-0) tensor
    ],
)
def test_operators_returning_views_or_strided_results(matvec, top):
    """The engine updates each product in place: an operator that returns its input, a strided view or
    a broadcast tensor must give the answer of a fresh contiguous product."""
    result = lanczos(matvec, 30, 1, tol=1e-10, max_iter=30, dtype=torch.float64)
    assert result.eigenvalues[0].item() == pytest.approx(top, rel=1e-10)


def test_operator_returning_inference_tensors_or_graphs():
    """Products made under ``torch.inference_mode`` (not writable outside it) or carrying a graph are
    taken as values; the eigenvectors come back as a detached, row-major (dim, k) tensor."""
    A = rotated(np.array([3.0, 2.0, 1.0, 0.5, 0.1]))

    def under_inference(v):
        with torch.inference_mode():
            return A @ v

    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    for matvec in (under_inference, lambda v: weight * (A @ v)):
        result = lanczos(matvec, 5, 2, tol=1e-12, max_iter=5, dtype=torch.float64)
        np.testing.assert_allclose(result.eigenvalues.numpy(), [3.0, 2.0], rtol=1e-10)
        assert not result.eigenvectors.requires_grad and result.eigenvectors.is_contiguous()
        assert result.eigenvectors.view(-1).shape == (10,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_breakdown_is_recognized(seed):
    """A spectrum {5, 5, 5, 3, 3, 0, …}: the Krylov space of one start vector holds one copy of each
    eigenvalue. In float32 β after it is rounding (~1e-6·||A||), never ≤ 1e-10·||A||: unrecognized, the
    run stopped with [5, 5, 3, 3, 0] marked converged."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    eigenvalues = torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0]), torch.zeros(395)]).double()
    A = ((Q * eigenvalues) @ Q.T).float()
    result = lanczos(lambda v: A @ v, 400, 5, tol=1e-4, max_iter=60, dtype=torch.float32, seed=seed)
    np.testing.assert_allclose(result.eigenvalues.numpy(), [5, 5, 5, 3, 3], rtol=1e-4)


def test_non_finite_products_raise_a_measurement_error():
    """A NaN or overflowing product is a failed measurement (reported and skipped by the probe), not a
    LAPACK error from the tridiagonal solver."""
    from sgdprobe import MeasurementError

    with pytest.raises(MeasurementError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 10, 1, dtype=torch.float64)
