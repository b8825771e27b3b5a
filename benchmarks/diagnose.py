"""``python -m benchmarks.diagnose {lanczos,hvp_forms,measure_profile,first_measurements}``: the small
measurements BENCHMARKS.md quotes to explain a gap (one thread, CPU; each prints what it measured).

- ``lanczos [--params P] [--steps M]``: the Lanczos engine alone with a diagonal stand-in operator, so
  its own bookkeeping (re-orthogonalization, basis memory) is timed apart from any HVP.
- ``hvp_forms``: one product from ResNet-18's kept gradient graph (width 64, batch 8) in the three forms
  of §2 (flat gradient, per-parameter gradients, result left as a list), round-robin.
- ``measure_profile``: cProfile of one top-1 ``sgdprobe.measure`` on the digits-shaped MLP (batch 512).
- ``first_measurements``: top-1 sharpness at every one of the first 4 steps of the ResNet-style overhead
  task (§4): HVPs and seconds of the cold first run against the warm-started ones.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import sgdprobe
from benchmarks.models import make_case


def lanczos(params: int, steps: int) -> None:
    from sgdprobe.linalg.lanczos import lanczos as run

    d = torch.linspace(0, 1, params) ** 8
    start = time.perf_counter()
    for _ in range(steps):
        d * d
    operator = time.perf_counter() - start
    start = time.perf_counter()
    run(lambda v: d * v, params, 1, tol=0.0, max_iter=steps)
    total = time.perf_counter() - start
    print(
        f"{steps} Lanczos steps at P={params:,}: {total:.1f} s, of which the stand-in operator "
        f"~{operator:.1f} s: bookkeeping {total - operator:.1f} s"
    )


def hvp_forms(rounds: int = 6) -> None:
    from sgdprobe.linalg.hvp import flatten, unflatten

    case = make_case("resnet18", {"batch": 8, "width": 64})
    params = list(case.model.parameters())
    grads = torch.autograd.grad(case.loss(), params, create_graph=True)
    flat = flatten(grads)
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0))
    forms = {
        "flat gradient, concatenated (Snapshot.hvp)": lambda: flatten(
            torch.autograd.grad(flat, params, grad_outputs=v, retain_graph=True)
        ),
        "per-parameter gradients, concatenated": lambda: flatten(
            torch.autograd.grad(grads, params, grad_outputs=unflatten(v, params), retain_graph=True)
        ),
        "per-parameter gradients, list (PyHessian's form)": lambda: torch.autograd.grad(
            grads, params, grad_outputs=unflatten(v, params), retain_graph=True
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, fn in forms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts[1:]) * 1e3:.1f} ms (median of {rounds - 1} after a warm-up)")


def measure_profile() -> None:
    case = make_case("mlp", {"batch": 512})

    def measure():
        sgdprobe.measure(case.model, case.loss_fn, case.batch, lr=1.0, plugins={"sharpness": {"k": 1}})

    for _ in range(3):
        measure()
    profiler = cProfile.Profile()
    profiler.runcall(measure)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def first_measurements() -> None:
    from benchmarks.overhead import cifar_task

    task = cifar_task(False, torch.device("cpu"), width=16, batch=32, steps=64)
    model, opt = task["model"].train(), task["optimizer"](task["model"].parameters())
    probe = sgdprobe.attach(
        opt,
        model,
        F.cross_entropy,
        task["probe"],
        every=1,
        plugins=["sharpness"],
        batch_size=32,
        dataset_size=50_000,
        logdir=tempfile.mkdtemp(),
    )
    for x, y in task["batches"][:4]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    probe.close()
    for tag in ("sharpness/lanczos_matvecs", "probe/seconds"):
        print(tag, [round(v, 2) for _, v in probe.history[tag]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["lanczos", "hvp_forms", "measure_profile", "first_measurements"])
    parser.add_argument("--params", type=int, default=11_173_962, help="lanczos: vector length")
    parser.add_argument("--steps", type=int, default=54, help="lanczos: steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "lanczos":
        lanczos(args.params, args.steps)
    else:
        {
            "hvp_forms": hvp_forms,
            "measure_profile": measure_profile,
            "first_measurements": first_measurements,
        }[args.what]()


if __name__ == "__main__":
    main()
