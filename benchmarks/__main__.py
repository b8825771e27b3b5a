"""``python -m benchmarks {eigen,hvp,per_example,overhead,scaling,all} [--quick] [--device D] [--out F]``.

Prints Markdown tables and writes every measured number (with the machine and the date) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from benchmarks import common, report
from benchmarks.models import SIZES, make_case

BENCHMARKS = ("eigen", "hvp", "per_example", "overhead", "scaling")


def _mode(args) -> str:
    if args.quick:
        return "quick"
    return "full" if args.device.type == "cuda" else "cpu"


def _sizes(args, name: str) -> dict:
    size = dict(SIZES[_mode(args)][name])
    if name == "resnet18" and _mode(args) == "cpu":
        size["batch"] = args.resnet_batch
        size["width"] = args.resnet_width
    return size


def _repeats(args, name: str) -> tuple[int, int]:
    if args.quick:
        return 1, 0
    if args.repeats is not None:
        return args.repeats, args.warmup
    if name == "resnet18" and args.device.type == "cpu":
        return 1, 0  # minutes per run on a CPU; the whole suite warms up on one gradient first
    return 3, 1


def _warm(case) -> None:
    params = [p for p in case.model.parameters() if p.requires_grad]
    torch.autograd.grad(case.loss(), params)


def run_eigen(args) -> dict[str, Any]:
    from benchmarks import eigen

    out = {"rows": [], "references": {}}
    for name in args.models or ("mlp", "gpt", "resnet18"):
        case = make_case(name, _sizes(args, name), args.device)
        _warm(case)
        dim = case.num_params
        max_iter = 60 if args.quick else (300 if name == "mlp" else 150)
        budget = (
            torch.cuda.get_device_properties(args.device).total_memory
            if args.device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
        f64 = dim * max_iter * 8 * 3 < budget * 0.4
        dtype = torch.float64 if f64 else torch.float32
        t0 = time.perf_counter()
        ref = eigen.reference(case, 5, dtype=dtype, tol=1e-10 if f64 else 1e-6, max_iter=max_iter)
        ref["seconds"] = time.perf_counter() - t0
        ref["model"] = case.description
        ref["params"] = dim
        out["references"][name] = ref
        repeats, warmup = _repeats(args, name)
        tools = None if not args.quick or name == "mlp" else ["sgdprobe"]
        extra = {} if args.quick else {"sgdprobe (lanczos_tol=1e-5)": {"lanczos_tol": 1e-5}}
        rows = eigen.bench_case(
            case,
            repeats=repeats,
            warmup=warmup,
            ref=ref,
            tools=tools,
            extra_sgdprobe=extra,
        )
        for r in rows:
            r["repeats"], r["warmup"] = repeats, warmup
        out["rows"] += rows
        _progress(f"eigen {name} done")
    return out


def run_hvp(args) -> dict[str, Any]:
    from benchmarks import hvp

    out = {"rows": [], "models": {}}
    for name in args.models or ("mlp", "gpt", "resnet18"):
        case = make_case(name, _sizes(args, name), args.device)
        _warm(case)
        repeats, warmup = (1, 1) if args.quick else (args.repeats or 5, 1)
        out["models"][name] = case.description
        out["rows"] += hvp.bench_case(
            case, repeats=repeats, warmup=warmup, peers=not args.quick or name == "mlp"
        )
        _progress(f"hvp {name} done")
    return out


def run_per_example(args) -> dict[str, Any]:
    from benchmarks import per_example

    out = {"rows": [], "models": {}}
    for name in args.models or ("mlp", "convnet", "gpt"):
        case = make_case(name, _sizes(args, name), args.device)
        _warm(case)
        out["models"][name] = case.description
        repeats, warmup = (1, 0) if args.quick else (args.repeats or 5, 1)
        out["rows"] += per_example.bench_case(case, repeats=repeats, warmup=warmup)
        _progress(f"per_example {name} done")
    return out


def run_overhead(args) -> dict[str, Any]:
    from benchmarks import overhead

    quick, dev = args.quick, args.device
    cockpit = ("plain", "sgdprobe sharpness every 16", "cockpit HessMaxEV every 16")
    defaults = ("plain", "sgdprobe defaults, all plugins", "sgdprobe defaults (plugins=None)")
    if dev.type == "cuda":
        jobs = [
            (overhead.digits_task(quick, dev, epochs=300), defaults),
            (overhead.digits_task(quick, dev, epochs=10), cockpit),
            (overhead.cifar_task(quick, dev, width=64, batch=256, steps=1600), overhead.CONFIGS),
        ]
    else:  # the long runs the default schedule needs to amortize its first measurement, then Cockpit
        jobs = [
            (overhead.digits_task(quick, dev, epochs=300), defaults),
            (overhead.digits_task(quick, dev, epochs=10), cockpit),
            (overhead.cifar_task(quick, dev, width=16, batch=32, steps=64), overhead.CONFIGS),
        ]
    if args.models:  # e.g. --models digits
        jobs = [(t, c) for t, c in jobs if any(m.lower() in t["name"].lower() for m in args.models)]
    out = {"tasks": []}
    repeats = 1 if quick else (args.repeats or 2)
    for task, configs in jobs:
        out["tasks"].append(
            overhead.bench_task(task, repeats=repeats, warmup=0 if quick else 1, configs=configs)
        )
        _progress(f"overhead {task['name']} ({len(task['batches'])} steps) done")
    return out


def run_scaling(args) -> dict[str, Any]:
    from benchmarks import scaling

    base = SIZES[_mode(args)]["gpt"]
    if args.widths:
        widths = tuple(args.widths)
    elif args.quick:
        widths = (16, 32)
    elif args.device.type == "cuda":
        widths = (256, 512, 1024, 1536)
    else:
        widths = (64, 128, 256, 384)
    sizes = [{**base, "d": d} for d in widths]
    repeats = 1 if args.quick else (args.repeats or 3)
    warmup = 0 if args.quick or args.repeats else 1
    return scaling.run(sizes, args.device, repeats, warmup, args.threads, fresh=not args.quick)


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


RUNNERS = {
    "eigen": run_eigen,
    "hvp": run_hvp,
    "per_example": run_per_example,
    "overhead": run_overhead,
    "scaling": run_scaling,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all", "profile", "_scaling_one"])
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks that it runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--no-peers", action="store_true", help="run as if no peer were installed")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", help="restrict to these models")
    parser.add_argument("--widths", nargs="+", type=int, help="scaling: GPT widths d (6 layers)")
    parser.add_argument("--resnet-batch", type=int, default=8, help="ResNet-18 batch on the CPU (default 8)")
    parser.add_argument("--resnet-width", type=int, default=64, help="ResNet-18 width on the CPU")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.no_peers:  # an environment variable, so that the subprocesses of `scaling` see it too
        os.environ["SGDPROBE_BENCH_NO_PEERS"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark == "_scaling_one":
        from benchmarks import scaling

        row = scaling.scale_one(json.loads(args.args[0]), str(args.device), args.repeats or 1, args.warmup)
        print(json.dumps(row))
        return row
    if args.benchmark == "profile":
        from benchmarks.profile import profile_case

        tables = {}
        for name in args.models or ("resnet18",):
            case = make_case(name, _sizes(args, name), args.device)
            for label, text in profile_case(case, with_per_example=name != "resnet18").items():
                print(f"## {case.description}: {label}\n{text}")
                tables[f"{name}: {label}"] = text
        if args.out:
            _write(args.out, {"profiles": tables, "machine": common.machine(args.device)})
        return tables
    which = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    results: dict[str, Any] = {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": common.machine(args.device),
        "mode": _mode(args),
    }
    for name in which:
        t0 = time.perf_counter()
        results[name] = RUNNERS[name](args)
        results[name]["wall_seconds"] = time.perf_counter() - t0
        if args.out:  # keep what is done if a later benchmark is interrupted
            _write(args.out, results)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["missing_peers"] = dict(common.MISSING)
    print(report.render(results))
    if args.out:
        _write(args.out, results)
    return results


def _write(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
