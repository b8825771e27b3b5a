"""Benchmark 5: how the cost grows with the model: gradient, one HVP and a top-1 Lanczos run against
the parameter count of the GPT-style transformer, and the memory a top-1 sharpness measurement takes.

Each size runs in a fresh process (``python -m benchmarks _scaling_one``) so that its peak memory is its
own: on CUDA the allocator's peak during ``sgdprobe.measure`` above what the model and batch hold, on
the CPU the growth of peak RSS during it. The largest model whose top-1 sharpness fits on the device is
extrapolated from a linear fit of that peak against the parameter count (and says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

import sgdprobe
from benchmarks.common import PeakMemory, interleaved
from benchmarks.models import make_case
from sgdprobe.config import build_config


def scale_one(size: dict, device: str, repeats: int, warmup: int) -> dict[str, Any]:
    dev = torch.device(device)
    case = make_case("gpt", size, dev)
    params = [p for p in case.model.parameters() if p.requires_grad]
    # the memory of a top-1 measurement first, in a process that has done nothing else yet
    with PeakMemory(dev) as pm:
        out = sgdprobe.measure(case.model, case.loss_fn, case.batch, lr=1.0, plugins={"sharpness": {"k": 1}})
    snap = sgdprobe.Snapshot(build_config(case.model, None, case.loss_fn, case.batch, lr=1.0), 0)
    snap.hvp_operator()
    v = torch.randn(case.num_params, generator=torch.Generator().manual_seed(0)).to(dev)
    timed = interleaved(
        {
            "gradient": lambda: torch.autograd.grad(case.loss(), params),
            "hvp": lambda: snap.hvp(v),
            "lanczos_top1": lambda: sgdprobe.measure(
                case.model, case.loss_fn, case.batch, lr=1.0, plugins={"sharpness": {"k": 1}}
            ),
        },
        dev,
        repeats=repeats,
        warmup=warmup,
    )
    row = {
        "size": size,
        "params": case.num_params,
        "peak_memory_bytes": pm.bytes,
        "matvecs": int(out["sharpness/lanczos_matvecs"]),
        "lambda_max": out["sharpness/lambda_max"],
    }
    for key, entry in timed.items():
        row[f"{key}_seconds"] = entry.get("seconds")
        if "error" in entry:
            row[f"{key}_error"] = entry["error"]
    row["hvp_ratio"] = row["hvp_seconds"] / row["gradient_seconds"]
    row["lanczos_ratio"] = row["lanczos_top1_seconds"] / row["gradient_seconds"]
    return row


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(
    sizes: list[dict],
    device: torch.device,
    repeats: int,
    warmup: int,
    threads: int | None,
    fresh: bool = True,
) -> dict:
    """Every size in a fresh process (``fresh``, for its own peak memory) or in this one (smoke test)."""
    rows = []
    for size in sizes:
        if not fresh:
            rows.append(scale_one(size, str(device), repeats, warmup))
            continue
        cmd = [
            sys.executable,
            "-m",
            "benchmarks",
            "_scaling_one",
            json.dumps(size),
            "--device",
            str(device),
            "--repeats",
            str(repeats),
            "--warmup",
            str(warmup),
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            rows.append({"size": size, "skipped": lines[-1][:300]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    good = [r for r in rows if "peak_memory_bytes" in r]
    fit = None
    if len(good) >= 2:
        xs = [r["params"] for r in good]
        ys = [r["peak_memory_bytes"] for r in good]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
        intercept = my - slope * mx
        total = device_memory_bytes(device)
        fit = {
            "bytes_per_param": slope,
            "intercept_bytes": intercept,
            "device_memory_bytes": total,
            "largest_params_extrapolated": (0.9 * total - intercept) / slope if slope > 0 else None,
        }
    return {"rows": rows, "fit": fit}
