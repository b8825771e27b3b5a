"""What a probe is attached to: model, optimizer, loss, probe data, sizes and engine options.

Built once at attach time and validated there, so that bad input fails before training starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sgdprobe._tree import map_tensors
from sgdprobe.errors import ConfigError
from sgdprobe.linalg.hvp import HVP_METHODS

DEFAULT_PER_EXAMPLE_MAX_MEMORY = 2**28
"""Bytes of per-example work (gradients, Jacobian rows) the per-example engine holds per chunk."""

Batch = tuple[Any, Any]
"""A probe batch ``(inputs, targets)``; inputs is a tensor, a tuple of positional tensors, or a dict
of keyword tensors for the model's forward."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to call functionally: strips ``torch.compile`` and DDP/DataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def unwrap_optimizer(optimizer):
    """The real ``torch.optim.Optimizer`` behind common wrappers (Lightning, accelerate)."""
    for attr in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            return inner
    return optimizer


def call_model(model: Callable, inputs: Any):
    """Call ``model`` on batch inputs: a tensor, a tuple of positional arguments, or a dict of kwargs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_len(batch: Batch) -> int:
    """Number of examples in a batch (leading dimension of its targets)."""
    targets = batch[1]
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    inputs = batch[0]
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    if isinstance(first, (tuple, list)):
        first = first[0]
    return int(first.shape[0])


def collect_batches(data: Any, num_batches: int, device: torch.device) -> list[Batch]:
    """Fix the probe data once, at attach time.

    ``data`` is either one batch, given as a ``tuple`` ``(inputs, targets)``, or any other iterable of
    such batches (a DataLoader, a list), of which the first ``num_batches`` are taken and kept. The same
    examples are then measured at every step, so that changes in the logged quantities come from the
    parameters and not from resampled data.
    """
    if data is None:
        raise ConfigError("data is required: pass a probe batch (inputs, targets) or an iterable of batches.")
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ConfigError(
                f"a probe batch must be a tuple (inputs, targets); got a tuple of length {len(data)}. "
                "To pass several batches, pass a list or a DataLoader."
            )
        batches = [data]
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise ConfigError(
                "data must be a batch tuple (inputs, targets) or an iterable of batches, "
                f"got {type(data).__name__}"
            ) from None
        batches = list(itertools.islice(iterator, num_batches))
        if not batches:
            raise ConfigError("the data iterable yielded no batch")
        for b in batches:
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise ConfigError(
                    "each batch drawn from data must be (inputs, targets); got "
                    f"{type(b).__name__}{'' if not isinstance(b, (tuple, list)) else f' of length {len(b)}'}"
                )
        batches = [tuple(b) for b in batches]
    return [tuple(map_tensors(part, lambda t: t.to(device)) for part in b) for b in batches]


def mixes_examples(model: nn.Module) -> list[str]:
    """Names of modules whose forward mixes the examples of a batch (BatchNorm in train mode)."""
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


@dataclass
class ProbeConfig:
    """Everything a plugin may check at attach time (see ``sgdprobe_configure``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    loss_fn: Callable[[Any, Any], torch.Tensor]
    batches: list[Batch]
    param_names: list[str]
    param_groups: dict[str, int]
    batch_size: int | None = None
    dataset_size: int | None = None
    lr: float | None = None
    seed: int = 0
    dtype: torch.dtype | None = None
    hvp_method: str = "reuse"
    lanczos_tol: float = 1e-3
    lanczos_max_iter: int = 100
    per_example_chunk: int | None = None
    per_example_max_memory: int = DEFAULT_PER_EXAMPLE_MAX_MEMORY
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eigenpairs_k: dict[bool, int] = field(default_factory=dict)
    warm_start: dict[bool, torch.Tensor] = field(default_factory=dict)

    def request_eigenpairs(self, k: int, preconditioned: bool = False) -> None:
        """Ask for ``k`` Hessian eigenpairs at every measurement. One Lanczos run per step serves the
        largest request of all plugins."""
        if k < 1:
            raise ConfigError(f"the number of eigenpairs must be >= 1, got {k}")
        self.eigenpairs_k[preconditioned] = max(k, self.eigenpairs_k.get(preconditioned, 0))

    def limit_per_example_memory(self, chunk_size: int | None = None, max_memory: int | None = None) -> None:
        """Tighten the per-example engine's limits (``sgdprobe.linalg.per_example``): at most
        ``chunk_size`` examples and about ``max_memory`` bytes of per-example work per chunk. Plugins
        call this with their options; the smallest request wins."""
        _check_limits(chunk_size, max_memory)
        if chunk_size is not None:
            self.per_example_chunk = min(chunk_size, self.per_example_chunk or chunk_size)
        if max_memory is not None:
            self.per_example_max_memory = min(max_memory, self.per_example_max_memory)

    @property
    def examples_mixed_by(self) -> list[str]:
        """Modules that mix examples in the forward pass (per-example quantities impossible)."""
        return mixes_examples(self.model)

    @property
    def num_examples(self) -> int:
        """Number of examples in the probe data."""
        return sum(batch_len(b) for b in self.batches)


def build_config(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: Callable,
    data: Any,
    *,
    num_batches: int = 1,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    hvp_method: str = "reuse",
    lanczos_tol: float = 1e-3,
    lanczos_max_iter: int = 100,
    per_example_chunk: int | None = None,
    per_example_max_memory: int = DEFAULT_PER_EXAMPLE_MAX_MEMORY,
) -> ProbeConfig:
    """Validate the user's input and build a :class:`ProbeConfig` (errors name the fix)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ConfigError("loss_fn must be callable as loss_fn(model(inputs), targets) -> scalar tensor")
    if hvp_method not in HVP_METHODS:
        raise ConfigError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
    if lr is not None and not (lr > 0):
        raise ConfigError(f"lr must be positive, got {lr}")
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    _check_limits(per_example_chunk, per_example_max_memory, ("per_example_chunk", "per_example_max_memory"))
    if batch_size and dataset_size and batch_size > dataset_size:
        raise ConfigError(f"batch_size ({batch_size}) cannot exceed dataset_size ({dataset_size})")
    inner = unwrap_model(model)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups: dict[int, int] = {}
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer (or a subclass), got {type(optimizer).__name__}"
            )
        for gi, group in enumerate(optimizer.param_groups):
            if group.get("lr") is None:
                raise ConfigError(
                    f"{type(optimizer).__name__} param group {gi} has no learning rate ('lr'); sgdprobe "
                    "needs η for the stability thresholds. Set 'lr' in every parameter group."
                )
            for p in group["params"]:
                groups[id(p)] = gi
        owned = [(n, p) for n, p in named if id(p) in groups]
        if not owned:
            raise ConfigError(
                "none of the model's trainable parameters is in the optimizer: pass the optimizer that "
                "steps this model's parameters."
            )
        named = owned
    device = named[0][1].device
    batches = collect_batches(data, num_batches, device)
    if batch_size is None and isinstance(data, torch.utils.data.DataLoader) and data.batch_size:
        batch_size = int(data.batch_size)
    if dataset_size is None and isinstance(data, torch.utils.data.DataLoader):
        try:
            dataset_size = len(data.dataset)
        except TypeError:
            dataset_size = None
    config = ProbeConfig(
        model=inner,
        optimizer=optimizer,
        loss_fn=loss_fn,
        batches=batches,
        param_names=[n for n, _ in named],
        param_groups={n: groups.get(id(p), 0) for n, p in named},
        batch_size=batch_size,
        dataset_size=dataset_size,
        lr=lr,
        seed=seed,
        dtype=dtype,
        hvp_method=hvp_method,
        lanczos_tol=lanczos_tol,
        lanczos_max_iter=lanczos_max_iter,
        per_example_chunk=per_example_chunk,
        per_example_max_memory=per_example_max_memory,
        device=device,
    )
    _check_loss(config)
    return config


def _check_limits(
    chunk_size: int | None, max_memory: int | None, names: tuple[str, str] = ("chunk_size", "max_memory")
) -> None:
    for name, value, unit in ((names[0], chunk_size, "examples"), (names[1], max_memory, "bytes")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer ({unit}), got {value!r}")


def _check_loss(config: ProbeConfig) -> None:
    """Run the loss once on the first probe batch (without touching the model's state)."""
    from sgdprobe.snapshot import Snapshot  # local: snapshot imports this module

    snap = Snapshot(config, step=0)
    try:
        with torch.no_grad():
            value = snap.loss()
    except Exception as exc:  # the message of the original error is kept
        raise ConfigError(
            f"the probe data does not fit the model or the loss: loss_fn(model(inputs), targets) raised "
            f"{type(exc).__name__}: {exc}. Pass data as (inputs, targets) batches that the model accepts."
        ) from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"loss_fn must return a scalar, got {shape}. Use a reduction ('mean' or 'sum'), e.g. "
            "nn.CrossEntropyLoss(reduction='mean')."
        )


def require_sizes(config: ProbeConfig, plugin: str, *, batch_size: bool = True, dataset_size: bool = True):
    """Raise a :class:`ConfigError` naming the keyword to pass when a size could not be inferred."""
    missing = [
        name
        for name, want, have in (
            ("batch_size", batch_size, config.batch_size),
            ("dataset_size", dataset_size, config.dataset_size),
        )
        if want and have is None
    ]
    if missing:
        raise ConfigError(
            f"plugin {plugin!r} needs the training {' and '.join(missing)}, which could not be inferred "
            f"(they are read from a DataLoader passed as data). Pass "
            f"{', '.join(f'{m}=...' for m in missing)} to attach() or measure()."
        )


def require_per_example(
    config: ProbeConfig, plugin: str, what: str = "per-example gradients", alternative: str = "disable it"
) -> None:
    """Raise a :class:`ConfigError` naming the fix when the model's forward mixes the examples of a
    batch (BatchNorm in train mode), so per-example quantities do not exist. For plugins'
    ``sgdprobe_configure``; ``alternative`` is the plugin's own way out."""
    mixed = config.examples_mixed_by
    if mixed:
        raise ConfigError(
            f"{plugin} needs {what}, but {', '.join(mixed)} mix(es) the examples of a batch (BatchNorm in "
            "train mode). Measure in eval mode (model.eval() before attach, so BatchNorm uses its running "
            f"statistics), or {alternative}."
        )
