"""What a plugin sees at one measurement: a frozen view of the model, with shared work cached.

The snapshot never touches the live training state:

- parameters are detached (no copy unless the measurement dtype differs) and nothing writes to them;
- buffers are cloned inside every forward, so BatchNorm running statistics are never updated and
  train-mode BatchNorm uses batch statistics (the objective the optimizer steps on);
- every forward runs with the RNG seeded from (probe seed, step) inside ``fork_rng``, so dropout masks
  are the same at every evaluation within one measurement and the training RNG streams are untouched;
- attention runs under the math SDPA backend (fused kernels have no double backward) and autocast is
  off (measurements are in float32 unless the model is float64 or ``dtype=`` says otherwise).

Heavy shared work (Hessian eigenpairs, per-example gradients) is computed once per snapshot and
cached, so every plugin that needs it gets the same result from one run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import functional_call

from sgdprobe._tree import map_tensors
from sgdprobe.config import Batch, ProbeConfig, batch_len
from sgdprobe.errors import MeasurementError
from sgdprobe.linalg import per_example
from sgdprobe.linalg.hvp import HessianVectorProduct, flatten, unflatten
from sgdprobe.linalg.lanczos import Eigenpairs, lanczos
from sgdprobe.optim_info import OptimizerInfo, adam_preconditioner, describe_optimizer, stability_threshold


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class Snapshot:
    """A frozen view of the model at step ``step`` (after that optimizer step).

    :ivar step: number of optimizer steps taken since the probe was attached (plus any resumed count).
    :ivar params: ``{name: tensor}`` of the parameters the optimizer steps (frozen ones excluded).
    :ivar optimizer: hyper-parameters read from the optimizer at this step.
    :ivar update: ``{name: θ_{t+1} − θ_t}`` when a plugin required ``"update"``, else ``None``.
    """

    def __init__(
        self,
        config: ProbeConfig,
        step: int,
        *,
        update: dict[str, torch.Tensor] | None = None,
        observed_batch_size: int | None = None,
    ):
        self.config = config
        self.step = step
        self.update = update
        self._observed_batch_size = observed_batch_size
        self.optimizer: OptimizerInfo = describe_optimizer(config.optimizer, config.lr)
        named = dict(config.model.named_parameters())
        native = named[config.param_names[0]].dtype
        if config.dtype is not None:
            self.dtype = config.dtype
        else:
            self.dtype = native if native in (torch.float32, torch.float64) else torch.float32
        self._cast_inputs = native != self.dtype
        self.params: dict[str, torch.Tensor] = {
            n: named[n].detach().to(self.dtype) for n in config.param_names
        }
        # Parameters the optimizer does not step are constants of the measured loss.
        self._constants = {
            n: p.detach().to(self.dtype) if p.is_floating_point() else p.detach()
            for n, p in named.items()
            if n not in self.params
        }
        self.buffers: dict[str, torch.Tensor] = {
            n: b.detach().to(self.dtype) if b.is_floating_point() else b.detach()
            for n, b in config.model.named_buffers()
        }
        self.seed = (config.seed * 1_000_003 + step) % (2**63)
        self._cache: dict[Any, Any] = {}

    # ----------------------------------------------------------------- read-only facts
    @property
    def model(self) -> torch.nn.Module:
        """The (unwrapped) model; call it only through :meth:`forward`, never directly."""
        return self.config.model

    @property
    def batches(self) -> list[Batch]:
        """The fixed probe batches ``(inputs, targets)``."""
        return self.config.batches

    @property
    def loss_fn(self) -> Callable:
        return self.config.loss_fn

    @property
    def device(self) -> torch.device:
        return self.config.device

    @property
    def lr(self) -> float:
        """The (largest) learning rate at this step."""
        return self.optimizer.lr

    @property
    def batch_size(self) -> int | None:
        """Training batch size B: given at attach, read from a DataLoader, or seen in the last
        training forward pass."""
        return self.config.batch_size or self._observed_batch_size

    @property
    def dataset_size(self) -> int | None:
        """Training set size N (given at attach or read from a DataLoader)."""
        return self.config.dataset_size

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def num_examples(self) -> int:
        return self.config.num_examples

    def stability_threshold(self) -> float | None:
        """Sharpness threshold of this optimizer at this step (``None`` if unknown), see
        :func:`sgdprobe.optim_info.stability_threshold`."""
        return stability_threshold(self.optimizer)

    # ----------------------------------------------------------------- functional model
    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flatten a ``{name: tensor}`` dict over the probed parameters into one vector."""
        return flatten([tensors[n] for n in self.params])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`."""
        return dict(zip(self.params, unflatten(vector, list(self.params.values()))))

    @contextlib.contextmanager
    def isolated(self):
        """Context for evaluating the model: RNG forked and seeded from (seed, step), math SDPA,
        autocast off. :meth:`forward` and :meth:`loss` enter it themselves; wrap your own
        ``torch.func`` transforms of :meth:`example_loss` in it."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.default_generator.manual_seed(self.seed)
            if devices:
                torch.cuda.manual_seed(self.seed)
            with _math_sdpa(), torch.autocast(self.device.type, enabled=False):
                yield

    def _prepare_inputs(self, inputs):
        if not self._cast_inputs:
            return inputs
        return map_tensors(inputs, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    def forward(self, params: Mapping[str, torch.Tensor] | None, inputs: Any) -> Any:
        """The model's output at ``params`` (default: the snapshot's), without side effects."""
        tensors = {**self._constants, **(self.params if params is None else params)}
        tensors.update({n: b.clone() for n, b in self.buffers.items()})
        with self.isolated():
            return _call(self.model, tensors, self._prepare_inputs(inputs))

    def loss(self, params: Mapping[str, torch.Tensor] | None = None, batches: list[Batch] | None = None):
        """The measured objective: ``loss_fn`` averaged over the probe batches, weighted by size (for a
        mean-reduced loss this is the loss on all probe examples at once)."""
        batches = self.batches if batches is None else batches
        sizes = [batch_len(b) for b in batches]
        total = sum(sizes)
        value = 0.0
        for (inputs, targets), n in zip(batches, sizes):
            out = self.forward(params, inputs)
            value = value + self.loss_fn(out, targets) * (n / total)
        return value

    def examples(self) -> tuple[Any, torch.Tensor]:
        """All probe examples as one batch ``(inputs, targets)`` (the probe batches concatenated)."""

        def make():
            if len(self.batches) == 1:
                return self.batches[0]
            return _concat([b[0] for b in self.batches]), _concat([b[1] for b in self.batches])

        return self.cached("examples", make)

    def example_loss(self, params: Mapping[str, torch.Tensor], inputs: Any, targets: Any) -> torch.Tensor:
        """``loss_fn`` on ONE example given without its batch dimension (it is run as a batch of one),
        so every constant of the user's loss (mean vs. sum, MSE's mean over outputs) is kept. Pure in
        ``params``: made for ``torch.func.vmap(torch.func.grad(...))`` over examples. It does not fork
        the RNG; call it inside :meth:`isolated`.
        """
        tensors = {**self._constants, **params}
        tensors.update({n: b.clone() for n, b in self.buffers.items()})
        batched_inputs = _unsqueeze(self._prepare_inputs(inputs))
        out = _call(self.model, tensors, batched_inputs)
        return self.loss_fn(out, _unsqueeze(targets))

    # ----------------------------------------------------------------- shared computations
    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Compute once per snapshot: every plugin asking for ``key`` gets the same object (a
        :class:`MeasurementError` is cached too, so a failed shared computation is not retried)."""
        if key not in self._cache:
            try:
                self._cache[key] = compute()
            except MeasurementError as exc:
                self._cache[key] = exc
        value = self._cache[key]
        if isinstance(value, MeasurementError):
            raise value
        return value

    def hvp_operator(self) -> HessianVectorProduct:
        """The Hessian-vector product of :meth:`loss` at the snapshot's parameters (cached)."""

        def make():
            names = list(self.params)

            def loss_of(plist):
                return self.loss(dict(zip(names, plist)))

            op = HessianVectorProduct(loss_of, list(self.params.values()), self.config.hvp_method)
            op.gradient()
            if not torch.isfinite(op.loss_value).all():
                raise MeasurementError(f"the loss is {op.loss_value.item()} at step {self.step}")
            return op

        return self.cached("hvp", make)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` (Hessian of :meth:`loss`)."""
        return self.hvp_operator()(v)

    def preconditioner_scale(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s, shift)`` with the optimizer's effective operator S(H + diag(shift))S, S = diag(s), or
        ``None`` when the optimizer steps with one scalar rate (no preconditioner).

        s² is the per-parameter step size relative to η (``lr_group/lr``) divided by Adam's P_t; shift
        holds the coupled (L2) weight decay of each parameter's group when the threshold cannot absorb it.
        """
        info = self.optimizer
        if not info.preconditioned:
            return None
        opt = self.config.optimizer
        named = dict(self.config.model.named_parameters())
        scales, shifts = [], []
        for name, p in self.params.items():
            group = opt.param_groups[self.config.param_groups[name]]
            ratio = float(group["lr"]) / info.lr
            wd = float(group.get("weight_decay", 0.0))
            if info.kind in ("adam", "adamw"):
                P = adam_preconditioner(opt, named[name], info)
                s = torch.zeros_like(p) if P is None else (ratio / P.to(self.dtype)).sqrt()
                wd = 0.0 if info.kind == "adamw" else wd
            else:
                s = torch.full_like(p, ratio**0.5)
            scales.append(s)
            shifts.append(torch.full_like(p, wd))
        return flatten(scales), flatten(shifts)

    def hessian_eigenpairs(
        self, k: int = 1, *, preconditioned: bool = False, allow_unconverged: bool = False
    ) -> Eigenpairs:
        """Top-``k`` eigenpairs of the Hessian (or of the preconditioned operator the optimizer steps
        with, see :meth:`preconditioner_scale`), by one Lanczos run per snapshot shared by all plugins.

        The run computes the largest ``k`` any plugin asked for at attach time (or this ``k`` if larger)
        and warm-starts from the previous measurement's top eigenvector. A run that did not reach the
        tolerance raises :class:`MeasurementError` (with its residuals) unless ``allow_unconverged``.
        """
        if preconditioned and self.preconditioner_scale() is None:
            preconditioned = False
        want = max(k, self.config.eigenpairs_k.get(preconditioned, 0))
        key = ("eigenpairs", preconditioned)
        cached = self._cache.get(key)
        if cached is None or (not isinstance(cached, MeasurementError) and len(cached) < k):
            try:
                cached = self._lanczos(want, preconditioned)
            except MeasurementError as exc:  # e.g. a NaN loss: every plugin gets the same reason
                cached = exc
            self._cache[key] = cached
        if isinstance(cached, MeasurementError):
            raise cached
        if not cached.converged and not allow_unconverged:
            scale = float(cached.eigenvalues.abs().max()) or 1.0
            raise MeasurementError(
                f"Lanczos did not converge in {cached.n_matvecs} matvecs: relative residuals "
                f"{[round(float(r) / scale, 8) for r in cached.residuals]} > tol={self.config.lanczos_tol} "
                "(raise lanczos_max_iter or lanczos_tol)"
            )
        return cached.top(k)

    def _lanczos(self, k: int, preconditioned: bool) -> Eigenpairs:
        op = self.hvp_operator()
        matvec = op
        if preconditioned:
            s, shift = self.preconditioner_scale()

            def matvec(v):
                u = s * v
                return s * (op(u) + shift * u)

        warm = self.config.warm_start.get(preconditioned)
        if warm is not None and warm.numel() == op.dim:
            noise = torch.randn(op.dim, generator=torch.Generator().manual_seed(self.seed)).to(warm)
            warm = warm + 1e-2 * noise / noise.norm()
        else:
            warm = None
        result = lanczos(
            matvec,
            op.dim,
            min(k, op.dim),
            tol=self.config.lanczos_tol,
            max_iter=self.config.lanczos_max_iter,
            v0=warm,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
        )
        if not torch.isfinite(result.eigenvalues).all():
            raise MeasurementError(f"Lanczos produced non-finite eigenvalues at step {self.step}")
        self.config.warm_start[preconditioned] = result.eigenvectors[:, 0].detach().clone()
        return result

    # ----- per-example quantities (sgdprobe.linalg.per_example)
    def example_output(self, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
        """The model's output on ONE example given without its batch dimension, returned as a batch of
        one (what ``loss_fn`` takes). Pure in ``params``, no RNG fork: call it inside :meth:`isolated`."""
        tensors = {**self._constants, **params}
        tensors.update({n: b.clone() for n, b in self.buffers.items()})
        return _call(self.model, tensors, _unsqueeze(self._prepare_inputs(inputs)))

    def per_example_gradients(self) -> torch.Tensor:
        """(n, P) gradients of each probe example's loss (cached; stores n·P numbers). See
        :mod:`sgdprobe.linalg.per_example` for chunking, dropout and BatchNorm."""
        return self.cached("per_example_gradients", lambda: per_example.per_example_gradients(self))

    def per_example_sq_norms(self) -> torch.Tensor:
        """(n,) squared norms ||g_i||² of the per-example gradients (cached): by the ghost-norm identity
        for models of Linear/Conv/Embedding/norm layers (:mod:`sgdprobe.linalg.ghost`), else by chunked
        ``vmap(grad)``, never n·P at once unless :meth:`per_example_gradients` was already computed."""

        def make():
            if "per_example_gradients" in self._cache:
                return self.per_example_gradients().square().sum(1)
            stats = per_example.ghost_statistics(self)  # Linear/Conv/Embedding/norm layers: ~1-2× a backward
            return per_example.per_example_sq_norms(self) if stats is None else stats.sq_norms

        return self.cached("per_example_sq_norms", make)

    def per_example_gram(self) -> torch.Tensor:
        """(n, n) Gram matrix ⟨g_i, g_j⟩ of the per-example gradients, in float64 (cached). By the ghost
        identity where the model allows (its products in float64 from the layer inputs and output
        gradients); otherwise from the stored gradients when they fit in ``per_example_max_memory``
        bytes (or were computed already), else block by block with at most two chunks of gradients in
        memory."""

        def make():
            if "per_example_gradients" not in self._cache:
                stats = per_example.ghost_statistics(self, gram=True)
                if stats is not None:
                    return stats.gram
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            stored = self.num_examples * self.num_params * itemsize <= self.config.per_example_max_memory
            if stored or "per_example_gradients" in self._cache:
                return per_example.per_example_gram(self, self.per_example_gradients())
            return per_example.per_example_gram(self)

        return self.cached("per_example_gram", make)

    def gauss_newton_trace(self, estimator: str = "exact", samples: int = 1) -> torch.Tensor:
        """(n,) per-example Gauss–Newton traces tr(G_i) (cached per estimator): ``"exact"`` (one VJP per
        output) or ``"sampled"`` (Bartlett sampled labels, cross-entropy only, unbiased; ``samples``
        draws per example). tr(G) of the probe objective is their mean (MATH.md §2.4, §2.6)."""
        if estimator == "exact":
            return self.cached("gn_trace_exact", lambda: per_example.gauss_newton_trace_exact(self))
        if estimator == "sampled":
            return self.cached(
                ("gn_trace_sampled", samples),
                lambda: per_example.gauss_newton_trace_sampled(self, samples),
            )
        raise ValueError(f"estimator must be 'exact' or 'sampled', got {estimator!r}")

    def per_example_quadratic_forms(self, V: torch.Tensor, method: str = "auto") -> torch.Tensor:
        """(n, r, r) the matrices Vᵀ H_i V for a (P, r) matrix ``V`` of flat directions, H_i the Hessian
        of example i's loss (not cached: it depends on ``V``). ``method``: ``"auto"``, ``"batched"`` or
        ``"vmap"``, see :func:`sgdprobe.linalg.per_example.per_example_quadratic_forms`."""
        return per_example.per_example_quadratic_forms(self, V, method)

    def minibatch_gradients(self, batch_size: int, num_batches: int) -> torch.Tensor:
        """(L, P) gradients of :meth:`loss` on ``num_batches`` disjoint random mini-batches of
        ``batch_size`` probe examples (cached per sizes; works with BatchNorm in train mode)."""
        return self.cached(
            ("minibatch_gradients", batch_size, num_batches),
            lambda: per_example.minibatch_gradients(self, batch_size, num_batches),
        )

    # ----- per-example Hessians (exact generalized sharpness)
    def per_example_hessians(self, max_memory: int = 2**28) -> torch.Tensor:
        """(n, P, P) dense Hessians H_i = ∇²_θ ℓ_i of every probe example's loss (:meth:`example_loss`,
        the user's ``loss_fn`` on that example alone), cached. For small models only: it stores n·P²
        numbers. Computed by ``torch.func.vmap(torch.func.hessian(...))`` over chunks of examples
        holding about ``max_memory`` bytes of Hessians each, inside :meth:`isolated` (one dropout mask
        for all examples). For a mean-reduced loss, mean_i H_i is the Hessian of :meth:`loss`."""
        mixed = self.config.examples_mixed_by
        if mixed:
            raise MeasurementError(
                f"per-example Hessians are undefined: {', '.join(mixed)} mix(es) the examples of a batch "
                "(BatchNorm in train mode). Put the model in eval mode or use a per-example normalisation."
            )
        return self.cached("per_example_hessians", lambda: self._per_example_hessians(max_memory))

    def _per_example_hessians(self, max_memory: int) -> torch.Tensor:
        from torch.func import hessian, vmap

        names = list(self.params)
        flat0 = self.flatten(self.params).detach()
        P = flat0.numel()
        itemsize = flat0.element_size()
        chunk = max(1, max_memory // max(1, 3 * P * P * itemsize))  # hessian() holds ~3 P×P per example

        def loss_of(flat, x_i, y_i):
            return self.example_loss(dict(zip(names, unflatten(flat, list(self.params.values())))), x_i, y_i)

        inputs, targets = self.examples()
        n = self.num_examples
        out = []
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            with self.isolated():
                h = vmap(hessian(loss_of), in_dims=(None, 0, 0), randomness="same")(
                    flat0,
                    map_tensors(inputs, lambda t, s=part: t[s]),
                    map_tensors(targets, lambda t, s=part: t[s]),
                )
            out.append(h.detach())
        hessians = torch.cat(out)
        if not torch.isfinite(hessians).all():
            raise MeasurementError(f"per-example Hessians are not finite at step {self.step}")
        return 0.5 * (hessians + hessians.transpose(1, 2))


def _call(model, tensors, inputs):
    return functional_call(model, tensors, _as_args(inputs), _as_kwargs(inputs), strict=False)


def _as_args(inputs):
    if isinstance(inputs, Mapping):
        return ()
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)


def _as_kwargs(inputs):
    return dict(inputs) if isinstance(inputs, Mapping) else None


def _unsqueeze(obj):
    """Batch inputs or targets of ONE example as a batch of one."""
    return map_tensors(obj, lambda t: t.unsqueeze(0))


def _concat(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(group)) for group in zip(*parts))
    raise TypeError(f"cannot concatenate probe inputs of type {type(first).__name__}")
