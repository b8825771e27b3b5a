"""Hessian-vector products of a scalar loss, on flat vectors.

Three strategies, all exact (they agree to rounding; tests check them against each other and a dense
Hessian):

- ``"reuse"`` (default): one differentiable gradient g = ∇L (``create_graph=True``) is built once and
  every product is a vector-Jacobian product through it, Hv = ∇(gᵀv). One forward/backward for the
  whole Lanczos run; each product then costs about one backward of the gradient graph. Fastest on an
  H100 (2.2–2.3× a gradient, DESIGN.md) but keeps the graph alive for the whole run.
- ``"double_backward"``: rebuild the gradient graph for every product (3.1–3.4× a gradient), lowest
  peak memory between products.
- ``"forward_over_reverse"``: ``torch.func.jvp(torch.func.jacrev(L))`` (5–7× a gradient on an H100).
  On torch 2.13 its products are wrong through LayerNorm (BENCHMARKS.md §2), so the first product of
  every operator is checked against a reverse-over-reverse one and a disagreement raises
  :class:`sgdprobe.MeasurementError` (use ``"reuse"``) instead of returning a wrong Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sgdprobe.errors import MeasurementError

HVP_METHODS = ("reuse", "double_backward", "forward_over_reverse")


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    return out


def _grads_or_zeros(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


class HessianVectorProduct:
    """v ↦ ∇²L(θ) v for ``loss(params)`` at fixed ``params`` (a list of leaf tensors).

    ``loss`` must be a pure function of the parameter list that returns the same scalar for the same
    input (the probe makes dropout deterministic and copies buffers so that it is).
    """

    def __init__(
        self,
        loss: Callable[[list[torch.Tensor]], torch.Tensor],
        params: Sequence[torch.Tensor],
        method: str = "reuse",
    ):
        if method not in HVP_METHODS:
            raise ValueError(f"unknown HVP method {method!r}; choose one of {HVP_METHODS}")
        self.loss = loss
        self.params = [p.detach().requires_grad_(True) for p in params]
        self.method = method
        self.dim = sum(p.numel() for p in self.params)
        self.n_calls = 0
        self._flat_grad: torch.Tensor | None = None
        self._verified = False  # forward_over_reverse: checked against reverse-over-reverse once
        self.loss_value: torch.Tensor | None = None

    def gradient(self) -> torch.Tensor:
        """The flat gradient ∇L(θ) (a differentiable one is kept when ``method="reuse"``)."""
        if self._flat_grad is None:
            with torch.enable_grad():
                value = self.loss(self.params)
                grads = torch.autograd.grad(
                    value, self.params, create_graph=self.method == "reuse", allow_unused=True
                )
            self.loss_value = value.detach()
            self._flat_grad = flatten(_grads_or_zeros(grads, self.params))
        return self._flat_grad

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.n_calls += 1
        if self.method == "reuse":
            g = self.gradient()
            if not g.requires_grad:  # the loss does not depend on the parameters at all
                return torch.zeros_like(v)
            with torch.enable_grad():
                hv = torch.autograd.grad(g, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
            return flatten(_grads_or_zeros(hv, self.params)).detach()
        if self.method == "double_backward":
            return self._double_backward(v)
        hv = self._forward_over_reverse(v)
        if not self._verified:
            self._check_forward_over_reverse(v, hv)
        return hv

    def _double_backward(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            value = self.loss(self.params)
            grads = torch.autograd.grad(value, self.params, create_graph=True, allow_unused=True)
            flat = flatten(_grads_or_zeros(grads, self.params))
            if not flat.requires_grad:
                return torch.zeros_like(v)
            hv = torch.autograd.grad(flat, self.params, grad_outputs=v, allow_unused=True)
        return flatten(_grads_or_zeros(hv, self.params)).detach()

    def _check_forward_over_reverse(self, v: torch.Tensor, hv: torch.Tensor) -> None:
        """Compare one forward-over-reverse product with reverse-over-reverse (tolerance √ε relative)."""
        reference = self._double_backward(v)
        scale = float(reference.norm()) or 1.0
        error = float((hv - reference).norm()) / scale
        if error > torch.finfo(hv.dtype).eps ** 0.5:
            raise MeasurementError(
                f"hvp_method='forward_over_reverse' disagrees with reverse-over-reverse by {error:.2g} "
                "(relative) on this model: torch.func's forward mode is wrong through some ops (LayerNorm "
                "on torch 2.13). Use hvp_method='reuse' (the default) or 'double_backward'."
            )
        self._verified = True

    def _forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(unflatten(v, self.params))

        def loss_of_tuple(*ps):
            return self.loss(list(ps))

        # jacrev, not grad: jvp(grad(f)) raises "ZeroTensors are immutable" through nn.MSELoss on torch
        # 2.13 (the form curvlinops uses works).
        grad_fn = torch.func.jacrev(loss_of_tuple, argnums=tuple(range(len(primals))))
        _, hv = torch.func.jvp(grad_fn, primals, tangents)
        return flatten(hv).detach()

    def release(self) -> None:
        """Free the kept gradient graph."""
        self._flat_grad = None
