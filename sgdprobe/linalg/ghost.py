"""Per-example gradient squared norms and Gram matrix without per-example gradients ("ghost norm").

For a layer whose per-example weight gradient is ``G_i = Σ_t b_{i,t} a_{i,t}ᵀ`` (``a`` its input, ``b`` the
gradient of the loss w.r.t. its output, ``t`` over sequence or spatial positions), the per-example
squared norms and the Gram matrix follow from ``a`` and ``b`` alone:

- ``||G_i||² = ⟨A_i A_iᵀ, B_i B_iᵀ⟩`` (``||a_i||²·||b_i||²`` with one position), and
  ``⟨G_i, G_j⟩ = ⟨A_i A_jᵀ, B_i B_jᵀ⟩``: Goodfellow 2015, "Efficient per-example gradient computations"
  (arXiv:1510.01799); Li et al. 2022, "Large language models can be strong differentially private
  learners" (ICLR, ghost clipping); Bu et al. 2023, "Differentially private optimization on large model
  at small cost" (ICML, mixed ghost clipping: per layer, the cheaper of the ghost identity, O(T²(p+q)),
  and materializing ``G_i = B_iᵀ A_i``, O(T p q)).
- Conv1d/Conv2d are Linear layers on the unfolded input (``torch.nn.functional.unfold``); Embedding
  gradients are row scatters of ``b``; LayerNorm/GroupNorm/RMSNorm gradients are small and materialized.

One forward (module hooks capture ``a``; tensor hooks capture ``b``) and one backward of ``Σ_i ℓ_i`` that
only goes down to the layer outputs (no weight gradient is formed), so ``b`` is per-example exactly
when no module mixes the examples of the batch. Anything this cannot see raises
:class:`GhostUnsupported`, on which the caller falls back to ``vmap(grad)``.

Call from a :class:`sgdprobe.snapshot.Snapshot` (per-example gradients of ``loss_fn`` on one example, as
:meth:`Snapshot.example_loss` defines them; ``params`` the stepped parameters, frozen ones constants)::

    tensors = {**frozen_params, **snapshot.params, **{n: b.clone() for n, b in snapshot.buffers.items()}}
    inputs, targets = snapshot.examples()
    with snapshot.isolated():
        try:
            sq_norms, gram = ghost_sq_norms_and_gram(
                snapshot.model, tensors, inputs, targets,
                lambda out, y: per_example_losses(snapshot.loss_fn, out, y),
                names=list(snapshot.params), gram=True,
            )
        except GhostUnsupported:
            ...  # torch.func.vmap(torch.func.grad(snapshot.example_loss)) instead
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

Method = Literal["auto", "ghost", "materialize"]
_RMSNorm = getattr(nn, "RMSNorm", None)
_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d)
_NORM = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, _RMSNorm) if t is not None)
SUPPORTED: tuple[type[nn.Module], ...] = (*_LINEAR, *_CONV, nn.Embedding, *_NORM)
"""Module types handled exactly (matched by exact type: a subclass may change ``forward``)."""


class GhostUnsupported(RuntimeError):
    """The model (or this call) is outside what the ghost path computes exactly; use ``vmap(grad)``.

    :ivar modules: names of the offending modules or parameters.
    """

    def __init__(self, reason: str, modules: Iterable[str] = ()):
        self.modules = list(modules)
        super().__init__(f"{reason}: {', '.join(self.modules)}" if self.modules else reason)


class PerExampleStats(NamedTuple):
    """``sq_norms[i] = ||g_i||²`` and ``gram[i, j] = ⟨g_i, g_j⟩`` (``None`` unless asked for), where
    ``g_i`` is the gradient of example ``i``'s loss w.r.t. the selected parameters."""

    sq_norms: Tensor
    gram: Tensor | None


def per_example_losses(loss_fn: Callable[[Any, Any], Tensor], outputs: Any, targets: Any) -> Tensor:
    """``[loss_fn(out_i[None], y_i[None]) for i]`` as one ``(n,)`` tensor, by ``torch.func.vmap``.

    Each example is a batch of one, so every constant of the user's loss is kept (mean vs. sum, MSE's
    mean over outputs), as in :meth:`sgdprobe.snapshot.Snapshot.example_loss`. The common losses
    (:func:`_unreduced`) are computed unreduced instead, with the same values and without vmap's
    per-call cost (BENCHMARKS.md §3).
    """
    unreduced = _unreduced(loss_fn, outputs, targets)
    if unreduced is not None:
        return unreduced

    def one(out, y):
        return loss_fn(_tree_map(lambda t: t.unsqueeze(0), out), _tree_map(lambda t: t.unsqueeze(0), y))

    return torch.func.vmap(one)(outputs, targets)


