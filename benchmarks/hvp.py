"""Benchmark 2: one Hessian-vector product against one gradient (forward + backward), same batch.

The gradient is what a training step pays: ``torch.autograd.grad(loss_fn(model(x), y), params)``.
sgdprobe's products go through the probe's own path (``Snapshot.hvp``: functional_call, cloned
buffers, forked RNG), one strategy per ``hvp_method``; for ``"reuse"`` (the default) the differentiable
gradient is built once, outside the timed call, as in a Lanczos run where it is shared by every
product. Peers: PyHessian's ``hessian_vector_product`` on its kept gradient (the same reuse idea),
curvlinops' ``HessianLinearOperator @ v`` (torch.func), hessian-eigenthings' ``HessianOperator.matvec``
(double backward per product). Each product is checked against sgdprobe's (relative difference).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import sgdprobe
from benchmarks.common import interleaved, peer, why
from benchmarks.models import Case, flat_logits
from sgdprobe.config import build_config


def _snapshot(case: Case, method: str) -> sgdprobe.Snapshot:
    config = build_config(case.model, None, case.loss_fn, case.batch, lr=1.0, hvp_method=method)
    return sgdprobe.Snapshot(config, 0)


def bench_case(case: Case, *, repeats: int, warmup: int, peers: bool = True) -> list[dict]:
    device = case.x.device
    params = [p for p in case.model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(device)
    v_list = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def gradient():
        return torch.autograd.grad(case.loss(), params)

    fns: dict[str, Any] = {"gradient (forward+backward)": gradient}
    snaps = {m: _snapshot(case, m) for m in sgdprobe.linalg.HVP_METHODS}
    snaps["reuse"].hvp_operator()  # the differentiable gradient, shared by a whole Lanczos run

    def first_reuse():
        snap = _snapshot(case, "reuse")
        return snap.hvp(v)

    fns["sgdprobe reuse (per HVP, gradient graph kept)"] = lambda: snaps["reuse"].hvp(v)
    fns["sgdprobe reuse, first HVP incl. its gradient"] = first_reuse
    fns["sgdprobe double_backward"] = lambda: snaps["double_backward"].hvp(v)
    fns["sgdprobe forward_over_reverse"] = lambda: snaps["forward_over_reverse"].hvp(v)
    skipped: dict[str, str] = {}
    cleanup = []
    if peers and peer("pyhessian") is not None:
        ph = sys.modules["pyhessian.hessian"]
        h = peer("pyhessian").hessian(case.model, case.loss_fn, data=case.batch, cuda=device.type == "cuda")
        fns["PyHessian (kept gradient)"] = lambda: ph.hessian_vector_product(h.gradsH, h.params, v_list)
        cleanup.append(h)
    elif peers:
        skipped["PyHessian (kept gradient)"] = why("pyhessian")
    if peers and peer("curvlinops") is not None:
        model, y = flat_logits(case)
        H = peer("curvlinops").HessianLinearOperator(
            model, torch.nn.CrossEntropyLoss(), params, [(case.x, y)], check_deterministic=False
        )
        fns["curvlinops HessianLinearOperator @ v"] = lambda: H @ v
    elif peers:
        skipped["curvlinops HessianLinearOperator @ v"] = why("curvlinops")
    if peers and peer("hessian_eigenthings") is not None:
        he = peer("hessian_eigenthings")
        op = he.HessianOperator(case.model, [case.batch], he.supervised_loss(case.loss_fn))
        fns["hessian-eigenthings HessianOperator.matvec"] = lambda: op.matvec(v)
    elif peers:
        skipped["hessian-eigenthings HessianOperator.matvec"] = why("hessian_eigenthings")

    timed = interleaved(fns, device, repeats=repeats, warmup=warmup)
    for _ in cleanup:
        for p in case.model.parameters():
            p.grad = None
    base = timed["gradient (forward+backward)"].get("seconds")
    check = snaps["reuse"].hvp(v)
    rows = []
    for label in [*fns, *skipped]:
        row: dict[str, Any] = {"model": case.name, "params": dim, "what": label}
        entry = timed.get(label, {"error": skipped.get(label)})
        if "error" in entry:
            row["skipped"] = entry["error"]
        else:
            row["seconds"] = entry["seconds"]
            row["all_seconds"] = entry["all_seconds"]
            if base:
                row["ratio_to_gradient"] = entry["seconds"] / base
            out = entry["results"][-1]
            if label != "gradient (forward+backward)":
                if isinstance(out, (list, tuple)):
                    out = torch.cat([t.reshape(-1) for t in out])
                row["rel_diff_vs_sgdprobe"] = float((out.reshape(-1) - check).norm() / check.norm())
        rows.append(row)
    return rows
