"""What the probe reads from the optimizer at each step, and the stability thresholds it implies.

Thresholds are those of the update rule linearized on a quadratic (MATH.md §1.1, §1.2): the loss
sharpness above which the iteration diverges along the top eigenvector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgdprobe.errors import ConfigError


@dataclass(frozen=True)
class OptimizerInfo:
    """Hyper-parameters of the optimizer at one step, read from its ``param_groups``.

    ``kind`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"unknown"`` (an optimizer sgdprobe has no
    threshold for). ``lr`` is the largest learning rate over the groups; ``lrs`` holds each group's.
    """

    kind: str
    name: str
    lr: float
    lrs: tuple[float, ...]
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    amsgrad: bool = False

    @property
    def uniform_lr(self) -> bool:
        return all(lr == self.lr for lr in self.lrs)

    @property
    def preconditioned(self) -> bool:
        """Whether the optimizer steps with a diagonal preconditioner (Adam's, or per-group rates)."""
        return self.kind in ("adam", "adamw") or (self.kind == "sgd" and not self.uniform_lr)


def _group_value(optimizer: torch.optim.Optimizer, key: str, default=0.0):
    values = [g.get(key, default) for g in optimizer.param_groups]
    return values[0]


def describe_optimizer(optimizer: torch.optim.Optimizer | None, lr: float | None = None) -> OptimizerInfo:
    """Read the optimizer's hyper-parameters now (so LR schedulers are followed).

    With no optimizer, ``lr`` describes plain gradient descent (used by :func:`sgdprobe.measure`).
    """
    if optimizer is None:
        if lr is None:
            return OptimizerInfo(kind="unknown", name="none", lr=float("nan"), lrs=())
        return OptimizerInfo(kind="sgd", name="gd", lr=float(lr), lrs=(float(lr),))
    lrs = []
    for group in optimizer.param_groups:
        value = group.get("lr")
        if value is None:
            raise ConfigError(
                f"{type(optimizer).__name__} has a parameter group without a learning rate ('lr'); "
                "sgdprobe reads η from param_groups[i]['lr'] to compute stability thresholds. "
                "Set 'lr' in every parameter group."
            )
        lrs.append(float(value))
    if lr is not None:
        lrs = [float(lr)] * len(lrs)
    top = max(lrs)
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD):
        return OptimizerInfo(
            kind="sgd",
            name=name,
            lr=top,
            lrs=tuple(lrs),
            momentum=float(_group_value(optimizer, "momentum")),
            dampening=float(_group_value(optimizer, "dampening")),
            nesterov=bool(_group_value(optimizer, "nesterov", False)),
            weight_decay=float(_group_value(optimizer, "weight_decay")),
        )
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            _group_value(optimizer, "decoupled_weight_decay", False)
        )
        beta1, beta2 = _group_value(optimizer, "betas", (0.9, 0.999))
        return OptimizerInfo(
            kind="adamw" if decoupled else "adam",
            name=name,
            lr=top,
            lrs=tuple(lrs),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(_group_value(optimizer, "eps", 1e-8)),
            weight_decay=float(_group_value(optimizer, "weight_decay")),
            amsgrad=bool(_group_value(optimizer, "amsgrad", False)),
        )
    return OptimizerInfo(kind="unknown", name=name, lr=top, lrs=tuple(lrs))


def stability_threshold(info: OptimizerInfo) -> float | None:
    """The sharpness at which the optimizer's linearized iteration becomes unstable (MATH.md §1.1).

    - SGD: 2/η; heavy-ball momentum μ: (2+2μ)/η; Nesterov: (2+2μ)/(η(1+2μ)); dampening d replaces η
      by η(1−d); coupled weight decay wd shifts the Hessian by wd·I, so the threshold on the *loss*
      sharpness is lowered by wd.
    - Adam (P frozen): (2+2β1)/((1−β1)η) on λ_max(P⁻¹H), 38/η at β1 = 0.9 (Cohen et al. 2022);
      coupled weight decay is included in the preconditioned operator instead (see
      :meth:`Snapshot.hessian_eigenpairs`). AdamW: (1+β1)(2−η·wd)/((1−β1)η) (MATH.md §1.1).
    - With several parameter groups of different rates, η is the largest rate and the other groups
      enter through the preconditioner diag(η_g/η), so the threshold keeps the form above.

    Returns ``None`` for an optimizer sgdprobe does not know: no guess is made.
    """
    eta = info.lr
    if info.kind == "sgd":
        eta_eff = eta * (1.0 - info.dampening)
        mu = info.momentum
        if mu > 0 and info.nesterov:
            base = (2 + 2 * mu) / (eta_eff * (1 + 2 * mu))
        else:
            base = (2 + 2 * mu) / eta_eff
        return base - info.weight_decay
    if info.kind == "adam":
        b1 = info.beta1
        return (2 + 2 * b1) / ((1 - b1) * eta)
    if info.kind == "adamw":
        b1 = info.beta1
        return (1 + b1) * (2 - eta * info.weight_decay) / ((1 - b1) * eta)
    return None


def adam_preconditioner(optimizer: torch.optim.Optimizer, param: torch.Tensor, info: OptimizerInfo):
    """Adam's diagonal preconditioner P_t = (1 − β1^t)(sqrt(v_t/(1 − β2^t)) + ε) for one parameter
    (MATH.md §1.2), from the optimizer state after step t; ``None`` if it has no state yet."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    step = float(state["step"])
    v = state["max_exp_avg_sq"] if info.amsgrad and "max_exp_avg_sq" in state else state["exp_avg_sq"]
    v_hat = v / (1.0 - info.beta2**step)
    return (1.0 - info.beta1**step) * (v_hat.sqrt() + info.eps)
