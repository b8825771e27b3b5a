"""Benchmark 3: per-example gradient statistics (squared norms, the n×n Gram matrix).

Against one batched backward on the same batch, and against BackPACK's ``BatchL2Grad`` (squared norms)
and ``BatchGrad`` (per-example gradients, from which the Gram matrix is ``G Gᵀ``) on the same model.
sgdprobe's paths: the ghost-norm identity (``sgdprobe.linalg.ghost``: layer inputs and output gradients,
no per-example gradient formed), the ``Snapshot.per_example_sq_norms()`` / ``per_example_gram()``
methods a plugin calls (they pick ghost when the model allows, else vmap), and the general
``torch.func.vmap(grad)`` fallback. Subjects that do not exist in this checkout are reported as not
available. Per-example gradients here are those of each example's loss (a batch of one); BackPACK's
are those of the mean-reduced batch loss (1/n of it), which the consistency check accounts for.

Peak memory (:class:`benchmarks.common.PeakMemory`): on CUDA the allocator's peak above the memory in use
before the call; on the CPU the sampled peak resident set size above the one before the call.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch

import sgdprobe
from benchmarks.common import PeakMemory, interleaved, peer, why
from benchmarks.models import Case, flat_logits
from sgdprobe.config import build_config


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except Exception:
        return None


_CONFIGS: dict[int, Any] = {}


def _snapshot(case: Case) -> sgdprobe.Snapshot:
    """A fresh snapshot (its caches empty) of a config built once per case, as a probe does: the config
    is built at attach, a snapshot at every measurement."""
    key = id(case)
    if key not in _CONFIGS:
        _CONFIGS[key] = build_config(case.model, None, case.loss_fn, case.batch, lr=1.0)
    return sgdprobe.Snapshot(_CONFIGS[key], 0)


def methods(case: Case) -> tuple[dict[str, Any], dict[str, str]]:
    """``({label: fn() -> (sq_norms (n,), gram (n, n) or None)}, {label: why not available})``."""
    params = [p for p in case.model.parameters() if p.requires_grad]
    n = case.x.shape[0]
    fns: dict[str, Any] = {}
    missing: dict[str, str] = {}

    def batched():
        torch.autograd.grad(case.loss(), params)
        return None, None

    fns["batched backward (baseline)"] = batched
    ghost = _optional("sgdprobe.linalg.ghost")
    if ghost is None:
        missing["sgdprobe ghost norms"] = missing["sgdprobe ghost Gram"] = (
            "sgdprobe.linalg.ghost not available"
        )
    else:

        def ghost_call(gram: bool):
            snap = _snapshot(case)
            tensors = {n_: p.detach() for n_, p in case.model.named_parameters()}
            tensors.update(snap.params)
            tensors.update({k: b.clone() for k, b in snap.buffers.items()})
            inputs, targets = snap.examples()
            with snap.isolated():
                stats = ghost.ghost_sq_norms_and_gram(
                    snap.model,
                    tensors,
                    inputs,
                    targets,
                    lambda out, y: ghost.per_example_losses(snap.loss_fn, out, y),
                    names=list(snap.params),
                    gram=gram,
                )
            return stats.sq_norms, stats.gram

        try:
            ghost.check_supported(
                case.model, [n_ for n_, p in case.model.named_parameters() if p.requires_grad]
            )
            fns["sgdprobe ghost norms"] = lambda: ghost_call(False)
            fns["sgdprobe ghost Gram"] = lambda: ghost_call(True)
        except Exception as exc:
            missing["sgdprobe ghost norms"] = missing["sgdprobe ghost Gram"] = f"unsupported model: {exc}"[
                :200
            ]
    snap_cls = sgdprobe.Snapshot
    if hasattr(snap_cls, "per_example_sq_norms"):
        fns["sgdprobe Snapshot.per_example_sq_norms()"] = lambda: (
            _snapshot(case).per_example_sq_norms(),
            None,
        )
    else:
        missing["sgdprobe Snapshot.per_example_sq_norms()"] = "not in this checkout"
    if hasattr(snap_cls, "per_example_gram"):

        def snap_gram():
            g = _snapshot(case).per_example_gram()
            return g.diagonal(), g

        fns["sgdprobe Snapshot.per_example_gram()"] = snap_gram
    else:
        missing["sgdprobe Snapshot.per_example_gram()"] = "not in this checkout"

    def vmap_grads():
        snap = _snapshot(case)
        x, y = snap.examples()
        with snap.isolated():
            grads = torch.func.vmap(torch.func.grad(snap.example_loss), in_dims=(None, 0, 0))(
                snap.params, x, y
            )
        G = torch.cat([g.reshape(n, -1) for g in grads.values()], dim=1)
        return G

    fns["vmap(grad) norms (general fallback)"] = lambda: ((vmap_grads() ** 2).sum(1), None)

    def vmap_gram():
        G = vmap_grads()
        gram = G @ G.T
        return gram.diagonal(), gram

    fns["vmap(grad) Gram (general fallback)"] = vmap_gram

    backpack = peer("backpack")
    if backpack is None:
        missing["BackPACK BatchL2Grad"] = missing["BackPACK BatchGrad + Gram"] = why("backpack")
    else:
        from backpack.extensions import BatchGrad, BatchL2Grad

        flat_model, flat_y = flat_logits(case)
        bp_model = backpack.extend(copy.deepcopy(flat_model))
        bp_loss = backpack.extend(torch.nn.CrossEntropyLoss())
        bp_params = [p for p in bp_model.parameters() if p.requires_grad]

        def bp_l2():
            loss = bp_loss(bp_model(case.x), flat_y)
            with backpack.backpack(BatchL2Grad()):
                loss.backward()
            sq = sum(p.batch_l2 for p in bp_params) * n**2  # BackPACK's are of the mean loss
            for p in bp_params:
                p.grad = None
                del p.batch_l2
            return sq, None

        def bp_grad():
            loss = bp_loss(bp_model(case.x), flat_y)
            with backpack.backpack(BatchGrad()):
                loss.backward()
            G = torch.cat([p.grad_batch.reshape(n, -1) for p in bp_params], dim=1) * n
            for p in bp_params:
                p.grad = None
                del p.grad_batch
            gram = G @ G.T
            return gram.diagonal(), gram

        fns["BackPACK BatchL2Grad"] = bp_l2
        fns["BackPACK BatchGrad + Gram"] = bp_grad
    return fns, missing


def bench_case(
    case: Case, *, repeats: int, warmup: int, memory: dict[str, float] | None = None
) -> list[dict]:
    device = case.x.device
    fns, missing = methods(case)
    timed = interleaved(fns, device, repeats=repeats, warmup=warmup)
    if memory is None:
        memory = {}
        for label, fn in fns.items():
            if "error" in timed[label]:
                continue
            with PeakMemory(device) as pm:
                fn()
            memory[label] = pm.bytes
    n = case.x.shape[0]
    reference = None
    for label in ("vmap(grad) Gram (general fallback)", "vmap(grad) norms (general fallback)"):
        if "results" in timed.get(label, {}):
            reference = timed[label]["results"][-1]
            break
    base = timed["batched backward (baseline)"].get("seconds")
    rows = []
    for label in [*fns, *missing]:
        row: dict[str, Any] = {"model": case.name, "n": n, "params": case.num_params, "what": label}
        entry = timed.get(label, {"error": missing.get(label)})
        if "error" in entry:
            row["skipped"] = entry["error"]
            rows.append(row)
            continue
        row["seconds"] = entry["seconds"]
        row["all_seconds"] = entry["all_seconds"]
        row["seconds_per_example"] = entry["seconds"] / n
        if base:
            row["ratio_to_batched_backward"] = entry["seconds"] / base
        if memory and label in memory:
            row["peak_memory_bytes"] = memory[label]
        sq, gram = entry["results"][-1]
        if reference is not None and sq is not None:
            ref_sq = reference[0]
            row["rel_diff_sq_norms"] = float((sq.reshape(-1) - ref_sq).norm() / ref_sq.norm())
            if gram is not None and reference[1] is not None:
                row["rel_diff_gram"] = float((gram - reference[1]).norm() / reference[1].norm())
        rows.append(row)
    for r in rows:
        for other in ("BackPACK BatchL2Grad", "BackPACK BatchGrad + Gram"):
            b = next((x for x in rows if x["what"] == other and "seconds" in x), None)
            if b is not None and "seconds" in r:
                key = "vs_backpack_l2" if other == "BackPACK BatchL2Grad" else "vs_backpack_gram"
                r[key] = r["seconds"] / b["seconds"]
    return rows
