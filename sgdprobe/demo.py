"""The demo: full-batch gradient descent on an MLP on scikit-learn's digits, with the probe attached.

With the squared loss of Cohen et al. (½‖f(x) − y‖² per example, averaged) and η = 0.2, the sharpness
rises from about 3 ("progressive sharpening") to 2/η = 10 within a few hundred steps and then hovers
there ("edge of stability"), while the loss keeps decreasing non-monotonically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

import sgdprobe


def digits(n: int = 1000, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits (8×8 images, bundled with scikit-learn: no download), standardized,
    with one-hot targets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the demo needs scikit-learn for its bundled digits: pip install 'sgdprobe[demo]'"
        ) from exc
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:n], dtype=dtype)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    Y = nn.functional.one_hot(torch.tensor(y[:n]), 10).to(dtype)
    return X, Y


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖f(x) − y‖² per example, averaged over examples (the loss of Cohen et al. 2021)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )


@dataclass
class DemoResult:
    probe: sgdprobe.Probe
    losses: list[float]
    threshold: float
    seconds: float

    def sharpness(self) -> list[tuple[int, float]]:
        return self.probe.history["sharpness/lambda_max"]

    def summary(self) -> str:
        values = self.sharpness()
        thr = self.threshold
        first = next((s for s, v in values if v >= 0.9 * thr), None)
        late = [v for s, v in values[len(values) // 2 :]]
        near = sum(abs(v / thr - 1) <= 0.1 for v in late) / max(len(late), 1)
        lines = [
            f"steps: {len(self.losses)}, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, "
            f"{len(values)} measurements in {self.seconds:.1f}s "
            f"(probe: {self.probe.schedule.measure_seconds:.1f}s)",
            f"sharpness: {values[0][1]:.3f} at step {values[0][0]} -> max {max(v for _, v in values):.3f}; "
            f"2/lr = {thr:.3f}",
            f"first reached 90% of 2/lr at step {first}"
            if first is not None
            else "never reached 90% of 2/lr",
            f"second half of training: {100 * near:.0f}% of measurements within 10% of 2/lr "
            "(edge of stability)",
        ]
        return "\n".join(lines)


def run_demo(
    steps: int = 1000,
    lr: float = 0.2,
    width: int = 128,
    examples: int = 1000,
    every: int | str = 10,
    logdir: str | bool = "runs/sgdprobe-demo",
    plugins=None,
    seed: int = 0,
    progress_every: int = 100,
    print_fn=print,
) -> DemoResult:
    """Train full-batch GD with the probe attached; returns the probe and the losses."""
    torch.manual_seed(seed)
    X, Y = digits(examples)
    model = mlp(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    plugins = plugins if plugins is not None else ["sharpness"]
    losses: list[float] = []
    start = time.perf_counter()
    probe = sgdprobe.attach(
        optimizer,
        model,
        half_squared_error,
        (X, Y),
        logdir=logdir,
        every=every,
        plugins=plugins,
        batch_size=len(X),
        dataset_size=len(X),
    )
    with probe:
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            loss = half_squared_error(model(X), Y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress_every and step % progress_every == 0:
                sharp = probe.latest().get("sharpness/lambda_max", float("nan"))
                print_fn(f"step {step:5d}  loss {losses[-1]:.4f}  sharpness {sharp:7.3f}  2/lr {2 / lr:.3f}")
    return DemoResult(probe, losses, 2 / lr, time.perf_counter() - start)
