"""Generalized sharpness and its bounds against explicit Kronecker products in float64 (MATH.md §3)."""

import itertools

import numpy as np
import pytest
import torch

from sgdprobe.linalg import mean_square as ms


def random_hessians(seed: int, n: int, d: int, rank: int | None = None, null: int = 0) -> torch.Tensor:
    """n random PSD d × d matrices; ``null`` > 0 makes H singular (a common null space)."""
    g = torch.Generator().manual_seed(seed)
    k = d if rank is None else rank
    A = torch.randn(n, d, k, generator=g, dtype=torch.float64)
    if null:
        A[:, d - null :, :] = 0.0
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        A = Q @ A
    return A @ A.transpose(1, 2)


def kron_pencil(Hs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C = ½ H ⊕ H and D = (1 − p) H⊗H + (p/n) Σ H_i⊗H_i formed explicitly (tests only)."""
    n, d, _ = Hs.shape
    H = Hs.mean(0)
    eye = torch.eye(d, dtype=torch.float64)
    C = 0.5 * (torch.kron(H, eye) + torch.kron(eye, H))
    D = (1 - p) * torch.kron(H, H) + p * sum(torch.kron(h, h) for h in Hs) / n
    return C, D


def brute_value(Hs: torch.Tensor, p: float) -> float:
    """λ_max(C†D) by a dense non-symmetric eigensolver on the Kronecker matrices."""
    C, D = kron_pencil(Hs, p)
    M = np.linalg.pinv(C.numpy(), rcond=1e-10, hermitian=True) @ D.numpy()
    return float(np.max(np.linalg.eigvals(M).real))


def rayleigh(Hs: torch.Tensor, p: float, X: torch.Tensor) -> float:
    C, D = kron_pencil(Hs, p)
    u = X.reshape(-1)
    return float(u @ D @ u / (u @ C @ u))


INSTANCES = [(seed, 2 + seed % 9, 3 + (7 * seed) % 18) for seed in range(8)]  # d in [2, 10], n in [3, 20]


@pytest.mark.parametrize("seed, d, n", INSTANCES)
@pytest.mark.parametrize("p", [1.0, 0.37, 0.05])
def test_exact_value_and_bounds_against_kronecker_products(seed, d, n, p):
    Hs = random_hessians(seed, n, d, rank=1 + seed % d)
    expected = brute_value(Hs, p)
    exact = ms.generalized_sharpness(Hs, p)
    assert exact.converged
    assert exact.value == pytest.approx(expected, rel=1e-8)

    # the eigenvector: symmetric PSD (Thm 6) and D vec X = value · C vec X
    X = exact.eigenvector
    assert torch.allclose(X, X.T, atol=1e-12)
    assert torch.linalg.eigvalsh(X).min() > -1e-8
    C, D = kron_pencil(Hs, p)
    u = X.reshape(-1)
    assert torch.allclose(D @ u, expected * (C @ u), atol=1e-8 * expected)

    H = Hs.mean(0)
    lam, V = torch.linalg.eigh(H)
    v = V[:, -1]
    q = torch.einsum("a,iab,b->i", v, Hs, v)
    b15 = ms.bound_eq15(q, p)
    b16 = ms.bound_eq16(Hs, p)
    b1, v1 = ms.rank_one_bound(Hs, p)
    # each bound is the Rayleigh quotient of the explicit pencil at its X (checks every constant)
    assert b15 == pytest.approx(rayleigh(Hs, p, torch.outer(v, v)), rel=1e-12)
    assert b16 == pytest.approx(rayleigh(Hs, p, torch.eye(d, dtype=torch.float64)), rel=1e-12)
    assert b1 == pytest.approx(rayleigh(Hs, p, torch.outer(v1, v1)), rel=1e-10)
    # ... and the paper's threshold forms of (15) and (16)
    assert 2 / b15 == pytest.approx(
        float(2 * lam[-1] / (lam[-1] ** 2 + p * ((q - lam[-1]) ** 2).mean())), rel=1e-10
    )
    fro = (Hs**2).sum((1, 2))
    assert 2 / b16 == pytest.approx(
        float(2 * H.trace() / ((1 - p) * (H**2).sum() + p * fro.mean())), rel=1e-10
    )

    ranks = [ms.rank_r_bound(Hs, p, r) for r in range(1, d + 1)]
    for value, Xr in ranks:
        assert value == pytest.approx(rayleigh(Hs, p, Xr), rel=1e-9)
    tol = 1 + 1e-10
    assert lam[-1] <= b15 * tol and b15 <= b1 * tol and b1 <= expected * tol
    assert b16 <= expected * tol
    assert all(value <= expected * tol for value, _ in ranks)
    assert ranks[0][0] >= b15 / tol
    assert ranks[-1][0] == pytest.approx(expected, rel=1e-8)  # rank d: the exact value


def test_rank_r_subspace_part_is_nondecreasing_in_r():
    Hs = random_hessians(3, 15, 9)
    lam, E = torch.linalg.eigh(Hs.mean(0))
    E = E.flip(1)
    values = [ms.generalized_sharpness(E[:, :r].T @ Hs @ E[:, :r], 0.5).value for r in range(1, 10)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(values, values[1:]))
    assert values[0] < values[-1] * 0.99  # it does tighten on this instance
    assert values[-1] == pytest.approx(brute_value(Hs, 0.5), rel=1e-8)


def test_oracle_numbers():
    """MATH.md §3.4 (mulayoff_oracle.py, d = 3, n = 5, H_i = x_i x_iᵀ)."""
    X = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 2], [1, -1, 1], [2, 0, -1]], dtype=torch.float64)
    Hs = torch.einsum("ia,ib->iab", X, X)
    gen = [4.423067, 2.498819, 1.914392, 1.665288, 1.536266]
    rank1 = [4.172187, 2.331779, 1.862284, 1.656935, 1.536266]
    eta16 = [0.500000, 0.882759, 1.185185, 1.430168, 1.632653]
    for B in range(1, 6):
        p = ms.mixing_weight(B, 5)
        assert ms.generalized_sharpness(Hs, p).value == pytest.approx(gen[B - 1], abs=2e-6)
        assert ms.rank_one_bound(Hs, p)[0] == pytest.approx(rank1[B - 1], abs=2e-6)
        assert 2 / ms.bound_eq16(Hs, p) == pytest.approx(eta16[B - 1], abs=2e-6)


@pytest.mark.parametrize("B", [1, 2, 3])
def test_threshold_is_where_the_enumerated_sgd_second_moment_operator_reaches_one(B):
    """ρ(Q(η*)) = 1 for Q = E_batch[(I − ηH_B)⊗(I − ηH_B)] enumerated over all batches of B out of N
    (sampling without replacement): checks p = (N − B)/(B(N − 1)) against the real SGD sampling."""
    N, d = 6, 4
    Hs = random_hessians(11, N, d, rank=2)
    eta = 2 / ms.generalized_sharpness(Hs, ms.mixing_weight(B, N)).value
    eye = torch.eye(d, dtype=torch.float64)

    def rho(step):
        Q = sum(
            torch.kron(eye - step * Hs[list(b)].mean(0), eye - step * Hs[list(b)].mean(0))
            for b in itertools.combinations(range(N), B)
        )
        Q = Q / len(list(itertools.combinations(range(N), B)))
        return float(torch.linalg.eigvals(Q).abs().max())

    assert rho(eta) == pytest.approx(1.0, abs=1e-9)
    assert rho(0.99 * eta) < 1 - 1e-6 and rho(1.01 * eta) > 1 + 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_full_batch_gives_lambda_max_and_value_is_nonincreasing_in_batch_size(seed):
    """Prop. 1 (η* non-decreasing in B) and B = N ⇒ p = 0 ⇒ λ_max(C†D) = λ_max(H), on random instances."""
    g = torch.Generator().manual_seed(100 + seed)
    N = int(torch.randint(3, 13, (1,), generator=g))
    d = int(torch.randint(2, 8, (1,), generator=g))
    Hs = random_hessians(100 + seed, N, d, rank=int(torch.randint(1, d + 1, (1,), generator=g)))
    values = [ms.generalized_sharpness(Hs, ms.mixing_weight(B, N)).value for B in range(1, N + 1)]
    assert values[-1] == pytest.approx(float(torch.linalg.eigvalsh(Hs.mean(0))[-1]), rel=1e-10)
    assert all(b <= a * (1 + 1e-10) for a, b in zip(values, values[1:])), values


def test_singular_hessian_uses_the_pseudo_inverse():
    Hs = random_hessians(5, 12, 7, null=2)  # H has a 2-dimensional null space shared by every H_i
    assert torch.linalg.eigvalsh(Hs.mean(0))[:2].abs().max() < 1e-12
    for p in (1.0, 0.2):
        exact = ms.generalized_sharpness(Hs, p)
        assert exact.value == pytest.approx(brute_value(Hs, p), rel=1e-8)
        assert ms.rank_r_bound(Hs, p, 7)[0] == pytest.approx(exact.value, rel=1e-8)


def test_low_rank_factored_operator_matches_the_dense_one():
    Hs = random_hessians(7, 10, 12, rank=2)  # 4·rank ≤ d: the factored matvec is used
    exact = ms.generalized_sharpness(Hs, 0.6)
    assert exact.factor_rank == 2
    assert exact.value == pytest.approx(brute_value(Hs, 0.6), rel=1e-8)


def test_bounds_stay_below_the_value_when_hessians_are_indefinite():
    """Away from a minimum (H_i not PSD) the bounds use H's positive eigenspace, where X ∈ range(C)."""
    g = torch.Generator().manual_seed(9)
    A = torch.randn(15, 6, 6, generator=g, dtype=torch.float64)
    Hs = A + A.transpose(1, 2) + torch.diag(torch.tensor([3.0, 2, 1, 0.5, -0.5, -1], dtype=torch.float64))
    assert torch.linalg.eigvalsh(Hs.mean(0)).min() < 0 < torch.linalg.eigvalsh(Hs.mean(0)).max()
    for p in (1.0, 0.3):
        exact = ms.generalized_sharpness(Hs, p).value
        lam, V = torch.linalg.eigh(Hs.mean(0))
        q = torch.einsum("a,iab,b->i", V[:, -1], Hs, V[:, -1])
        for bound in (
            ms.bound_eq15(q, p),
            ms.bound_eq16(Hs, p),
            ms.rank_one_bound(Hs, p)[0],
            ms.rank_r_bound(Hs, p, 2)[0],
        ):
            assert bound <= exact * (1 + 1e-10)


def test_psd_quotient_with_a_non_orthonormal_factor():
    Hs = random_hessians(2, 9, 5)
    U = torch.randn(5, 2, dtype=torch.float64)
    assert float(ms.psd_quotient(Hs, 0.4, U)) == pytest.approx(rayleigh(Hs, 0.4, U @ U.T), rel=1e-12)


def test_mixing_weight():
    assert ms.mixing_weight(1, 10) == 1.0
    assert ms.mixing_weight(10, 10) == 0.0
    assert ms.mixing_weight(4, 10) == pytest.approx(6 / 36)
    assert ms.mixing_weight(1, 1) == 0.0
    with pytest.raises(ValueError, match="batch_size <= dataset_size"):
        ms.mixing_weight(11, 10)
    with pytest.raises(ValueError, match="mixing weight"):
        ms.generalized_sharpness(random_hessians(0, 3, 2), 1.5)
