"""``python -m benchmarks profile --models resnet18``: torch.profiler top ops of one gradient, one
sgdprobe HVP (reuse), one top-5 ``sgdprobe.measure`` and (models without BatchNorm) the ghost norms and
BackPACK's BatchL2Grad on the benchmark's model and batch, for the cases where a target is missed
(BENCHMARKS.md quotes these tables)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import sgdprobe
from benchmarks.hvp import _snapshot
from benchmarks.models import Case


def profile_case(case: Case, row_limit: int = 8, with_per_example: bool = False) -> dict[str, str]:
    device = case.x.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    params = [p for p in case.model.parameters() if p.requires_grad]
    snap = _snapshot(case, "reuse")
    snap.hvp_operator()
    v = torch.randn(case.num_params, generator=torch.Generator().manual_seed(0)).to(device)
    jobs = {
        "gradient": lambda: torch.autograd.grad(case.loss(), params),
        "sgdprobe HVP (reuse)": lambda: snap.hvp(v),
        "sgdprobe.measure top-5": lambda: sgdprobe.measure(
            case.model, case.loss_fn, case.batch, lr=1.0, plugins={"sharpness": {"k": 5}}
        ),
    }
    if with_per_example:
        from benchmarks.per_example import methods

        fns, _ = methods(case)
        for label in ("sgdprobe ghost norms", "BackPACK BatchL2Grad"):
            if label in fns:
                jobs[label] = fns[label]
    out = {}
    for label, fn in jobs.items():
        fn()  # warm-up
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        out[label] = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    return out
