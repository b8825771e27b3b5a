"""Mean-square stability of SGD: generalized sharpness and its lower bounds (Mulayoff & Michaeli, COLT
2024, MATH.md §3; equation numbers are the COLT ones, MATH.md §3.0).

Setting (Thm 3, eqs. 12–13): per-example Hessians H_i (i = 1..n), H = (1/n) Σ H_i, mixing weight
p = (N − B)/(B(N − 1)) (:func:`mixing_weight`), and the operators on d × d matrices X

    C X = ½ (H X + X H)                                 (C = ½ H ⊕ H, a Kronecker sum)
    D X = (1 − p) H X H + (p/n) Σ_i H_i X H_i           (D = (1 − p) H⊗H + (p/n) Σ H_i⊗H_i).

The *generalized sharpness* is λ_max(C†D); SGD with step η is mean-square stable iff
η ≤ η* = 2 / λ_max(C†D) (eq. 13). B = N gives p = 0 and λ_max(C†D) = λ_max(H) (MATH.md §3.3).

Exact value (:func:`generalized_sharpness`), never forming a d² × d² matrix: in the eigenbasis
H = V Λ Vᵀ, C is diagonal with entries c_kl = (λ_k + λ_l)/2. When C ⪰ 0, C†D = C^{†/2}(C^{†/2}D) has
the same non-zero eigenvalues as the symmetric S = C^{†/2} D C^{†/2}, and S maps symmetric matrices to
symmetric ones; by Thm 6 the top eigenvector is symmetric (PSD), so λ_max(S) is found by Lanczos
(:func:`sgdprobe.linalg.lanczos`) on the symmetric matrices supported on the pairs with c_kl > 0 (at
most d(d+1)/2 dimensions), with one application of D per step: 2·n·d³ flops, or ≈ 4·n·d²·k when every
H_i has rank ≤ k (e.g. a ReLU network with MSE), which is used automatically.

Lower bounds (necessary conditions for stability, η* ≤ 2/bound): for any X = U Uᵀ ≠ 0 the generalized
Rayleigh quotient

    R(U) = ⟨X, D X⟩ / ⟨X, C X⟩ = [ (1 − p) ‖UᵀHU‖_F² + (p/n) Σ_i ‖UᵀH_iU‖_F² ] / tr(UᵀHU · UᵀU)

is ≤ λ_max(C†D) (:func:`psd_quotient`). Proof: with H_i ⪰ 0 (a regular minimum, Def. 3), vᵀHv = 0
implies H_i v = 0 for all i, so null(C) ⊆ null(D); writing u = vec X = u_C + u_0 (u_0 ∈ null(C)) and
w = C^{1/2} u_C gives uᵀDu / uᵀCu = wᵀSw / wᵀw ≤ λ_max(S). Special cases: U = v_max gives eq. (15),
U = I gives eq. (16), unit U = v maximised over the sphere gives the rank-one bound eq. (25);
:func:`rank_r_bound` maximises over rank-r X and reaches the exact value at r = d.

Everything here takes the per-example curvature *compressed to a basis*: ``forms[i] = VᵀH_iV`` for a
d × m matrix V with orthonormal columns (V = I, or H's eigenvectors, for the exact problem; the top
Lanczos eigenvectors of H for a large model, where only these m × m forms are affordable). A bound
computed from the forms of any orthonormal V is a bound for the full problem (X = V U Uᵀ Vᵀ).

All computations run in float64 on the CPU tensors' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgdprobe.linalg.lanczos import lanczos

__all__ = [
    "MeanSquareResult",
    "bound_eq15",
    "bound_eq16",
    "generalized_sharpness",
    "mixing_weight",
    "positive_part",
    "psd_quotient",
    "rank_one_bound",
    "rank_r_bound",
]


def mixing_weight(batch_size: int, dataset_size: int) -> float:
    """p = (N − B)/(B(N − 1)) ∈ [0, 1] of Thm 3 (batches of B drawn without replacement from N
    examples; p = 1 at B = 1, p = 0 at B = N, p ≈ 1/B for N ≫ B)."""
    if not (1 <= batch_size <= dataset_size):
        raise ValueError(
            f"need 1 <= batch_size <= dataset_size, got batch_size={batch_size}, dataset_size={dataset_size}"
        )
    if dataset_size == 1:
        return 0.0
    return (dataset_size - batch_size) / (batch_size * (dataset_size - 1))


def _check_p(p: float) -> None:
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"the mixing weight p must be in [0, 1], got {p} (see mixing_weight)")


def _check_forms(forms: torch.Tensor, p: float) -> torch.Tensor:
    if forms.dim() != 3 or forms.shape[1] != forms.shape[2]:
        raise ValueError(f"expected per-example curvature of shape (n, d, d), got {tuple(forms.shape)}")
    _check_p(p)
    forms = forms.to(torch.float64)
    return 0.5 * (forms + forms.transpose(1, 2))


# ----------------------------------------------------------------------------- exact value
@dataclass
class MeanSquareResult:
    """λ_max(C†D) and its top eigenvector.

    ``eigenvector`` is the d × d symmetric X with D X = value · C X (unit Frobenius norm, positive
    trace; PSD by Thm 6), in the coordinates of the input. ``residual`` is the Lanczos residual of the
    symmetric operator S relative to ``value`` (|value − λ_max| ≤ residual·value); ``hessian_eigenvalues``
    are those of H (descending). ``value`` is a Ritz value of S, so even an unconverged run is a lower
    bound on λ_max(C†D).
    """

    value: float
    eigenvector: torch.Tensor
    hessian_eigenvalues: torch.Tensor
    residual: float
    converged: bool
    n_matvecs: int
    factor_rank: int


def _sym_pack(d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(d, d, device=device)
    weight = torch.full(rows.shape, math.sqrt(2.0), dtype=torch.float64, device=device)
    weight[rows == cols] = 1.0
    return rows, cols, weight


def _factor(forms: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Low-rank factors F_i diag(μ_i) F_iᵀ of every form, when the common rank is ≤ d/4 (else None)."""
    n, d, _ = forms.shape
    mu, F = torch.linalg.eigh(forms)
    scale = float(mu.abs().max()) or 1.0
    keep = mu.abs() > rtol * scale
    k = int(keep.sum(1).max())
    if 4 * k > d:
        return None
    order = torch.argsort(mu.abs(), dim=1, descending=True)[:, : max(k, 1)]
    mu = torch.gather(mu, 1, order)
    F = torch.gather(F, 2, order.unsqueeze(1).expand(n, d, order.shape[1]))
    return F, mu


