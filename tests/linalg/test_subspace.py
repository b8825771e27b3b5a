"""Principal angles, Ye & Lim distances, subspace similarity and overlap matching (MATH.md §5)."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sgdprobe.linalg import subspace


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def bases_at_angles(p: int, angles, extra_b: int = 0, seed: int = 0):
    """Q_A (p × k) and Q_B (p × (k + extra_b)) whose principal angles are ``angles``, in a random frame."""
    k = len(angles)
    assert 2 * k + extra_b <= p
    e = torch.eye(p, dtype=torch.float64)
    qa = e[:, :k]
    cols = [math.cos(t) * e[:, i] + math.sin(t) * e[:, k + i] for i, t in enumerate(angles)]
    cols += [e[:, 2 * k + j] for j in range(extra_b)]
    qb = torch.stack(cols, 1)
    rot = random_orthogonal(p, torch.Generator().manual_seed(seed))
    return rot @ qa, rot @ qb


@pytest.mark.parametrize("k, l", [(3, 3), (2, 5), (5, 2), (1, 4)])
def test_principal_angles_match_scipy(k, l):
    gen = torch.Generator().manual_seed(k * 10 + l)
    a = torch.randn(12, k, dtype=torch.float64, generator=gen)  # not orthonormal: QR inside
    b = torch.randn(12, l, dtype=torch.float64, generator=gen)
    got = subspace.principal_angles(a, b)
    want = np.sort(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
    assert got.shape == (min(k, l),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(subspace.principal_cosines(a, b).numpy(), np.cos(want), atol=1e-12)


@pytest.mark.parametrize("theta", [1e-7, 1e-9, 0.3, 1.4])
def test_small_and_large_angles_are_accurate(theta):
    """arccos of the cosines alone would give 1e-7 with ~1 % error and 1e-9 as 0."""
    qa, qb = bases_at_angles(8, [theta, 0.5 * theta])
    got = subspace.principal_angles(qa, qb)
    np.testing.assert_allclose(got.numpy(), [0.5 * theta, theta], rtol=1e-6)


def test_known_angles_give_every_ye_lim_distance():
    angles = [0.1, 0.5, 1.2]
    qa, qb = bases_at_angles(10, angles, seed=3)
    t = np.array(angles)
    d = subspace.grassmann_distances(qa, qb)
    want = {
        "geodesic": np.sqrt((t**2).sum()),
        "geodesic_inf": np.sqrt((t**2).sum()),
        "chordal": np.sqrt((np.sin(t) ** 2).sum()),
        "fubini_study": np.arccos(np.prod(np.cos(t))),
        "binet_cauchy": np.sqrt(1 - np.prod(np.cos(t) ** 2)),
        "projection": np.sin(t.max()),
        "procrustes": 2 * np.sqrt((np.sin(t / 2) ** 2).sum()),
        "asimov": t.max(),
        "spectral": 2 * np.sin(t.max() / 2),
    }
    assert set(d) == set(want)
    for key, value in want.items():
        assert d[key] == pytest.approx(value, rel=1e-10), key
    assert subspace.subspace_similarity(qa, qb) == pytest.approx(np.sqrt(np.mean(np.cos(t) ** 2)), rel=1e-12)
    assert subspace.fubini_study_similarity(qa, qb) == pytest.approx(np.prod(np.cos(t)), rel=1e-12)
    # Σσ² = ‖Q_AᵀQ_B‖_F² and Πσ = |det Q_AᵀQ_B|: formulas independent of the SVD
    m = (qa.T @ qb).numpy()
    assert subspace.subspace_similarity(qa, qb) == pytest.approx(np.linalg.norm(m) / np.sqrt(3), rel=1e-12)
    assert subspace.fubini_study_similarity(qa, qb) == pytest.approx(abs(np.linalg.det(m)), rel=1e-12)


def test_different_dimensions_follow_ye_lim():
    angles = [0.2, 0.7]
    qa, qb = bases_at_angles(9, angles, extra_b=3, seed=1)  # dim A = 2, dim B = 5
    d = subspace.grassmann_distances(qa, qb)
    assert d["geodesic"] == pytest.approx(math.hypot(*angles), rel=1e-12)
    assert d["geodesic_inf"] == pytest.approx(math.sqrt(3 * math.pi**2 / 4 + 0.2**2 + 0.7**2), rel=1e-12)
    assert subspace.grassmann_distances(qb, qa) == pytest.approx(d, rel=1e-12)  # symmetric
    # a subspace contained in a larger one: distance 0, similarity 1 (Schubert-variety convention)
    inner = qb[:, 1:3] @ torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    d_in = subspace.grassmann_distances(inner, qb)
    assert d_in["geodesic"] < 1e-7
    assert d_in["geodesic_inf"] == pytest.approx(math.sqrt(3) * math.pi / 2, rel=1e-12)
    assert subspace.subspace_similarity(inner, qb) == pytest.approx(1.0, abs=1e-12)


def test_subspace_measures_are_invariant_to_rotations_within_the_subspaces():
    gen = torch.Generator().manual_seed(7)
    qa = subspace.orthonormalize(torch.randn(20, 4, dtype=torch.float64, generator=gen))
    qb = subspace.orthonormalize(qa + 0.3 * torch.randn(20, 4, dtype=torch.float64, generator=gen))
    ra, rb = random_orthogonal(4, gen), random_orthogonal(4, gen)
    mixed = torch.randn(4, 4, dtype=torch.float64, generator=gen)  # any change of basis, not orthogonal
    base = (
        subspace.subspace_similarity(qa, qb),
        subspace.fubini_study_similarity(qa, qb),
        subspace.grassmann_distances(qa, qb)["geodesic"],
    )
    for a, b in [(qa @ ra, qb @ rb), (qa @ mixed, qb), (-qa, qb @ rb)]:
        moved = (
            subspace.subspace_similarity(a, b),
            subspace.fubini_study_similarity(a, b),
            subspace.grassmann_distances(a, b)["geodesic"],
        )
        np.testing.assert_allclose(moved, base, rtol=1e-10)
    # the rotation is not trivial: the per-vector cosines do change
    per_vector = subspace.cosine_similarity(qa, qb)
    rotated = subspace.cosine_similarity(qa @ ra, qb @ rb)
    assert (per_vector - rotated).abs().max() > 0.05
    assert 0.5 < base[0] < 0.999


def test_one_dimension_reduces_to_sign_invariant_cosine():
    gen = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(7, dtype=torch.float64, generator=gen),
        torch.randn(7, dtype=torch.float64, generator=gen),
    )
    cos = abs(float(a @ b)) / float(a.norm() * b.norm())
    assert float(subspace.cosine_similarity(a, -3.0 * b)[0]) == pytest.approx(cos, rel=1e-13)
    assert subspace.subspace_similarity(a, b) == pytest.approx(cos, rel=1e-12)
    assert subspace.fubini_study_similarity(-a, b) == pytest.approx(cos, rel=1e-12)
    assert float(subspace.principal_angles(a, b)[0]) == pytest.approx(math.acos(cos), rel=1e-12)


def brute_force_match(c: np.ndarray) -> tuple[int, ...]:
    k, l = c.shape
    best = max(itertools.permutations(range(l), k), key=lambda p: sum(c[i, j] for i, j in enumerate(p)))
    return best


def test_matching_is_the_best_assignment_not_greedy():
    greedy_differs = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        prev = subspace.orthonormalize(torch.randn(6, 4, dtype=torch.float64, generator=gen))
        cur = subspace.orthonormalize(
            prev[:, torch.randperm(4, generator=gen)]
            + 0.6 * torch.randn(6, 4, dtype=torch.float64, generator=gen)
        )
        match, cos = subspace.match_by_overlap(cur, prev)
        c = subspace.cosine_matrix(cur, prev).numpy()
        best = brute_force_match(c)
        assert sum(c[i, j] for i, j in enumerate(match)) == pytest.approx(
            sum(c[i, j] for i, j in enumerate(best))
        )
        np.testing.assert_allclose(cos.numpy(), [c[i, j] for i, j in enumerate(match)])
        assert sorted(match) == sorted(set(match))  # distinct
        taken, greedy = set(), []
        for i in range(4):  # greedy in index order: what matching by index-then-best would do
            j = max((j for j in range(4) if j not in taken), key=lambda j: c[i, j])
            taken.add(j)
            greedy.append(j)
        greedy_differs += tuple(greedy) != tuple(match)
    assert greedy_differs > 0  # the cases exercise the assignment, not just argmax


def test_crossing_is_matched_by_overlap_and_rectangular_cases():
    gen = torch.Generator().manual_seed(5)
    prev = subspace.orthonormalize(torch.randn(10, 3, dtype=torch.float64, generator=gen))
    rot = torch.tensor([[math.cos(0.1), -math.sin(0.1)], [math.sin(0.1), math.cos(0.1)]], dtype=torch.float64)
    swapped = prev[:, [1, 0]] @ rot  # eigenvalues 1 and 2 crossed, and the pair rotated by 0.1 rad
    cur = torch.cat([swapped, -prev[:, 2:]], 1)
    match, cos = subspace.match_by_overlap(cur, prev)
    assert match == [1, 0, 2]
    np.testing.assert_allclose(cos.numpy(), [math.cos(0.1), math.cos(0.1), 1.0], rtol=1e-12)
    np.testing.assert_allclose(
        subspace.cosine_similarity(cur, prev).numpy(), [math.sin(0.1)] * 2 + [1.0], rtol=1e-12
    )
    # more previous vectors than current: every current one is matched
    match, _ = subspace.match_by_overlap(prev[:, [2]], prev)
    assert match == [2]
    # fewer previous vectors than current: the worst-overlapping current vector is left unmatched
    match, cos = subspace.match_by_overlap(cur, prev[:, :1])
    assert match == [-1, 0, -1] and cos[0] == 0.0 and cos[2] == 0.0
