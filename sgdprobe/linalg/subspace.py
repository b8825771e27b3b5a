"""Similarity of eigenvectors and of eigenvector subspaces (MATH.md §5; Wang & Roberts, seed 002 §2).

All functions take bases as columns (``P × k`` tensors) on any device and in any float dtype; the small
``k × l`` products are computed where the bases are and then moved to the CPU in float64.

- :func:`cosine_similarity`: |⟨a, b⟩| / (‖a‖‖b‖), sign-invariant (eigenvectors are defined up to sign).
- :func:`principal_cosines` / :func:`principal_angles`: σ_i = singular values of Q_AᵀQ_B clipped to
  [0, 1], θ_i = arccos σ_i, i = 1..min(k, l) (subspaces of different dimension allowed). Small angles
  are taken from the sines (singular values of the part of the smaller basis outside the larger one),
  large ones from the cosines, as in Knyazev & Argentati (2002), so both ends are accurate.
- :func:`grassmann_distances`: the distances of Ye & Lim (2016) built on the principal angles.
- :func:`subspace_similarity`: the default "cosine-Grassmannian" similarity

      s(A, B) = ( (1/m) Σ_{i=1}^{m} σ_i² )^{1/2} = ‖Q_AᵀQ_B‖_F / √m,   m = min(k, l),

  i.e. the root-mean-square cosine of the principal angles (= √s_proj of MATH.md §5, and
  √(1 − d_chordal²/m) with Ye & Lim's chordal distance). It is chosen as default because it reduces to
  |cos| in one dimension (so ``subspace`` and ``cos`` tags share one scale), it is invariant to any
  change of basis within either subspace, it equals 1 iff the smaller subspace lies in the larger one
  (Ye & Lim's Schubert-variety convention for different dimensions), and it degrades gracefully: one
  of k directions leaving the subspace costs 1 − √((k−1)/k), whereas the Fubini–Study similarity
  s_FS = Π σ_i (also returned, :func:`fubini_study_similarity`) drops to 0.
- :func:`match_by_overlap`: assignment of current to previous eigenvectors maximising the total |cos|
  (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), so that eigenvalue crossings are
  followed by direction, not by index.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "cosine_matrix",
    "cosine_similarity",
    "fubini_study_similarity",
    "grassmann_distances",
    "match_by_overlap",
    "orthonormalize",
    "principal_angles",
    "principal_cosines",
    "subspace_similarity",
]


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"expected a vector or a P × k matrix of column vectors, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    return x


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the bases live in spaces of different dimension: {a.shape[0]} vs {b.shape[0]}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def orthonormalize(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (``P × k``) of the column span of ``a`` (reduced QR; ``a`` of full rank)."""
    q, _ = torch.linalg.qr(_as_matrix(a), mode="reduced")
    return q


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C_ij = |⟨a_i, b_j⟩| / (‖a_i‖‖b_j‖) for the columns of ``a`` (k) and ``b`` (l): a k × l float64
    CPU tensor, sign-invariant."""
    a, b = _common(a, b)
    an = a / a.norm(dim=0, keepdim=True)
    bn = b / b.norm(dim=0, keepdim=True)
    return (an.T @ bn).abs().clamp_(max=1.0).cpu().double()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| between corresponding columns of ``a`` and ``b`` (same shape): the k-th eigenvector
    similarity |⟨v_k(t), v_k(t′)⟩| of MATH.md §5, as a float64 CPU tensor of length k."""
    a, b = _common(a, b)
    if a.shape != b.shape:
        raise ValueError(f"column-wise cosines need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    num = (a * b).sum(0).abs()
    return (num / (a.norm(dim=0) * b.norm(dim=0))).clamp(max=1.0).cpu().double()


def _bases(a, b, orthonormal: bool):
    a, b = _common(a, b)
    if not orthonormal:
        a, b = orthonormalize(a), orthonormalize(b)
    return a, b


def principal_cosines(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """σ_1 ≥ … ≥ σ_m, m = min(k, l): singular values of Q_AᵀQ_B clipped to [0, 1] (float64, CPU).

    :param orthonormal: the columns of ``a`` and ``b`` are already orthonormal (skip the QR).
    """
    qa, qb = _bases(a, b, orthonormal)
    s = torch.linalg.svdvals((qa.T @ qb).cpu().double())
    return s.clamp(0.0, 1.0)


def principal_angles(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    """θ_1 ≤ … ≤ θ_m in [0, π/2] between span(a) and span(b), m = min(k, l) (float64, CPU).

    θ_i = arcsin of the sines where θ_i < π/4, arccos of the cosines otherwise (arccos alone loses half
    the digits of small angles: arccos(1 − ε) ≈ √(2ε))."""
    qa, qb = _bases(a, b, orthonormal)
    if qa.shape[1] > qb.shape[1]:
        qa, qb = qb, qa  # qa: the smaller subspace
    cos = principal_cosines(qa, qb, orthonormal=True)
    outside = qa - qb @ (qb.T @ qa)  # the part of the smaller subspace outside the larger one
    sin = torch.linalg.svdvals(outside.cpu().double()).flip(0).clamp(0.0, 1.0)  # ascending
    angles = torch.where(sin < math.sqrt(0.5), torch.asin(sin), torch.acos(cos))
    return angles


def subspace_similarity(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> float:
    """The default "cosine-Grassmannian" similarity √((1/m) Σ σ_i²) = ‖Q_AᵀQ_B‖_F/√m ∈ [0, 1] (see the
    module docstring for why this one); |cos| for two vectors."""
    sigma = principal_cosines(a, b, orthonormal=orthonormal)
    return float(sigma.square().mean().sqrt())


def fubini_study_similarity(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> float:
    """s_FS = Π σ_i = cos of the Fubini–Study distance (|det Q_AᵀQ_B| for equal dimensions)."""
    return float(principal_cosines(a, b, orthonormal=orthonormal).prod())


def grassmann_distances(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> dict[str, float]:
    """Ye & Lim (2016) distances between span(a) (dim k) and span(b) (dim l), from θ_1..θ_m, m = min(k, l)
    (MATH.md §5; for k ≠ l these are distances to the Schubert variety, 0 when one subspace contains the
    other, except ``geodesic_inf``, the metric on the doubly infinite Grassmannian).

    Keys: ``geodesic`` δ = (Σθ_i²)^{1/2}; ``geodesic_inf`` (|k − l|π²/4 + Σθ_i²)^{1/2}; ``chordal``
    (Σ sin²θ_i)^{1/2}; ``fubini_study`` arccos(Π cos θ_i); ``binet_cauchy`` (1 − Π cos²θ_i)^{1/2};
    ``projection`` sin θ_max; ``procrustes`` 2(Σ sin²(θ_i/2))^{1/2}; ``asimov`` θ_max; ``spectral``
    2 sin(θ_max/2).
    """
    qa, qb = _bases(a, b, orthonormal)
    theta = principal_angles(qa, qb, orthonormal=True)
    k, l = qa.shape[1], qb.shape[1]
    cos_prod = float(torch.cos(theta).prod().clamp(0.0, 1.0))
    t_max = float(theta.max()) if theta.numel() else 0.0
    sq = float(theta.square().sum())
    return {
        "geodesic": math.sqrt(sq),
        "geodesic_inf": math.sqrt(abs(k - l) * math.pi**2 / 4 + sq),
        "chordal": float(torch.sin(theta).square().sum().sqrt()),
        "fubini_study": math.acos(cos_prod),
        "binet_cauchy": math.sqrt(max(0.0, 1.0 - cos_prod**2)),
        "projection": math.sin(t_max),
        "procrustes": 2.0 * float(torch.sin(theta / 2).square().sum().sqrt()),
        "asimov": t_max,
        "spectral": 2.0 * math.sin(t_max / 2),
    }


def match_by_overlap(current: torch.Tensor, previous: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Match each current eigenvector (column i of ``current``) to a distinct previous one (column j of
    ``previous``) so that Σ_i |cos(current_i, previous_{j(i)})| is largest (Hungarian algorithm).

    Returns ``(match, cos)``: ``match[i] = j`` (0-based; −1 when there are fewer previous vectors than
    current ones and i is left unmatched) and the matched |cos| (0 for unmatched). With ``l ≥ k``
    previous vectors every current one is matched.
    """
    c = cosine_matrix(current, previous)
    rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
    match = [-1] * c.shape[0]
    cos = torch.zeros(c.shape[0], dtype=torch.float64)
    for i, j in zip(rows.tolist(), cols.tolist()):
        match[i] = j
        cos[i] = c[i, j]
    return match, cos