def _unreduced(loss_fn: Callable[[Any, Any], Tensor], out: Any, y: Any) -> Tensor | None:
    """Per-example losses of ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` (class weights unset) on
    ``(n, C)`` outputs, and of ``F.mse_loss`` / ``nn.MSELoss``, by ``reduction="none"``: for a batch of
    one, "mean" and "sum" of cross-entropy are the example's loss, and MSE's are the mean and sum over the
    example's outputs. An ignored target (``ignore_index``) gives NaN under "mean" (a batch of one made
    only of it has a mean of 0/0) and 0 under "sum", as the user's loss would. ``None`` for anything
    else: the caller then uses vmap over batches of one."""
    if not (isinstance(out, Tensor) and isinstance(y, Tensor)) or out.dim() < 1 or out.shape[0] != y.shape[0]:
        return None
    module = loss_fn if isinstance(loss_fn, nn.modules.loss._Loss) else None
    if module is not None and type(module) not in (nn.CrossEntropyLoss, nn.MSELoss):
        return None
    if module is not None and module.reduction not in ("mean", "sum"):
        return None
    reduction = "mean" if module is None else module.reduction
    if loss_fn is F.cross_entropy or type(module) is nn.CrossEntropyLoss:
        if out.dim() != 2 or (module is not None and module.weight is not None):
            return None
        ignore_index = -100 if module is None else module.ignore_index
        smoothing = 0.0 if module is None else module.label_smoothing
        losses = F.cross_entropy(
            out, y, reduction="none", ignore_index=ignore_index, label_smoothing=smoothing
        )
        if reduction == "mean" and not y.is_floating_point():  # an ignored target: the mean of nothing
            losses = torch.where(y == ignore_index, torch.full_like(losses, float("nan")), losses)
        return losses
    if loss_fn is F.mse_loss or type(module) is nn.MSELoss:
        if out.shape != y.shape:
            return None
        per_element = F.mse_loss(out, y, reduction="none").reshape(out.shape[0], -1)
        return per_element.mean(1) if reduction == "mean" else per_element.sum(1)
    return None