def generalized_sharpness(
    forms: torch.Tensor,
    p: float,
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    null_rtol: float | None = None,
    factor_rtol: float | None = None,
    seed: int = 0,
) -> MeanSquareResult:
    """Exact generalized sharpness λ_max(C†D) (Thm 3, eqs. 12–13) from per-example Hessians.

    :param forms: (n, d, d) per-example Hessians H_i (or VᵀH_iV for an orthonormal V, which gives the
        exact value of the problem restricted to span(V), a lower bound on the full one).
    :param p: mixing weight, :func:`mixing_weight`.
    :param tol: Lanczos residual tolerance relative to the top Ritz value (the eigenvalue error is at
        most residual²/gap, so 1e-10 leaves ~1e-15 relative error when the top is separated).
    :param max_iter: Lanczos steps (default min(d(d+1)/2, 600)).
    :param null_rtol: pairs (k, l) with (λ_k + λ_l)/2 ≤ null_rtol·max|λ| are left out (the pseudo-inverse
        C†; default 1e-10 for float64 input, 1e-5 for float32 input, whose small eigenvalues are
        rounding noise). At a minimum (H ⪰ 0) this is exact. Away from one, H may have negative
        eigenvalues; the value is then that of the linearized dynamics at these parameters on the pairs
        where C > 0 (the negative-curvature directions already make the mean unstable, Thm 1).
    :param factor_rtol: eigenvalues of each H_i below factor_rtol·max_i ‖H_i‖ are dropped when the H_i
        are of low rank (this changes the value by about that relative amount); default 1e-12 for
        float64 input, 1e-6 for float32 input (whose Hessians are not more accurate than that).

    Cost: one n·d³ rotation into H's eigenbasis, then ≈ 2·n·d³ flops per Lanczos step (4·n·d²·k for
    rank-k H_i), memory n·d² numbers; d ≤ a few hundred is practical.
    """
    precise = forms.dtype == torch.float64
    null_rtol = (1e-10 if precise else 1e-5) if null_rtol is None else null_rtol
    factor_rtol = (1e-12 if precise else 1e-6) if factor_rtol is None else factor_rtol
    forms = _check_forms(forms, p)
    n, d, _ = forms.shape
    H = forms.mean(0)
    lam, V = torch.linalg.eigh(H)
    lam, V = lam.flip(0), V.flip(1)
    rot = V.T @ forms @ V  # per-example Hessians in H's eigenbasis; mean is diag(lam)
    rot = 0.5 * (rot + rot.transpose(1, 2))
    c = 0.5 * (lam[:, None] + lam[None, :])
    scale = float(lam.abs().max()) or 1.0
    s = torch.where(c > null_rtol * scale, c.clamp_min(1e-300).rsqrt(), torch.zeros_like(c))
    if not bool((s > 0).any()):
        zero = torch.zeros(d, d, dtype=torch.float64, device=forms.device)
        return MeanSquareResult(0.0, zero, lam, 0.0, True, 0, 0)
    factors = _factor(rot, factor_rtol) if p > 0 else None
    rows, cols, weight = _sym_pack(d, forms.device)
    support = s[rows, cols] > 0  # S vanishes outside the pairs kept by C†: Lanczos runs on the rest only
    rows, cols, weight = rows[support], cols[support], weight[support]
    lam_outer = lam[:, None] * lam[None, :]

    def unpack(v: torch.Tensor) -> torch.Tensor:
        Y = torch.zeros(d, d, dtype=torch.float64, device=forms.device)
        Y[rows, cols] = v / weight
        return Y + Y.T - torch.diag(Y.diagonal())

    def apply_d(X: torch.Tensor) -> torch.Tensor:
        out = (1.0 - p) * lam_outer * X
        if p > 0:
            if factors is None:
                mixed = (rot @ X @ rot).mean(0)
            else:
                F, mu = factors
                inner = F.transpose(1, 2) @ X @ F * mu[:, :, None] * mu[:, None, :]
                mixed = (F @ inner @ F.transpose(1, 2)).mean(0)
            out = out + p * mixed
        return out

    def matvec(v: torch.Tensor) -> torch.Tensor:
        Y = s * apply_d(s * unpack(v))
        Y = 0.5 * (Y + Y.T)
        return Y[rows, cols] * weight

    m = int(rows.numel())
    gen = torch.Generator().manual_seed(seed)
    start = torch.zeros(d, d, dtype=torch.float64)
    start[0, 0] = 1.0  # e1 e1ᵀ: the direction of eq. (15)
    noise = torch.randn(m, generator=gen, dtype=torch.float64)
    v0 = start.to(forms.device)[rows, cols] * weight + 0.3 * noise.to(forms.device) / noise.norm()
    budget = min(m, 600) if max_iter is None else max_iter
    run_tol, used = tol, 0
    # lanczos() measures residuals against the largest |Ritz value|, which a very negative eigenvalue of S
    # (indefinite H_i away from a minimum) can make much larger than the top one: tighten and resume
    # from the Ritz vector until the residual is below tol relative to the top eigenvalue itself.
    for _ in range(4):
        eig = lanczos(
            matvec, m, 1, tol=run_tol, max_iter=budget - used, v0=v0, device=forms.device,
            dtype=torch.float64, seed=seed,
        )
        used += eig.n_matvecs
        value = float(eig.eigenvalues[0])
        rel = float(eig.residuals[0]) / max(abs(value), 1e-300)
        if rel <= tol or used >= budget:
            break
        run_tol *= 0.5 * tol / rel
        v0 = eig.eigenvectors[:, 0]
    X = V @ (s * unpack(eig.eigenvectors[:, 0])) @ V.T
    X = X / X.norm()
    if float(X.trace()) < 0:
        X = -X
    rank = 0 if factors is None else int(factors[1].shape[1])
    return MeanSquareResult(value, X, lam, rel, rel <= tol, used, rank)


