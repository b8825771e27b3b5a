"""Per-example quantities of the measured loss: gradients, Gram matrices, Gauss–Newton traces and
per-example curvature forms (MATH.md §0, §2.4, §2.6, §4).

Pure functions of a :class:`~sgdprobe.snapshot.Snapshot` (anything with ``params``, ``examples()``,
``example_loss``, ``example_output``, ``isolated()``, ``config``, ``dtype``, ``device``, ``seed``).
The per-example loss is ℓ_i = ``loss_fn`` on example i alone (a batch of one), so every constant of
the user's loss (mean vs. sum, ``MSELoss``'s mean over outputs) is kept: for a mean-reduced loss the
measured objective is L = (1/n) Σ_i ℓ_i.

Everything runs on the model's device with ``torch.func`` (``vmap`` over examples of ``grad``/``vjp``/
``jvp`` of :meth:`Snapshot.example_loss`), in chunks of examples:

- a chunk holds at most ``config.per_example_chunk`` examples and about ``config.per_example_max_memory``
  bytes of per-example work (the chunk is the smaller of the two);
- an out-of-memory error in a chunk halves the chunk and retries (the size that worked is kept in
  ``config.per_example_chunk`` for later measurements); on a single example it raises
  :class:`MeasurementError` (the measurement is skipped with that report).

Randomness (dropout in train mode): ``vmap(..., randomness="same")``, one mask shared by all examples,
re-drawn from the snapshot's seed in every chunk, so values do not depend on the chunk size and all
per-example quantities of one measurement see the same mask.

Models whose forward mixes examples (BatchNorm in train mode) have no per-example gradients: every
function here raises :class:`MeasurementError` for them (plugins refuse them at attach time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import grad, grad_and_value, hessian, vjp, vmap

from sgdprobe._tree import map_tensors
from sgdprobe.errors import MeasurementError

__all__ = [
    "chunk_size",
    "gauss_newton_trace_exact",
    "gauss_newton_trace_sampled",
    "is_oom",
    "minibatch_gradients",
    "per_example_gradients",
    "per_example_gram",
    "per_example_quadratic_forms",
    "per_example_sq_norms",
    "run_chunked",
]


# ----------------------------------------------------------------------------- chunking
def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, MPS or host allocator)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    message = str(exc).lower()
    return isinstance(exc, oom) or (
        isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def chunk_size(snapshot, width: int) -> int:
    """Examples per chunk for work of ``width`` numbers per example: ``max_memory`` / (width · itemsize),
    capped by ``config.per_example_chunk``, at least 1."""
    config = snapshot.config
    itemsize = torch.empty((), dtype=snapshot.dtype).element_size()
    size = max(1, int(config.per_example_max_memory) // max(1, width * itemsize))
    if config.per_example_chunk is not None:
        size = min(size, int(config.per_example_chunk))
    return size


def run_chunked(snapshot, n: int, width: int, fn: Callable[[int, int], Any], what: str) -> list[Any]:
    """``[fn(start, stop) for consecutive chunks]`` covering examples 0..n−1; an out-of-memory error
    halves the chunk and retries, and on one example raises :class:`MeasurementError`."""
    size = chunk_size(snapshot, width)
    outs: list[Any] = []
    start = 0
    while start < n:
        stop = min(n, start + size)
        try:
            outs.append(fn(start, stop))
        except Exception as exc:
            if not is_oom(exc):
                raise
            _free_memory(snapshot.device)
            if stop - start == 1:
                raise MeasurementError(
                    f"{what}: out of memory on a single example ({type(exc).__name__}: {exc}). Measure "
                    "fewer parameters, use a smaller model or dtype, or disable this plugin."
                ) from exc
            size = (stop - start) // 2
            snapshot.config.per_example_chunk = size
            continue
        start = stop
    return outs


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- helpers
def _check_per_example(snapshot) -> None:
    mixed = snapshot.config.examples_mixed_by
    if mixed:
        raise MeasurementError(
            f"per-example quantities are undefined: {', '.join(mixed)} mix(es) the examples of a batch "
            "(BatchNorm in train mode). Put the model in eval mode, or use an estimator built on "
            "mini-batch gradients (gradient_covariance estimator='minibatch')."
        )


def _select(obj: Any, index: slice | torch.Tensor) -> Any:
    return map_tensors(obj, lambda t: t[index])


def _chunk(snapshot, start: int, stop: int) -> tuple[Any, Any]:
    inputs, targets = snapshot.examples()
    return _select(inputs, slice(start, stop)), _select(targets, slice(start, stop))


def _rows(tree: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """``{name: (b, *shape)}`` → (b, P) in the order of ``names`` (the order of ``Snapshot.flatten``)."""
    first = tree[names[0]]
    return torch.cat([tree[n].reshape(first.shape[0], -1) for n in names], dim=1)


def _params(snapshot) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in snapshot.params.items()}


def _num_params(snapshot) -> int:
    return sum(p.numel() for p in snapshot.params.values())


def _grads_chunk(snapshot, start: int, stop: int, targets: Any = None) -> torch.Tensor:
    """(b, P) gradients of ℓ_i for examples start..stop−1 (``targets`` replaces the chunk's labels)."""
    inputs, labels = _chunk(snapshot, start, stop)
    labels = labels if targets is None else targets
    params = _params(snapshot)
    with snapshot.isolated():
        g = vmap(grad(snapshot.example_loss), in_dims=(None, 0, 0), randomness="same")(params, inputs, labels)
    return _rows(g, list(params))


# ----------------------------------------------------------------------------- gradients
def per_example_gradients(snapshot) -> torch.Tensor:
    """(n, P) per-example gradients g_i = ∇_θ ℓ_i of all probe examples (stored: n·P numbers)."""
    _check_per_example(snapshot)
    P = _num_params(snapshot)
    chunks = run_chunked(
        snapshot,
        snapshot.num_examples,
        2 * P,
        lambda a, b: _grads_chunk(snapshot, a, b),
        "per-example gradients",
    )
    return torch.cat(chunks)


def per_example_sq_norms(snapshot) -> torch.Tensor:
    """(n,) squared norms ||g_i||², chunk by chunk (at most one chunk of gradients held)."""
    _check_per_example(snapshot)
    P = _num_params(snapshot)

    def one(a, b):
        return _grads_chunk(snapshot, a, b).square().sum(1)

    return torch.cat(run_chunked(snapshot, snapshot.num_examples, 2 * P, one, "per-example squared norms"))


def ghost_statistics(snapshot, gram: bool = False):
    """Per-example squared norms (and the Gram matrix if ``gram``) by the ghost-norm identity of
    :mod:`sgdprobe.linalg.ghost`, from layer inputs and output gradients of batched forwards and
    backwards, without per-example gradients; ``None`` when the model has a layer it does not cover or
    dropout is active (the caller then uses ``vmap(grad)``, whose one-mask-for-all-examples convention
    a batched forward cannot reproduce).

    Squared norms are computed chunk by chunk over the examples (same limits and out-of-memory halving
    as the vmap path), in the measurement dtype; the Gram matrix in float64 from the captured layer
    quantities (so it carries no float32 summation error), in one batch of every example. That batch is
    sized by a trial on a few examples (the bytes per example of the captured layer inputs and output
    gradients plus the largest layer's im2col form): ``None`` when the whole probe set would exceed
    ``per_example_max_memory`` or runs out of memory.
    """
    from sgdprobe.linalg.ghost import per_example_losses

    _check_per_example(snapshot)

    def losses(out, y):
        return per_example_losses(snapshot.loss_fn, out, y)

    return _ghost_chunks(snapshot, losses, gram=gram, dtype=torch.float64 if gram else None)


def _ghost_one(
    snapshot, start: int, stop: int, per_example_loss, *, gram: bool = False, dtype=None, footprint=None
):
    """:func:`ghost_sq_norms_and_gram` on examples start..stop−1 with ``per_example_loss(outputs,
    targets) -> (b,)``; raises :class:`GhostUnsupported` where the ghost path does not apply. With a
    ``footprint`` list, appends the bytes per example the call held: the ghost module's own count plus
    what autograd saved for the backward (activations), parameters and buffers excepted."""
    from sgdprobe.linalg.ghost import GhostUnsupported, ghost_sq_norms_and_gram

    if _dropout_active(snapshot.model):
        raise GhostUnsupported("dropout is active (a batched forward draws one mask per example)")
    frozen = {k: p.detach() for k, p in snapshot.model.named_parameters() if k not in snapshot.params}
    tensors = {**frozen, **_params(snapshot), **{k: t.clone() for k, t in snapshot.buffers.items()}}
    itemsize = torch.empty((), dtype=snapshot.dtype).element_size()
    inputs, targets = _chunk(snapshot, start, stop)
    saved = _SavedBytes(tensors.values()) if footprint is not None else None
    with snapshot.isolated(), (saved or contextlib.nullcontext()):
        stats = ghost_sq_norms_and_gram(
            snapshot.model,
            tensors,
            snapshot._prepare_inputs(inputs),
            targets,
            per_example_loss,
            names=list(snapshot.params),
            gram=gram,
            max_elements=max(snapshot.config.per_example_max_memory // itemsize, 1),
            dtype=dtype,
            footprint=footprint,
        )
    if saved is not None:
        footprint[-1] += -(-saved.bytes // max(stop - start, 1))
    return stats


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for the backward while active (each storage once; the storages
    of ``excluded``, parameters and buffers, not at all)."""

    def __init__(self, excluded):
        self.bytes = 0
        seen = {t.untyped_storage().data_ptr() for t in excluded}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)


_GRAM_TRIAL = 8  # examples of the trial run that sizes a one-batch ghost Gram
# The trial's count misses transient buffers of the backward (e.g. attention's): hence a margin, which
# test_ghost_gram_trial_bounds_the_measured_peak checks against a profiled peak.
_GRAM_MARGIN = 1.5


def _ghost_chunks(snapshot, per_example_loss, *, gram: bool = False, dtype=None):
    """:func:`_ghost_one` over the chunks of :func:`run_chunked` (the Gram: all examples in one), or
    ``None`` where the ghost path does not apply."""
    from sgdprobe.linalg.ghost import GhostUnsupported

    n = snapshot.num_examples
    try:
        if gram:
            return _ghost_gram(snapshot, per_example_loss, dtype)
        parts = run_chunked(
            snapshot,
            n,
            2 * _num_params(snapshot),
            lambda a, b: _ghost_one(snapshot, a, b, per_example_loss, dtype=dtype),
            "per-example squared norms (ghost)",
        )
    except GhostUnsupported:
        return None
    return parts[0]._replace(sq_norms=torch.cat([p.sq_norms for p in parts]))


def _ghost_gram(snapshot, per_example_loss, dtype):
    """The ghost statistics with the Gram, in one batch of every example, or ``None`` (the caller then
    uses the vmap blocks) where that batch would not fit: more examples than ``per_example_chunk``
    (the user's cap, or one an earlier out-of-memory error set), or more than
    ``per_example_max_memory`` bytes by a trial on a few examples (activations saved by autograd,
    captured layer quantities in the statistics' dtype, the largest im2col form, the Gram's row). An
    out-of-memory error halves ``per_example_chunk`` for later measurements, as :func:`run_chunked`
    does."""
    config, n = snapshot.config, snapshot.num_examples
    if config.per_example_chunk is not None and config.per_example_chunk < n:
        return None
    try:
        if n > _GRAM_TRIAL:  # (a probe set this small is its own trial)
            footprint: list[int] = []
            _ghost_one(snapshot, 0, _GRAM_TRIAL, per_example_loss, dtype=dtype, footprint=footprint)
            if _GRAM_MARGIN * n * (footprint[0] + 8 * n) > config.per_example_max_memory:
                return None
        return _ghost_one(snapshot, 0, n, per_example_loss, gram=True, dtype=dtype)
    except Exception as exc:
        if not is_oom(exc):
            raise
        _free_memory(snapshot.device)
        config.per_example_chunk = max(1, n // 2)
        return None


def _products(left: torch.Tensor, right: torch.Tensor, rows: int) -> torch.Tensor:
    """left @ rightᵀ accumulated in float64, ``rows`` rows of ``left`` at a time."""
    right = right.to(torch.float64)
    return torch.cat([left[i : i + rows].to(torch.float64) @ right.T for i in range(0, left.shape[0], rows)])


def per_example_gram(snapshot, gradients: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n) Gram matrix ⟨g_i, g_j⟩ (MATH.md §4, Gram trick), accumulated in float64: its small
    eigenvalues then carry only the rounding of the gradients themselves (relative error ≈ ε·√(λ_max/λ)
    for an eigenvalue λ, ε of the measurement dtype) instead of ε·λ_max/λ from a float32 product.

    From ``gradients`` (n, P) when given; otherwise block by block, recomputing the gradients of one
    chunk against every later chunk, so that at most two chunks of gradients are held at once (about
    k²/2 gradient passes for k chunks: the price of bounded memory).
    """
    n, P = snapshot.num_examples, _num_params(snapshot)
    if gradients is not None:
        return _products(gradients, gradients, chunk_size(snapshot, 2 * P))
    _check_per_example(snapshot)
    bounds: list[tuple[int, int]] = []

    def diagonal(a, b):
        rows = _grads_chunk(snapshot, a, b)
        bounds.append((a, b))
        return _products(rows, rows, b - a)

    blocks = run_chunked(snapshot, n, 6 * P, diagonal, "per-example Gram matrix")
    gram = torch.zeros(n, n, dtype=torch.float64, device=snapshot.device)
    for (a, b), block in zip(bounds, blocks):
        gram[a:b, a:b] = block
    for i, (a, b) in enumerate(bounds[:-1]):
        left = _grads_chunk(snapshot, a, b)
        for c, d in bounds[i + 1 :]:
            block = _products(left, _grads_chunk(snapshot, c, d), b - a)
            gram[a:b, c:d] = block
            gram[c:d, a:b] = block.T
    return gram


# ----------------------------------------------------------------------------- Gauss–Newton traces
def _single_output(z: Any) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise MeasurementError(
            f"the Gauss–Newton trace needs the model to return one tensor of outputs, got {type(z).__name__}"
        )
    return z


def gauss_newton_trace_exact(snapshot) -> torch.Tensor:
    """(n,) exact tr(G_i) = tr(J_iᵀ H_{z,i} J_i), G_i the Gauss–Newton matrix of ℓ_i (MATH.md §0, §2.4).

    H_{z,i} = ∇²_z loss_fn(z_i, y_i) (C×C, C = outputs per example, by ``torch.func.hessian``) is factored
    H_z = L Lᵀ (eigh, negative rounding clipped), and tr(G_i) = Σ_c ||J_iᵀ L[:, c]||²: for models the
    ghost identity covers, C batched passes of per-example squared norms of ∇_θ⟨z_i, L_i[:, c]⟩
    (:mod:`sgdprobe.linalg.ghost`); otherwise one vector-Jacobian product per column and example.
    G's constants follow ``loss_fn`` on one example: ``MSELoss()`` gives H_z = (2/C) I, ½||z − y||²
    gives I.
    """
    _check_per_example(snapshot)
    ghost = _gauss_newton_trace_ghost(snapshot)
    if ghost is not None:
        return ghost
    params = _params(snapshot)
    names = list(params)
    loss_fn = snapshot.loss_fn

    def one(x_i, y_i):
        z, pullback = vjp(lambda p: _single_output(snapshot.example_output(p, x_i)), params)
        y1 = _unsqueeze(y_i)
        h = hessian(lambda zz: loss_fn(zz, y1))(z.detach())
        m = z.numel()
        w, U = torch.linalg.eigh(h.reshape(m, m))
        L = U * w.clamp(min=0).sqrt()

        def row_sq(u):
            g = pullback(u.reshape(z.shape))[0]
            return sum(g[k].square().sum() for k in names)

        return vmap(row_sq)(L.T).sum()

    def chunk(a, b):
        inputs, targets = _chunk(snapshot, a, b)
        with snapshot.isolated():
            return vmap(one, randomness="same")(inputs, targets)

    C = _outputs_per_example(snapshot)
    width = (C + 2) * _num_params(snapshot)
    return torch.cat(run_chunked(snapshot, snapshot.num_examples, width, chunk, "Gauss–Newton trace"))


def _output_hessian_factors(snapshot, z: torch.Tensor, targets: Any) -> torch.Tensor:
    """(b, m, m) factors L_i with L_i L_iᵀ = ∇²_z loss_fn(z_i, y_i) on one example (its PSD part).

    By plain autograd on the batch (ℓ_i depends on z_i alone, so row c of every H_{z,i} is the gradient
    of Σ_i ∂ℓ_i/∂z_{i,c}): m small backwards. ``torch.func.hessian`` gives the same values but its first
    call in a process costs ~0.3 s of set-up, paid by the first measurement."""
    from sgdprobe.linalg.ghost import per_example_losses

    b, m = z.shape[0], z[0].numel()
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = per_example_losses(snapshot.loss_fn, zz, targets)
        (g,) = torch.autograd.grad(losses.sum(), zz, create_graph=True)
        g = g.reshape(b, m)
        rows = [
            torch.autograd.grad(g[:, c].sum(), zz, retain_graph=True, materialize_grads=True)[0].reshape(b, m)
            if g.requires_grad
            else torch.zeros_like(g)
            for c in range(m)
        ]
    h = torch.stack(rows, 1).detach()
    w, U = torch.linalg.eigh(0.5 * (h + h.transpose(1, 2)))
    return U * w.clamp(min=0).sqrt().unsqueeze(1)


def _gauss_newton_trace_ghost(snapshot) -> torch.Tensor | None:
    """Exact tr(G_i) by the ghost identity (``None`` where it does not apply): per chunk, one batched
    forward for the outputs z and the factors L_i of H_{z,i}, then for each column c the per-example
    squared gradient norms of ⟨z_i, L_i[:, c]⟩ (L constant), summed over c."""
    from sgdprobe.linalg.ghost import GhostUnsupported

    def chunk(a, b):
        inputs, targets = _chunk(snapshot, a, b)
        with torch.no_grad():
            z = snapshot.forward(None, inputs)
        if not isinstance(z, torch.Tensor):
            raise GhostUnsupported("the model returns more than one tensor")
        L = _output_hessian_factors(snapshot, z, targets)
        total = torch.zeros(b - a, dtype=snapshot.dtype, device=snapshot.device)
        for c in range(L.shape[2]):
            w = L[:, :, c]
            total += _ghost_one(
                snapshot, a, b, lambda out, y, w=w: (out.reshape(w.shape[0], -1) * w).sum(1)
            ).sq_norms
        return total

    try:
        parts = run_chunked(
            snapshot, snapshot.num_examples, 2 * _num_params(snapshot), chunk, "Gauss–Newton trace (ghost)"
        )
    except GhostUnsupported:
        return None
    return torch.cat(parts)


def gauss_newton_trace_sampled(snapshot, samples: int = 1, seed: int | None = None) -> torch.Tensor:
    """(n,) unbiased estimates of tr(G_i) by sampled labels (Bartlett; MATH.md §2.6): ŷ_i ~ softmax(z_i),
    ĝ_i = ∇_θ ℓ(z_i, ŷ_i), E||ĝ_i||² = tr(G_i); the mean of ``samples`` independent draws per example.

    One backward per example and draw, whatever the number of classes C. Valid only when ``loss_fn`` on
    one example is −log softmax(z)_y (cross-entropy without label smoothing or class weights), with
    outputs of shape (1, C): this is checked on every draw, and a mismatch raises
    :class:`MeasurementError` (use the exact estimator then). Labels are drawn with a private
    ``torch.Generator`` seeded from ``seed`` (default: the snapshot's seed), never the global RNG.
    """
    _check_per_example(snapshot)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator().manual_seed(int(snapshot.seed if seed is None else seed) % (2**63))
    params = _params(snapshot)

    def chunk(a, b):
        inputs, _ = _chunk(snapshot, a, b)
        with torch.no_grad(), snapshot.isolated():
            z = vmap(lambda x: snapshot.example_output(params, x), randomness="same")(inputs)
        z = _single_output(z)
        if z.dim() != 3 or z.shape[1] != 1:
            raise MeasurementError(
                f"the sampled-label Gauss–Newton estimator needs class logits of shape (batch, C), got "
                f"per-example outputs {tuple(z.shape[1:])}; use estimator='exact'"
            )
        logp = torch.log_softmax(z[:, 0].to(torch.float64), dim=-1)
        labels = torch.multinomial(logp.exp().cpu(), samples, replacement=True, generator=generator)
        labels = labels.to(z.device)
        total = torch.zeros(b - a, dtype=snapshot.dtype, device=snapshot.device)
        for s in range(samples):
            y_hat = labels[:, s]
            sq_norms, values = _sampled_sq_norms(snapshot, a, b, inputs, y_hat, z)
            nll = -logp.gather(1, y_hat[:, None])[:, 0]
            # rounding of a float32 log-softmax grows with the logits: tolerate it, not a wrong constant
            tol = 1e-3 * nll.abs() + 100 * torch.finfo(z.dtype).eps * (1 + z[:, 0].abs().amax(-1).double())
            diff = (values.to(torch.float64).reshape(-1) - nll).abs()
            if (diff > tol).any():
                raise MeasurementError(
                    "the sampled-label (Bartlett) estimator needs loss_fn(z, y) = -log softmax(z)[y] on one "
                    "example (cross-entropy, mean or sum, without label smoothing or class weights); this "
                    f"loss_fn differs (by up to {float(diff.max()):.3g}). "
                    "Use estimator='exact'."
                )
            total += sq_norms
        return total / samples

    P = _num_params(snapshot)
    return torch.cat(run_chunked(snapshot, snapshot.num_examples, 2 * P, chunk, "sampled Gauss–Newton trace"))


def _sampled_sq_norms(snapshot, a: int, b: int, inputs: Any, y_hat: torch.Tensor, z: torch.Tensor):
    """(||∇_θ ℓ(z_i, ŷ_i)||², ℓ(z_i, ŷ_i)) for examples a..b−1 with labels ``y_hat``: by the ghost identity
    where it applies (the losses from the outputs ``z`` already computed), else by ``vmap(grad)``."""
    from sgdprobe.linalg.ghost import GhostUnsupported, per_example_losses

    try:
        stats = _ghost_one(snapshot, a, b, lambda out, _: per_example_losses(snapshot.loss_fn, out, y_hat))
        return stats.sq_norms, per_example_losses(snapshot.loss_fn, z[:, 0], y_hat)
    except GhostUnsupported:
        pass
    params = _params(snapshot)
    with snapshot.isolated():
        g, values = vmap(grad_and_value(snapshot.example_loss), in_dims=(None, 0, 0), randomness="same")(
            params, inputs, y_hat
        )
    return _rows(g, list(params)).square().sum(1), values


def _outputs_per_example(snapshot) -> int:
    inputs, _ = _chunk(snapshot, 0, 1)
    with torch.no_grad():
        z = snapshot.forward(None, inputs)
    return max(1, _single_output(z).numel())


def _unsqueeze(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.unsqueeze(0))


# ----------------------------------------------------------------------------- curvature forms
FORMS_METHODS = ("auto", "batched", "vmap")


def per_example_quadratic_forms(snapshot, V: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """(n, r, r) the matrices Vᵀ H_i V, H_i = ∇²_θ ℓ_i the Hessian of example i's loss, for a (P, r)
    matrix ``V`` of flat directions (a (P,) vector is taken as r = 1). Symmetrized.
    mean_i Vᵀ H_i V = Vᵀ H V for a mean-reduced loss without dropout.

    Two exact methods, both reverse-over-reverse only (forward-mode second derivatives are wrong through
    LayerNorm on torch 2.13, BENCHMARKS.md §2):

    - ``"batched"``: with weights u on the examples, v_jᵀ (Σ_i u_i H_i) v_k is linear in u, so its
      gradient in u is (v_jᵀ H_i v_k)_i for all examples at once: one batched forward, a kept gradient
      graph, one Hessian-vector product per column and one backward per pair j ≤ k, on the whole chunk.
      No per-example vector is formed (20× faster than ``"vmap"`` on a 26k-parameter MLP).
    - ``"vmap"``: ``vmap`` over examples of a double backward, one column at a time (per-example
      Hessian-vector products, a chunk of P-vectors per example).

    ``"auto"`` takes ``"batched"`` unless dropout is active (a batched forward draws one mask per
    example, ``vmap`` one for all, the convention of every per-example quantity here), an op lacks a
    third derivative, or the batched per-example losses differ from the one-example ones (a forward
    that mixes examples): then ``"vmap"``.
    """
    _check_per_example(snapshot)
    if method not in FORMS_METHODS:
        raise ValueError(f"method must be one of {FORMS_METHODS}, got {method!r}")
    P = _num_params(snapshot)
    V = V.detach().to(device=snapshot.device, dtype=snapshot.dtype)
    if V.dim() == 1:
        V = V[:, None]
    if V.dim() != 2 or V.shape[0] != P:
        raise ValueError(
            f"V must be (P, r) with P = {P} (the number of probed parameters), got {tuple(V.shape)}"
        )
    if method == "batched" or (method == "auto" and not _dropout_active(snapshot.model)):
        try:
            return torch.cat(
                run_chunked(
                    snapshot,
                    snapshot.num_examples,
                    2 * P,
                    lambda a, b: _forms_batched(snapshot, V, a, b),
                    "per-example Hessian forms",
                )
            )
        except _BatchedUnavailable:
            if method == "batched":
                raise
    return torch.cat(
        run_chunked(
            snapshot,
            snapshot.num_examples,
            4 * P,
            lambda a, b: _forms_vmap(snapshot, V, a, b),
            "per-example Hessian forms",
        )
    )


class _BatchedUnavailable(MeasurementError):
    """The batched per-example forms do not apply to this model; use ``vmap``."""


def _forms_batched(snapshot, V: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    from sgdprobe.linalg.ghost import per_example_losses

    names = list(snapshot.params)
    leaves = [snapshot.params[k].detach().requires_grad_(True) for k in names]
    tangents = [list(snapshot.unflatten(V[:, k]).values()) for k in range(V.shape[1])]
    inputs, targets = _chunk(snapshot, start, stop)
    r = V.shape[1]

    def dot(xs, ys):
        return sum((x * y).sum() for x, y in zip(xs, ys))

    try:
        with torch.enable_grad():
            losses = per_example_losses(
                snapshot.loss_fn, snapshot.forward(dict(zip(names, leaves)), inputs), targets
            )
            _check_batched_losses(snapshot, losses.detach(), inputs, targets)
            u = torch.ones_like(losses, requires_grad=True)
            g = torch.autograd.grad((u * losses).sum(), leaves, create_graph=True, materialize_grads=True)
            Q = losses.new_zeros(stop - start, r, r)
            for k in range(r):
                hv = torch.autograd.grad(
                    dot(g, tangents[k]), leaves, create_graph=True, materialize_grads=True
                )
                for j in range(k, r):
                    (col,) = torch.autograd.grad(
                        dot(hv, tangents[j]), u, retain_graph=True, materialize_grads=True
                    )
                    Q[:, j, k] = Q[:, k, j] = col
    except (NotImplementedError, RuntimeError) as exc:
        if is_oom(exc):
            raise
        raise _BatchedUnavailable(f"batched per-example Hessian forms: {type(exc).__name__}: {exc}") from exc
    return Q.detach()


def _check_batched_losses(snapshot, losses: torch.Tensor, inputs: Any, targets: Any) -> None:
    """The batched forward's per-example losses must be the one-example losses (else the forward
    mixes examples and batched per-example derivatives are not those of ℓ_i)."""
    params = _params(snapshot)
    with torch.no_grad(), snapshot.isolated():
        alone = vmap(snapshot.example_loss, in_dims=(None, 0, 0), randomness="same")(params, inputs, targets)
    tol = torch.finfo(losses.dtype).eps ** 0.5 * (1 + alone.abs())
    if losses.shape != alone.shape or ((losses - alone).abs() > tol).any():
        raise _BatchedUnavailable("the batched per-example losses differ from the one-example losses")


def _forms_vmap(snapshot, V: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    params = _params(snapshot)
    names = list(params)
    tangents = [snapshot.unflatten(V[:, k]) for k in range(V.shape[1])]

    def hvp_one(x_i, y_i, t):
        def g(p):
            return grad(snapshot.example_loss)(p, x_i, y_i)

        return grad(lambda p: sum((g(p)[k] * t[k]).sum() for k in names))(params)

    inputs, targets = _chunk(snapshot, start, stop)
    cols = []
    for t in tangents:
        with snapshot.isolated():
            hv = vmap(hvp_one, in_dims=(0, 0, None), randomness="same")(inputs, targets, t)
        cols.append(_rows(hv, names) @ V)  # (b, r): row k of Vᵀ H_i V
    Q = torch.stack(cols, dim=2)  # Q[i, j, k] = v_jᵀ H_i v_k
    return 0.5 * (Q + Q.transpose(1, 2))


def _dropout_active(model: torch.nn.Module) -> bool:
    return any(
        isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules()
    )


# ----------------------------------------------------------------------------- mini-batch gradients
def minibatch_gradients(snapshot, batch_size: int, num_batches: int, seed: int | None = None) -> torch.Tensor:
    """(L, P) gradients of :meth:`Snapshot.loss` on L = ``num_batches`` disjoint mini-batches of
    ``batch_size`` = M probe examples drawn without replacement (one random permutation from a private
    generator), for Jastrzebski et al.'s mini-batch estimator (MATH.md §4, App. C). One backward per
    mini-batch on the whole mini-batch, so it works when the forward mixes examples (BatchNorm)."""
    n = snapshot.num_examples
    if batch_size < 1 or num_batches < 2 or batch_size * num_batches > n:
        raise MeasurementError(
            f"{num_batches} disjoint mini-batches of {batch_size} need {num_batches * batch_size} probe "
            f"examples (and at least 2 batches): the probe data has {n}. "
            "Pass more probe data or use smaller sizes."
        )
    generator = torch.Generator().manual_seed(int(snapshot.seed if seed is None else seed) % (2**63))
    perm = torch.randperm(n, generator=generator).to(snapshot.device)
    inputs, targets = snapshot.examples()
    names = list(snapshot.params)
    rows = []
    for l in range(num_batches):
        idx = perm[l * batch_size : (l + 1) * batch_size]
        leaves = {k: p.detach().requires_grad_(True) for k, p in snapshot.params.items()}
        with torch.enable_grad():
            loss = snapshot.loss(leaves, batches=[(_select(inputs, idx), _select(targets, idx))])
            grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(leaves[k]) if g is None else g).reshape(-1) for k, g in zip(names, grads)]
            )
        )
    return torch.stack(rows)
