"""Benchmark 1: top-1 and top-5 Hessian eigenvalues, time and accuracy, sgdprobe vs the peers.

Every tool gets the same model (eval mode), the same batch and the same device in one process.
sgdprobe is timed through ``sgdprobe.measure(model, loss_fn, batch, plugins={"sharpness": {"k": k}})``,
exactly what a user calls (default ``lanczos_tol=1e-3``, ``lanczos_max_iter=100``), including the
probe's own set-up and the differentiable gradient. The reference is a long Lanczos run of the same
engine (``Snapshot.hessian_eigenpairs`` with a tight tolerance), float64 where the basis fits in memory;
its residuals are reported and bound its error (|λ − θ| ≤ r²/gap, and ≤ r in any case).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import sgdprobe
from benchmarks.common import interleaved, peer, rel_err, why
from benchmarks.models import Case, flat_logits
from sgdprobe.config import build_config


def reference(case: Case, k: int, *, dtype: torch.dtype, tol: float, max_iter: int) -> dict[str, Any]:
    config = build_config(
        case.model,
        None,
        case.loss_fn,
        case.batch,
        lr=1.0,
        dtype=dtype,
        lanczos_tol=tol,
        lanczos_max_iter=max_iter,
        seed=12345,
    )
    snap = sgdprobe.Snapshot(config, 0)
    pairs = snap.hessian_eigenpairs(k, allow_unconverged=True)
    values = [float(v) for v in pairs.eigenvalues]
    scale = abs(values[0])
    residuals = [float(r) / scale for r in pairs.residuals]
    # error bound per eigenvalue: min(r, r^2 / gap), gap to the nearest other Ritz value found
    bounds = []
    for i, (v, r) in enumerate(zip(values, pairs.residuals)):
        others = [abs(v - w) for j, w in enumerate(values) if j != i]
        gap = min(others) if others else float("inf")
        bounds.append(min(float(r), float(r) ** 2 / gap if gap > 0 else float(r)) / abs(v))
    return {
        "eigenvalues": values,
        "relative_residuals": residuals,
        "relative_error_bound": max(bounds),
        "matvecs": pairs.n_matvecs,
        "dtype": str(dtype).replace("torch.", ""),
        "converged": bool(pairs.converged),
        "tol": tol,
    }


def run_sgdprobe(case: Case, k: int, **options):
    out = sgdprobe.measure(
        case.model, case.loss_fn, case.batch, lr=1.0, plugins={"sharpness": {"k": k}}, **options
    )
    values = [out[f"sharpness/lambda_{i + 1}"] for i in range(k)]
    return values, {"matvecs": int(out["sharpness/lanczos_matvecs"])}


def run_pyhessian(case: Case, k: int):
    module = peer("pyhessian")
    ph = sys.modules["pyhessian.hessian"]  # the module (``pyhessian.hessian`` the attribute is the class)

    calls = [0]
    original = ph.hessian_vector_product

    def counting(*args):
        calls[0] += 1
        return original(*args)

    ph.hessian_vector_product = counting
    try:
        cuda = case.x.device.type == "cuda"
        h = module.hessian(case.model, case.loss_fn, data=case.batch, cuda=cuda)
        values, _ = h.eigenvalues(top_n=k)  # defaults: maxIter=100, tol=1e-3
    finally:
        ph.hessian_vector_product = original
        for p in case.model.parameters():  # PyHessian leaves a create_graph gradient in .grad
            p.grad = None
    return list(values), {"matvecs": calls[0], "order_kept": list(values) == sorted(values, reverse=True)}


def run_curvlinops(case: Case, k: int):
    curvlinops = peer("curvlinops")
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in case.model.parameters() if p.requires_grad]
    model, y = flat_logits(case)
    H = curvlinops.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(case.x, y)])
    A = H.to_scipy()
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return A @ v

    op = LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
    values = eigsh(op, k=k, which="LA", return_eigenvectors=False)  # scipy defaults (tol=0: machine eps)
    return sorted(values.tolist(), reverse=True), {"matvecs": calls[0]}


def run_eigenthings(case: Case, k: int):
    he = peer("hessian_eigenthings")
    op = he.HessianOperator(case.model, [case.batch], he.supervised_loss(case.loss_fn))
    res = he.lanczos(op, k=k, which="LA", seed=0)  # defaults otherwise: max_iter = 2k, tol 1e-4
    values = [float(v) for v in res.eigenvalues]
    converged = bool(torch.as_tensor(res.converged).all())
    return values, {"matvecs": int(res.iterations), "converged_by_own_test": converged}


TOOLS = {
    "sgdprobe": ("sgdprobe", run_sgdprobe),
    "pyhessian": ("pyhessian", run_pyhessian),
    "curvlinops+eigsh": ("curvlinops", run_curvlinops),
    "hessian-eigenthings": ("hessian_eigenthings", run_eigenthings),
}


def bench_case(
    case: Case,
    *,
    ks=(1, 5),
    repeats: int,
    warmup: int,
    ref: dict,
    tools=None,
    extra_sgdprobe: dict | None = None,
) -> list[dict]:
    """Every tool on ``case`` for each k, timed round-robin; relative errors against ``ref``."""
    device = case.x.device
    rows = []
    for k in ks:
        fns, skipped = {}, {}
        for label, (module, fn) in TOOLS.items():
            if tools is not None and label not in tools:
                continue
            if module != "sgdprobe" and peer(module) is None:
                skipped[label] = why(module)
                continue
            fns[label] = lambda fn=fn, k=k: fn(case, k)
            if label == "sgdprobe":
                for extra_label, opts in (extra_sgdprobe or {}).items():
                    fns[extra_label] = lambda fn=fn, k=k, opts=opts: fn(case, k, **opts)
        timed = interleaved(fns, device, repeats=repeats, warmup=warmup)
        for label in [*fns, *skipped]:
            row: dict[str, Any] = {"model": case.name, "k": k, "tool": label}
            entry = timed.get(label, {"error": skipped.get(label)})
            if "error" in entry:
                row["skipped"] = entry["error"]
            else:
                values, info = entry["results"][-1]
                errors = [rel_err(v, ref["eigenvalues"][:k]) for v, _ in entry["results"]]
                row.update(
                    seconds=entry["seconds"],
                    all_seconds=entry["all_seconds"],
                    eigenvalues=[float(v) for v in values],
                    rel_error=max(errors),
                    **info,
                )
            rows.append(row)
        base = next((r for r in rows if r["k"] == k and r["tool"] == "pyhessian" and "seconds" in r), None)
        for r in rows:
            if r["k"] == k and "seconds" in r and base is not None:
                r["time_vs_pyhessian"] = r["seconds"] / base["seconds"]
                r["accuracy_gain_vs_pyhessian"] = base["rel_error"] / max(r["rel_error"], 1e-16)
    return rows