# ----------------------------------------------------------------------------- lower bounds
def positive_part(
    forms: torch.Tensor, *, null_rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H's eigenvalues λ_k > null_rtol·max|λ| (descending), their eigenvectors W_+ and the forms
    compressed to them: (λ_+, W_+, W_+ᵀ H_i W_+). Every X = W_+ A W_+ᵀ lies in range(C) (C acts on it as
    the diagonal (λ_k + λ_l)/2 > 0), which makes the quotients below certified bounds even when the H_i
    are not PSD."""
    if null_rtol is None:
        null_rtol = 1e-10 if forms.dtype == torch.float64 else 1e-5
    forms = _check_forms(forms, 0.0)
    M = forms.mean(0)
    diag = M.diagonal()
    if bool((M - torch.diag(diag)).abs().max() <= 1e-13 * (float(diag.abs().max()) or 1.0)):
        # already in H's eigenbasis (e.g. the output of this function): select, do not rotate
        lam, order = torch.sort(diag, descending=True)
        keep = order[lam > null_rtol * (float(lam.abs().max()) or 1.0)]
        W = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)[:, keep]
        return diag[keep], W, forms[:, keep][:, :, keep]
    lam, E = torch.linalg.eigh(M)
    lam, E = lam.flip(0), E.flip(1)
    keep = lam > null_rtol * (float(lam.abs().max()) or 1.0)
    W = E[:, keep]
    return lam[keep], W, W.T @ forms @ W


def psd_quotient(forms: torch.Tensor, p: float, U: torch.Tensor) -> torch.Tensor:
    """R(U) = ⟨X, D X⟩ / ⟨X, C X⟩ at X = U Uᵀ (Thm 3's pencil on PSD X). ``forms`` are VᵀH_iV (n, m, m)
    for an orthonormal V and U is m × r (or a vector, r = 1), so that X = V U Uᵀ Vᵀ. Differentiable in U.

    R(U) ≤ λ_max(C†D) whenever vec X ∈ range(C) (always true for V inside H's positive eigenspace, see
    :func:`positive_part`) or H_i ⪰ 0 for all i (a regular minimum, Def. 3). At U = v (unit) it is
    vᵀHv + p·Var_i(vᵀH_iv)/vᵀHv, the function maximised in eq. (25).
    """
    if U.dim() == 1:
        U = U[:, None]
    U = U.to(forms.dtype)
    small = U.T @ forms @ U  # (n, r, r)
    Msmall = small.mean(0)
    num = (1.0 - p) * (Msmall**2).sum() + p * (small**2).sum((1, 2)).mean()
    den = (Msmall * (U.T @ U)).sum()
    return num / den


def bound_eq15(quadratic_forms: torch.Tensor, p: float) -> float:
    """Eq. (15) as a lower bound on the generalized sharpness: λ + p·Var_i(q_i)/λ with q_i = vᵀH_iv for
    the unit top eigenvector v of H and λ = mean_i q_i = vᵀHv (= R(v) of :func:`psd_quotient`; the
    paper's η* ≤ 2λ/(λ² + p·mean_i (q_i − λ)²)). Certified for v an eigenvector of H with λ > 0."""
    q = quadratic_forms.to(torch.float64).reshape(-1)
    lam = q.mean()
    if not float(lam) > 0:
        raise ValueError(f"vᵀHv must be positive for eq. (15), got {float(lam)}")
    return float(lam + p * ((q - lam) ** 2).mean() / lam)


def bound_eq16(forms: torch.Tensor, p: float, *, null_rtol: float | None = None) -> float:
    """Eq. (16) as a lower bound: ((1 − p)‖H‖_F² + (p/n) Σ_i ‖H_i‖_F²) / tr H, the quotient at X = I.

    Computed at X = P_+, the projector on H's positive eigenspace (:func:`positive_part`), which keeps it
    certified when H is not PSD; at a regular minimum (H_i ⪰ 0, so H_i vanishes on null(H)) this is the
    paper's number exactly. ``forms`` are the dense per-example Hessians (n, d, d)."""
    lam, _, inner = positive_part(forms, null_rtol=null_rtol)
    if lam.numel() == 0:
        raise ValueError("H has no positive eigenvalue: eq. (16) is undefined")
    M = inner.mean(0)  # R(U = I) of psd_quotient, without the identity products
    return float(((1.0 - p) * (M**2).sum() + p * (inner**2).sum((1, 2)).mean()) / M.trace())


def _maximise(forms: torch.Tensor, p: float, U0: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Maximise R(U) from U0 by L-BFGS (R is scale invariant); returns the best value seen and its U."""
    best_U = U0.detach().clone()
    with torch.no_grad():
        best = float(psd_quotient(forms, p, best_U))
    if steps <= 0:
        return best, best_U
    U = (U0.detach() / U0.norm()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([U], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -psd_quotient(forms, p, U / U.norm())
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # a degenerate step; the starting value stands
        return best, best_U
    with torch.no_grad():
        W = U.detach() / U.detach().norm()
        value = float(psd_quotient(forms, p, W))
    if math.isfinite(value) and value > best:
        return value, W
    return best, best_U


def rank_one_bound(
    forms: torch.Tensor, p: float, *, starts: int = 3, steps: int = 50, null_rtol: float | None = None
) -> tuple[float, torch.Tensor]:
    """Eq. (25): max over unit v of vᵀHv + p·Var_i(vᵀH_iv)/vᵀHv, by L-BFGS on the sphere of H's positive
    eigenspace (:func:`positive_part`), from the top ``starts`` eigenvectors of H (the first is v_max, so
    the result is ≥ eq. (15)). Every v gives a certified lower bound, so the optimiser only affects
    tightness. Returns (value, v), v in the coordinates of ``forms``."""
    _check_p(p)
    lam, W, inner = positive_part(forms, null_rtol=null_rtol)
    if lam.numel() == 0:
        raise ValueError("H has no positive eigenvalue: the rank-one bound is undefined")
    eye = torch.eye(W.shape[1], dtype=inner.dtype, device=inner.device)
    best, best_a = -math.inf, eye[:, 0]
    for j in range(min(starts, W.shape[1])):
        value, a = _maximise(inner, p, eye[:, j : j + 1], steps)
        if value > best:
            best, best_a = value, a[:, 0]
    v = W @ best_a
    return best, v / v.norm()


def rank_r_bound(
    forms: torch.Tensor, p: float, rank: int, *, steps: int = 50, null_rtol: float | None = None
) -> tuple[float, torch.Tensor]:
    """Rank-r lower bound (beyond the paper): max of R(U) over X = U Uᵀ of rank ≤ r.

    Two steps, each a certified bound: (i) the exact generalized sharpness of the problem compressed to
    the top-r eigenvectors W_r of H = mean(forms) (positive eigenvalues only), i.e. the best X in
    span(W_r)⊗span(W_r), whose optimum is PSD of rank ≤ r (Thm 6). The subspaces are nested, so (i)
    never decreases as r grows, and with r ≥ the number of positive eigenvalues it is the exact value.
    (ii) L-BFGS over U (m_+ × r) in H's positive eigenspace started from the factor of (i)'s optimum.
    Returns (value, X) with X = U Uᵀ in the coordinates of ``forms``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _check_p(p)
    lam, E, inner = positive_part(forms, null_rtol=null_rtol)
    m = lam.numel()
    if m == 0:
        raise ValueError("H has no positive eigenvalue: the rank-r bound is undefined")
    r = min(rank, m)
    top = generalized_sharpness(inner[:, :r, :r], p, null_rtol=null_rtol)
    mu, Z = torch.linalg.eigh(top.eigenvector)
    U0 = torch.zeros(m, r, dtype=inner.dtype, device=inner.device)
    U0[:r] = Z * mu.clamp_min(0).sqrt()
    # R(U0) is (i) up to round-off; (ii) only ever improves on it
    value, U = _maximise(inner, p, U0, steps if r < m else 0)
    X = E @ U @ U.T @ E.T
    return value, X