def check_supported(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, nn.Module, str]]:
    """``{param name: (module name, module, attribute)}`` for the selected parameters, or
    :class:`GhostUnsupported` if one is owned by a module type not in :data:`SUPPORTED`, is shared by
    several modules, or if a module mixes the examples of a batch (BatchNorm in train mode)."""
    owners: dict[str, tuple[str, nn.Module, str]] = {}
    seen: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            seen.setdefault(id(p), []).append(full)
            owners.setdefault(full, (mod_name, module, attr))
    missing = [n for n in names if n not in owners]
    if missing:
        raise ValueError(f"not parameters of the model: {missing}")
    shared = [n for n in names if len(seen[id(owners[n][1]._parameters[owners[n][2]])]) > 1]
    if shared:
        raise GhostUnsupported("parameters shared between modules (tied weights)", shared)
    bad = [
        f"{owners[n][0] or '<root>'} ({type(owners[n][1]).__name__}: {n})"
        for n in names
        if type(owners[n][1]) not in SUPPORTED or _unsupported_option(owners[n][1])
    ]
    if bad:
        raise GhostUnsupported("parameters owned by modules the ghost path does not handle", bad)
    mixing = [
        n or "<root>"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if mixing:
        raise GhostUnsupported("modules mix the examples of a batch", mixing)
    return {n: owners[n] for n in names}


def _unsupported_option(m: nn.Module) -> bool:
    if isinstance(m, _CONV):
        return m.groups != 1 or not hasattr(m, "_reversed_padding_repeated_twice")
    if isinstance(m, nn.Embedding):  # max_norm renormalizes in place; scale_grad_by_freq mixes examples
        return m.max_norm is not None or m.scale_grad_by_freq
    return False


def ghost_sq_norms_and_gram(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    per_example_loss: Callable[[Any, Any], Tensor],
    *,
    names: Sequence[str] | None = None,
    gram: bool = False,
    method: Method = "auto",
    max_elements: int = 2**24,
    dtype: torch.dtype | None = None,
    footprint: list[int] | None = None,
) -> PerExampleStats:
    """Per-example gradient squared norms (and Gram matrix if ``gram``) w.r.t. the parameters ``names``.

    :param model: the module, called as ``functional_call(model, tensors, inputs)``; its own parameters
        and buffers are never read where ``tensors`` has them, nor written.
    :param tensors: ``{name: tensor}`` for ``functional_call`` (parameters, cloned buffers); detached here.
    :param inputs: batch inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors.
    :param per_example_loss: ``(outputs, targets) -> (n,)`` losses, e.g. ``per_example_losses`` of the
        user's loss; the gradients are those of each entry, so they match
        ``∇θ loss_fn(model(x_i[None]), y_i[None])`` for :func:`per_example_losses`.
    :param names: the parameters differentiated (default: every parameter of the model); the others are
        constants. Every selected parameter must be owned by a module in :data:`SUPPORTED`.
    :param method: ``"auto"`` picks per layer the cheaper of the ghost identity and materialized layer
        gradients (by flop count); ``"ghost"``/``"materialize"`` force one (for tests and benchmarks).
    :param max_elements: largest intermediate (per chunk) in elements; the work is chunked over examples.
    :param dtype: the dtype of the statistics (default: the losses'). ``torch.float64`` on a float32
        model casts the captured layer inputs and output gradients up before any product, so a Gram
        matrix carries only their rounding, not that of float32 sums.
    :param footprint: if a list, the bytes per example the computation held are appended to it (every
        layer's captured input and output gradient, plus the largest layer's sequence form, im2col for
        a convolution, in ``dtype``): what a caller sizes a batch of examples by.
    :raises GhostUnsupported: see :func:`check_supported`; also when a selected parameter is used
        outside its module's forward, a layer sees a batch of another size than the loss, or a layer
        input is modified in place after the layer ran. Nothing is left registered on the model.

    Run it inside the caller's RNG context (``Snapshot.isolated()``) so dropout masks are fixed: they are
    those of one batched forward.
    """
    names = [n for n, _ in model.named_parameters()] if names is None else list(names)
    footprint = [] if footprint is None else footprint
    owners = check_supported(model, names)
    tensors = {k: v.detach() for k, v in tensors.items()}
    by_module: dict[int, _Layer] = {}
    for name, (_, module, attr) in owners.items():
        layer = by_module.setdefault(id(module), _Layer(module, owners[name][0]))
        layer.attrs.append(attr)
    capture = _Capture(by_module)
    used = {n: tensors[n] if n in tensors else getattr(owners[n][1], owners[n][2]) for n in names}
    guard = _UsageGuard({id(t): (n, id(owners[n][1])) for n, t in used.items()})
    handles = [
        model.register_forward_pre_hook(guard.enter_root),
        model.register_forward_hook(guard.exit_root, always_call=True),
    ]
    try:
        for layer in by_module.values():
            handles.append(layer.module.register_forward_pre_hook(guard.enter))
            handles.append(layer.module.register_forward_hook(guard.exit, always_call=True))
            handles.append(layer.module.register_forward_hook(capture.hook, with_kwargs=True))
        with torch.enable_grad():
            with guard:
                outputs = functional_call(
                    model, tensors, *_args_kwargs(_tree_map(Tensor.detach, inputs)), strict=False
                )
            losses = per_example_loss(outputs, targets)
            if losses.dim() != 1:
                raise ValueError(f"per_example_loss must return (n,) losses, got shape {tuple(losses.shape)}")
            if guard.violations:
                raise GhostUnsupported(
                    "selected parameters used outside their module's forward", sorted(guard.violations)
                )
            anchors = list(capture.anchors.values())
            if anchors and losses.requires_grad:
                torch.autograd.grad(losses.sum(), anchors, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    n = losses.shape[0]
    if dtype is None:
        dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
    sq = torch.zeros(n, dtype=dtype, device=losses.device)
    G = torch.zeros(n, n, dtype=dtype, device=losses.device) if gram else None
    held, largest, itemsize = 0, 0, torch.empty((), dtype=dtype).element_size()

    def nbytes(t: Tensor) -> int:  # floating layer quantities are cast to ``dtype`` before products
        return t.numel() * (max(t.element_size(), itemsize) if t.is_floating_point() else t.element_size())

    for layer in by_module.values():
        layer.check(n)
        held += sum(nbytes(a) for a, _ in layer.inputs if isinstance(a, Tensor))
        held += sum(nbytes(b) for b in layer.grads if b is not None)
        for part_sq, part_gram in _layer_stats(layer, n, gram, method, max_elements, dtype):
            sq += part_sq.to(dtype)
            if G is not None:
                G += part_gram.to(dtype)
        largest = max(largest, layer.sequence_elements * itemsize)
    footprint.append(-(-(held + largest) // max(n, 1)))
    return PerExampleStats(sq, G)


# ----------------------------------------------------------------------------------- capture


@dataclass
class _Layer:
    module: nn.Module
    name: str
    attrs: list[str] = field(default_factory=list)
    inputs: list[tuple[Tensor, int]] = field(default_factory=list)  # (a, version at capture)
    grads: list[Tensor | None] = field(default_factory=list)
    sequence_elements: int = 0  # set by _layer_stats: elements of its (A, B) sequence form

    def check(self, n: int) -> None:
        for a, version in self.inputs:
            if a._version != version:
                raise GhostUnsupported("layer inputs modified in place after the layer ran", [self.name])
            if a.dim() == 0 or a.shape[0] != n:
                raise GhostUnsupported(f"layers see batches of another size than the loss ({n})", [self.name])


class _Capture:
    """Forward hooks: keep each call's input ``a``; make its output part of the graph (adding a zero
    leaf if nothing upstream requires grad) and register a tensor hook keeping ``b``."""

    def __init__(self, layers: dict[int, _Layer]):
        self.layers = layers
        self.anchors: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        layer = self.layers[id(module)]
        a = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(a, Tensor) or not isinstance(output, Tensor):
            raise GhostUnsupported("layers called without a tensor input and output", [layer.name])
        if not torch.is_grad_enabled() or not output.is_floating_point():
            return None  # no gradient flows through this call
        a = a.detach()
        layer.inputs.append((a, a._version))
        layer.grads.append(None)
        slot = len(layer.grads) - 1
        replaced = None
        if not output.requires_grad:
            key = (output.dtype, output.device)
            if key not in self.anchors:
                self.anchors[key] = output.new_zeros(()).requires_grad_(True)
            output = replaced = output + self.anchors[key]

        def keep(grad: Tensor) -> None:
            layer.grads[slot] = grad

        output.register_hook(keep)  # fires with the gradient of this version even if later changed in place
        return replaced


class _UsageGuard(TorchFunctionMode):
    """Records selected parameters consumed by a torch op while their module's forward is not running
    (e.g. ``F.linear(x, self.fc.weight)`` in a parent's forward), which module hooks would not see."""

    def __init__(self, params: dict[int, tuple[str, int]]):
        super().__init__()
        self.params = params  # id(tensor) -> (parameter name, id(owner module))
        self.active: dict[int, int] = {}
        self.in_root = 0
        self.violations: set[str] = set()

    def enter_root(self, module, args):
        self.in_root += 1

    def exit_root(self, module, args, output):
        self.in_root -= 1

    def enter(self, module, args):
        self.active[id(module)] = self.active.get(id(module), 0) + 1

    def exit(self, module, args, output):
        self.active[id(module)] -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_root and any(True for _ in _flat_tensors(out)):
            for t in _flat_tensors((args, kwargs)):
                name, owner = self.params.get(id(t), (None, None))
                if name is not None and not self.active.get(owner, 0):
                    self.violations.add(name)
        return out


# ----------------------------------------------------------------------------------- per-layer maths


def _layer_stats(layer: _Layer, n: int, gram: bool, method: Method, budget: int, dtype: torch.dtype):
    """Yield ``(sq (n,), gram (n, n) or None)`` contributions of one module's selected parameters,
    computed in ``dtype`` (floating inputs and output gradients cast first)."""
    m, attrs = layer.module, set(layer.attrs)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    pairs = [(cast(a), cast(b)) for (a, _), b in zip(layer.inputs, layer.grads) if b is not None]
    if not pairs:
        return
    if isinstance(m, _NORM):
        yield _materialized([_norm_grads(m, a, b, attrs) for a, b in pairs], gram)
        return
    if isinstance(m, nn.Embedding):
        idx = _cat([a.reshape(n, -1) for a, _ in pairs])
        B = _cat([b.reshape(n, -1, m.embedding_dim) for _, b in pairs])
        if m.padding_idx is not None:
            B = B.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0)
        yield _embedding_stats(idx, B, m.num_embeddings, gram, method, budget)
        return
    A_parts, B_parts = zip(*(_as_sequences(m, a, b, n) for a, b in pairs))
    A, B = _cat(A_parts), _cat(B_parts)
    layer.sequence_elements = A.numel() + B.numel()
    if "weight" in attrs:
        yield _linear_stats(A, B, gram, method, budget)
    if "bias" in attrs:
        yield _materialized([B.sum(1)], gram)


def _as_sequences(m: nn.Module, a: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(A (n, T, p), B (n, T, q))`` with the per-example weight gradient ``B_iᵀ A_i`` (flattened)."""
    if isinstance(m, nn.Linear):
        return a.reshape(n, -1, m.in_features), b.reshape(n, -1, m.out_features)
    D = a.dim() - 2
    if D != (1 if isinstance(m, nn.Conv1d) else 2):
        raise GhostUnsupported("convolutions on unbatched inputs", [type(m).__name__])
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    return _im2col(a, m.kernel_size, m.dilation, m.stride), b.reshape(n, m.out_channels, -1).transpose(1, 2)


def _im2col(a: Tensor, kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Patches of ``a (n, C, *spatial)`` (already padded) as an ``(n, L, C·Πk)`` view, in the order of a
    conv weight's ``(C, *k)`` flattening; one strided copy (faster than ``F.unfold`` on CPU)."""
    n, C, D = a.shape[0], a.shape[1], a.dim() - 2
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        a = a.unfold(2 + i, d * (k - 1) + 1, s)  # (n, C, *out, *window)
    a = a[(..., *(slice(None, None, d) for d in dilation))]
    L = math.prod(a.shape[2 : 2 + D])
    # (n, C, *k, *out) copied with output positions innermost: long contiguous runs, 2x faster on CPU
    a = a.permute(0, 1, *range(2 + D, 2 + 2 * D), *range(2, 2 + D))
    return a.reshape(n, C * math.prod(kernel), L).transpose(1, 2)


def _cat(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate the calls of one module along positions (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)


def _linear_stats(A: Tensor, B: Tensor, gram: bool, method: Method, budget: int):
    """Squared norms and Gram of ``G_i = B_iᵀ A_i`` for ``A (n, T, p)``, ``B (n, T, q)``."""
    n, T, p = A.shape
    q = B.shape[2]
    if T == 1:
        a, b = A[:, 0], B[:, 0]
        return a.square().sum(1) * b.square().sum(1), (a @ a.T) * (b @ b.T) if gram else None
    if gram:
        if choose_materialize(n, T, p, q, gram=True, method=method):
            return _materialized_gram(A, B, budget)
        A2, B2 = A.reshape(n * T, p), B.reshape(n * T, q)
        return _blocked_gram(n, T, budget, lambda I, J: (A2[I] @ A2[J].T) * (B2[I] @ B2[J].T))
    sq = A.new_empty(n)
    if choose_materialize(n, T, p, q, gram=False, method=method):
        c = max(1, budget // (p * q))
        for s in range(0, n, c):
            sq[s : s + c] = torch.bmm(B[s : s + c].transpose(1, 2), A[s : s + c]).square().sum((1, 2))
    else:
        c = max(1, budget // (T * T))
        for s in range(0, n, c):
            Ai, Bi = A[s : s + c], B[s : s + c]
            sq[s : s + c] = ((Ai @ Ai.mT) * (Bi @ Bi.mT)).sum((1, 2))
    return sq, None


def _materialized_gram(A: Tensor, B: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Squared norms and Gram of ``G_i = B_iᵀ A_i``, formed for all examples at once but for blocks of
    its rows and columns (``n · |block| ≤ budget``): the Gram is the sum of the blocks' Grams."""
    n, _, p = A.shape
    q = B.shape[2]
    pc = max(1, min(p, budget // n))
    qc = max(1, min(q, budget // (n * pc)))
    sq, gram = A.new_zeros(n), A.new_zeros(n, n)
    for i in range(0, q, qc):
        Bt = B[:, :, i : i + qc].transpose(1, 2)
        for j in range(0, p, pc):
            G = torch.bmm(Bt, A[:, :, j : j + pc]).reshape(n, -1)
            sq += G.square().sum(1)
            gram += G @ G.T
    return sq, gram


def choose_materialize(n: int, T: int, p: int, q: int, *, gram: bool, method: Method = "auto") -> bool:
    """Whether materializing ``G_i`` (``T p q`` flops per example, plus ``n p q`` per example for the
    Gram) is cheaper than the ghost identity (``T²(p + q)`` per example, per pair for the Gram)."""
    if method != "auto":
        return method == "materialize"
    if gram:
        return n * T * p * q + n * n * p * q < n * n * T * T * (p + q)
    return T * p * q < T * T * (p + q)


def _blocked_gram(n: int, T: int, budget: int, block: Callable[[slice, slice], Tensor]):
    """Gram (and its diagonal) by blocks of examples: ``block(I, J)`` is the ``(|I| T, |J| T)`` matrix of
    position-pair terms for the flattened rows ``I``, ``J``; it is summed over positions."""
    c = max(1, int((budget / (T * T)) ** 0.5))
    gram = None
    for s in range(0, n, c):
        ni = min(n, s + c) - s
        for r in range(s, n, c):
            nj = min(n, r + c) - r
            blk = block(slice(s * T, (s + ni) * T), slice(r * T, (r + nj) * T)).view(ni, T, nj, T).sum((1, 3))
            if gram is None:
                gram = blk.new_empty(n, n)
            gram[s : s + ni, r : r + nj] = blk
            gram[r : r + nj, s : s + ni] = blk.T
    return gram.diagonal().clone(), gram


def _embedding_stats(idx: Tensor, B: Tensor, V: int, gram: bool, method: Method, budget: int):
    """Embedding table gradient of example ``i``: ``Σ_t e_{idx_it} b_itᵀ``. Squared norms by summing the
    ``b`` of repeated indices (O(nTd)); Gram by the ghost identity ``Σ_ts [idx_it = idx_js] b_it·b_js`` or
    by materializing the ``(n, V d)`` table gradients, whichever costs less."""
    n, T, d = B.shape
    key = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    flatB = B.reshape(-1, d)
    if not gram:
        uniq, inverse = torch.unique(key, return_inverse=True)
        rows = flatB.new_zeros(len(uniq), d).index_add_(0, inverse, flatB)
        return flatB.new_zeros(n).index_add_(0, uniq // V, rows.square().sum(1)), None
    dense = n * V * d + n * n * V * d < n * n * T * T * (d + 1)
    if (method == "materialize" or (method == "auto" and dense)) and n * V <= budget:
        dc = max(1, min(d, budget // (n * V)))  # table gradients by blocks of columns
        sq, gram = flatB.new_zeros(n), flatB.new_zeros(n, n)
        for j in range(0, d, dc):
            table = flatB.new_zeros(n * V, min(dc, d - j)).index_add_(0, key, flatB[:, j : j + dc])
            table = table.reshape(n, -1)
            sq += table.square().sum(1)
            gram += table @ table.T
        return sq, gram
    flat_idx = idx.reshape(-1)
    return _blocked_gram(
        n, T, budget, lambda I, J: (flatB[I] @ flatB[J].T) * (flat_idx[I].unsqueeze(1) == flat_idx[J])
    )


def _norm_grads(m: nn.Module, a: Tensor, b: Tensor, attrs: set[str]) -> Tensor:
    """Per-example ``[weight, bias]`` gradients of a LayerNorm/GroupNorm/RMSNorm, ``(n, k)``."""
    n = a.shape[0]
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
        w, bias = (b * xhat).reshape(n, m.num_channels, -1).sum(2), b.reshape(n, m.num_channels, -1).sum(2)
    else:
        shape = tuple(m.normalized_shape)
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, shape, None, None, m.eps)
        else:
            xhat = F.rms_norm(a, shape, None, m.eps)
        k = math.prod(shape)
        w, bias = (b * xhat).reshape(n, -1, k).sum(1), b.reshape(n, -1, k).sum(1)
    parts = [w] if "weight" in attrs else []
    return torch.cat(parts + ([bias] if "bias" in attrs else []), 1)


def _materialized(grads: Sequence[Tensor], gram: bool) -> tuple[Tensor, Tensor | None]:
    """Squared norms and Gram of small per-example gradients given as ``(n, k)`` matrices (summed over
    calls of the module)."""
    g = grads[0] if len(grads) == 1 else torch.stack(list(grads)).sum(0)
    return g.square().sum(1), g @ g.T if gram else None


# ----------------------------------------------------------------------------------- containers


def _tree_map(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    return obj


def _flat_tensors(obj: Any) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _flat_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _flat_tensors(v)


def _args_kwargs(inputs: Any) -> tuple[tuple, dict | None]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), None
    return (inputs,), None
