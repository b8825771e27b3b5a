"""Benchmark 4: the probe's overhead on a training run, and Cockpit tracking its Hessian max-eigenvalue.

Configurations, each a full training run from the same initial weights on the same batches, timed
round-robin (plain, probe, …) so machine load hits every configuration alike:

- ``plain``: the user's loop, no probe;
- ``sgdprobe defaults, all plugins``: ``sgdprobe.attach(...)`` with ``every="auto"`` (``overhead=0.05``),
  every installed plugin that imports, TensorBoard logging to a temporary directory, ``close()`` timed;
- ``sgdprobe sharpness every 16``: top-1 sharpness at every 16th step (Cockpit's interval);
- ``cockpit HessMaxEV every 16``: Cockpit 1.0.2 with only ``HessMaxEV`` on ``schedules.linear(16)``.

Overhead = (run time − plain run time) / plain run time, from the medians over repeats. The cost
per tracked step is (run − plain) / tracked steps, in units of one plain training step.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

import sgdprobe
from benchmarks.common import peer, sync, why
from benchmarks.models import MLP, ResNet18


def installed_plugins() -> tuple[list[str], dict[str, str]]:
    """Names of installed sgdprobe plugins that import, and ``{name: reason}`` for those that do not."""
    ok, broken = [], {}
    for name, ep in sorted(sgdprobe.available_plugins().items()):
        try:
            ep.load()
            ok.append(name)
        except Exception as exc:
            broken[name] = f"{type(exc).__name__}: {exc}"[:200]
    return ok, broken


def usable_plugins(task, plugins: list[str]) -> tuple[list[str], dict[str, str]]:
    """The plugins among ``plugins`` that accept this model and data at attach time (e.g. per-example
    plugins refuse BatchNorm in train mode, which mixes the examples of a batch), and why the others not."""
    ok, refused = [], {}
    for name in plugins:
        model = copy.deepcopy(task["model"]).train()
        opt = task["optimizer"](model.parameters())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sgdprobe.attach(
                    opt,
                    model,
                    F.cross_entropy,
                    task["probe"],
                    logdir=False,
                    plugins=[name],
                    batch_size=task["batch_size"],
                    dataset_size=task["dataset_size"],
                ).close()
            ok.append(name)
        except Exception as exc:
            refused[name] = f"{type(exc).__name__}: {exc}"[:300]
    return ok, refused


def digits_task(quick: bool, device: torch.device, epochs: int = 25) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    epochs = 2 if quick else epochs
    batch = 32
    batches = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            batches.append((x[idx].to(device), y[idx].to(device)))
    torch.manual_seed(0)
    return {
        "name": "digits MLP",
        "description": f"MLP 64-128-128-10 (tanh) on sklearn digits, SGD lr 0.1 batch {batch}, "
        f"{len(batches)} steps ({epochs} epochs); probe data: 256 training examples",
        "model": MLP(64, 128, 2, 10).to(device),
        "batches": batches,
        "probe": (x[:256].to(device), y[:256].to(device)),
        "dataset_size": len(x),
        "batch_size": batch,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.1),
    }


def cifar_task(quick: bool, device: torch.device, width: int, batch: int, steps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    image = 8 if quick else 32
    width = 4 if quick else width
    batch = 4 if quick else batch
    steps = 20 if quick else steps
    xs = torch.randn(steps, batch, 3, image, image, generator=g)
    ys = torch.randint(0, 10, (steps, batch), generator=g)
    batches = [(xs[i].to(device), ys[i].to(device)) for i in range(steps)]
    probe = (
        torch.randn(batch, 3, image, image, generator=g).to(device),
        torch.randint(0, 10, (batch,), generator=g).to(device),
    )
    torch.manual_seed(0)
    return {
        "name": "ResNet-18-style",
        "description": f"ResNet-18 (width {width}) in train mode on random {batch}×3×{image}×{image} "
        f"batches, SGD lr 0.05 momentum 0.9, {steps} steps; probe data: one batch of {batch}",
        "model": ResNet18(width=width).to(device),
        "batches": batches,
        "probe": probe,
        "dataset_size": 50_000,
        "batch_size": batch,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    }


def _train(task, config: str, plugins: list[str], logdir: str) -> dict[str, Any]:
    device = task["probe"][0].device
    model = copy.deepcopy(task["model"]).train()
    opt = task["optimizer"](model.parameters())
    info: dict[str, Any] = {}
    probe = None
    cockpit = None
    sync(device)
    t0 = time.perf_counter()
    if config.startswith("sgdprobe"):
        options: dict[str, Any] = dict(
            logdir=logdir, batch_size=task["batch_size"], dataset_size=task["dataset_size"]
        )
        if config == "sgdprobe sharpness every 16":
            options.update(every=16, plugins=["sharpness"])
        elif config == "sgdprobe defaults (plugins=None)":
            options.update(plugins=None)
        else:
            options.update(plugins=plugins)
        probe = sgdprobe.attach(opt, model, F.cross_entropy, task["probe"], **options)
    if config == "cockpit HessMaxEV every 16":
        cockpit_mod = peer("cockpit")
        from cockpit import quantities
        from cockpit.utils.schedules import linear

        cockpit = cockpit_mod.Cockpit(
            [p for p in model.parameters()], quantities=[quantities.HessMaxEV(track_schedule=linear(16))]
        )
    for step, (x, y) in enumerate(task["batches"], start=1):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        if cockpit is not None:
            losses = F.cross_entropy(out, y, reduction="none")
            with cockpit(
                step,
                info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": opt},
            ):
                loss.backward(create_graph=cockpit.create_graph(step))
        else:
            loss.backward()
        opt.step()
    if probe is not None:
        probe.close()
        info["measurements"] = probe.schedule.measurements
        info["measure_seconds"] = probe.schedule.measure_seconds
        info["skips"] = [e[3][:160] for e in probe.events][:5]
        per_plugin = {}
        for tag, values in probe.history.items():
            if tag.startswith("probe/seconds/"):
                per_plugin[tag.split("/", 2)[2]] = sum(v for _, v in values)
        info["seconds_per_plugin"] = per_plugin
    if cockpit is not None:
        info["measurements"] = sum(1 for s in range(1, len(task["batches"]) + 1) if s % 16 == 0)
        info["cockpit_values"] = len(cockpit.get_output())
    sync(device)
    info["seconds"] = time.perf_counter() - t0
    return info


CONFIGS = (
    "plain",
    "sgdprobe defaults, all plugins",
    "sgdprobe defaults (plugins=None)",
    "sgdprobe sharpness every 16",
    "cockpit HessMaxEV every 16",
)


def bench_task(task, *, repeats: int, warmup: int = 1, configs=CONFIGS) -> dict[str, Any]:
    installed, broken = installed_plugins()
    plugins, refused = usable_plugins(task, installed)
    configs = ["plain", *[c for c in configs if c != "plain"]]
    skipped = {}
    if "cockpit HessMaxEV every 16" in configs and peer("cockpit") is None:
        configs.remove("cockpit HessMaxEV every 16")
        skipped["cockpit HessMaxEV every 16"] = why("cockpit")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats + warmup):  # the first `warmup` rounds warm every configuration up
            for c in configs:
                if c in errors:
                    continue
                try:
                    info = _train(task, c, plugins, f"{tmp}/{c.replace(' ', '_')}_{r}")
                except Exception as exc:
                    errors[c] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                if r >= warmup:
                    runs[c].append(info)
    steps = len(task["batches"])
    plain = statistics.median(i["seconds"] for i in runs["plain"])
    rows = []
    for c in [*configs, *skipped]:
        row: dict[str, Any] = {"task": task["name"], "config": c}
        if c in skipped or c in errors:
            row["skipped"] = skipped.get(c) or errors[c]
            rows.append(row)
            continue
        secs = statistics.median(i["seconds"] for i in runs[c])
        last = runs[c][-1]
        row.update(seconds=secs, all_seconds=[i["seconds"] for i in runs[c]], overhead=secs / plain - 1)
        row.update({k: v for k, v in last.items() if k != "seconds"})
        if last.get("measure_seconds") is not None:  # the probe's own clock, within one run: load-proof
            row["probe_share"] = statistics.median(
                i["measure_seconds"] / max(i["seconds"] - i["measure_seconds"], 1e-9) for i in runs[c]
            )
        if c != "plain" and last.get("measurements"):
            row["cost_per_tracked_step_in_steps"] = (secs - plain) / last["measurements"] / (plain / steps)
        rows.append(row)
    return {
        "task": task["name"],
        "description": task["description"],
        "steps": steps,
        "plugins": plugins,
        "plugins_not_importable": broken,
        "plugins_refused": refused,
        "rows": rows,
    }
