"""Built-in plugin ``noise_kernel``: the noise kernel norm of Agarwala & Pennington (arXiv 2404.19261;
MATH.md §2.4, §2.6), the stochastic counterpart of the edge-of-stability ratio.

    𝒦̂ = η / (2 α B) · tr(G),   α = (1 − μ) / (1 − d)

with G = (1/n) Σ_i G_i the Gauss–Newton matrix of the probe objective (G_i = J_iᵀ H_{z,i} J_i of the
per-example loss ℓ_i, i.e. ``loss_fn`` on one example: its constants are the user's, ``MSELoss()``
gives H_z = (2/C) I and ½||z − y||² the NTK), B the *training* batch size, η the learning rate read
from the optimizer at this step (the largest over parameter groups; ``lr=`` in ``measure``), μ the
momentum and d the dampening (α = 1 without momentum; Nesterov has the same small-ηλ limit). 𝒦̂ < 1 is
the noise-stable regime of the trace estimator (calibrated ≈ 1 for MSE, ≈ 2 for cross-entropy: §2.5).
It assumes a mean-reduced loss (the step is η times the mean gradient of the batch).

Tags:

- ``noise_kernel/K``: 𝒦̂ for the optimizer in use (SGD with or without momentum; not logged for Adam or
  unknown optimizers, whose noise kernel is not defined by the paper);
- ``noise_kernel/K_sgd``: the same with α = 1 (plain SGD at this η and B);
- ``noise_kernel/K_finite``: (1 − B/N) 𝒦̂, the small-ηλ limit of the rank-one closure with the finite
  dataset factor 1 − β (only when the dataset size N is known);
- ``noise_kernel/gn_trace``: tr(G), mean over the probe examples of tr(G_i);
- ``noise_kernel/gn_trace_stderr``: standard error of that mean over the probe examples;
- ``noise_kernel/sampled``: 1 when the sampled-label estimator was used, 0 for the exact one.

Estimators (``estimator=``): ``"exact"`` tr(G_i) by one vector-Jacobian product per output through the
factored output Hessian; ``"sampled"`` the unbiased sampled-label (Bartlett) estimator ||∇ℓ(z_i, ŷ_i)||²,
ŷ_i ~ softmax(z_i), one backward per example and draw (cross-entropy only); ``"auto"`` (default): exact
up to ``max_exact_outputs`` outputs per example, sampled above it for cross-entropy.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import sgdprobe

_ESTIMATORS = ("auto", "exact", "sampled")


def is_cross_entropy(loss_fn) -> bool:
    """Whether ``loss_fn`` is softmax cross-entropy without label smoothing or class weights."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.label_smoothing == 0 and loss_fn.weight is None
    return loss_fn is nn.functional.cross_entropy


class NoiseKernel:
    """Noise kernel norm 𝒦̂ = η/(2αB) · tr(G) from per-example Gauss–Newton traces."""

    name = "noise_kernel"

    def __init__(
        self,
        estimator: str = "auto",
        samples: int = 1,
        max_exact_outputs: int = 32,
        chunk_size: int | None = None,
        max_memory: int | None = None,
    ):
        """:param estimator: ``"auto"``, ``"exact"`` or ``"sampled"`` (see the module docstring).
        :param samples: label draws per example for the sampled estimator.
        :param max_exact_outputs: ``"auto"`` uses the exact estimator up to this many outputs per example.
        :param chunk_size: at most this many examples per chunk of the per-example engine.
        :param max_memory: about this many bytes of per-example work per chunk."""
        if estimator not in _ESTIMATORS:
            raise sgdprobe.ConfigError(
                f"noise_kernel: estimator must be one of {_ESTIMATORS}, got {estimator!r}"
            )
        for name, value in (("samples", samples), ("max_exact_outputs", max_exact_outputs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise sgdprobe.ConfigError(f"noise_kernel: {name} must be a positive integer, got {value!r}")
        self.estimator = estimator
        self.samples = samples
        self.max_exact_outputs = max_exact_outputs
        self.chunk_size = chunk_size
        self.max_memory = max_memory

    @sgdprobe.hookimpl
    def sgdprobe_configure(self, config: sgdprobe.ProbeConfig) -> None:
        sgdprobe.require_per_example(config, self.name, "per-example Gauss–Newton traces")
        if self.estimator == "sampled" and not is_cross_entropy(config.loss_fn):
            warnings.warn(
                "sgdprobe: noise_kernel estimator='sampled' needs loss_fn = cross-entropy (-log softmax); "
                "it is checked at every measurement and skipped where it does not hold.",
                sgdprobe.ProbeWarning,
                stacklevel=2,
            )
        if config.batch_size is None and config.optimizer is None:
            sgdprobe.require_sizes(config, self.name, dataset_size=False)  # measure(): nothing to observe
        config.limit_per_example_memory(self.chunk_size, self.max_memory)
        info = sgdprobe.describe_optimizer(config.optimizer, config.lr)
        if info.kind != "sgd":
            warnings.warn(
                f"sgdprobe: noise_kernel/K is defined for SGD (with or without momentum), not for "
                f"{info.name}; only noise_kernel/gn_trace is logged.",
                sgdprobe.ProbeWarning,
                stacklevel=2,
            )

    @sgdprobe.hookimpl
    def sgdprobe_layout(self):
        return {"noise kernel norm": ["noise_kernel/K"], "Gauss-Newton trace": ["noise_kernel/gn_trace"]}

    def _use_sampled(self, snapshot: sgdprobe.Snapshot) -> bool:
        if self.estimator != "auto":
            return self.estimator == "sampled"
        if not is_cross_entropy(snapshot.loss_fn):
            return False
        inputs, _ = snapshot.examples()
        with torch.no_grad():
            out = snapshot.forward(None, _first(inputs))
        return isinstance(out, torch.Tensor) and out.numel() > self.max_exact_outputs

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        B = snapshot.batch_size
        if B is None:
            raise sgdprobe.MeasurementError(
                "noise_kernel needs the training batch size B, which was not given and not seen in a "
                "training forward pass: pass batch_size=... to attach() or measure()."
            )
        sampled = self._use_sampled(snapshot)
        traces = snapshot.gauss_newton_trace("sampled" if sampled else "exact", self.samples)
        n = traces.numel()
        trace = float(traces.mean())
        stderr = float(traces.std()) / math.sqrt(n) if n > 1 else float("nan")
        out = {
            "noise_kernel/gn_trace": trace,
            "noise_kernel/gn_trace_stderr": stderr,
            "noise_kernel/sampled": float(sampled),
        }
        info = snapshot.optimizer
        if info.kind != "sgd":
            return out
        eta = snapshot.lr
        k_sgd = eta / (2 * B) * trace
        alpha = (1 - info.momentum) / (1 - info.dampening) if info.momentum > 0 else 1.0
        out["noise_kernel/K_sgd"] = k_sgd
        out["noise_kernel/K"] = k_sgd / alpha
        N = snapshot.dataset_size
        if N is not None:
            out["noise_kernel/K_finite"] = (1 - B / N) * k_sgd / alpha
        return out


def _first(inputs):
    """The first example of batch inputs (a tensor, a tuple or a dict of tensors), as a batch of one."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    if isinstance(inputs, dict):
        return {k: _first(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first(v) for v in inputs)
    return inputs
