"""Mini-batch SGD with momentum on scikit-learn digits, with the noise kernel norm (Agarwala &
Pennington) and the gradient-covariance conditioning and break-even condition (Jastrzebski et al.)
enabled by name only (MATH.md §2, §4).

    python examples/digits_noise_and_covariance.py [--logdir runs/digits-noise]
    tensorboard --logdir runs/digits-noise

The probe data is the training DataLoader itself: its first ``num_batches`` batches are the fixed probe
set, and the training batch size B and dataset size N that both plugins need are read from it. Halfway
through, the learning rate is multiplied by 4: 𝒦̂ = η/(2αB)·tr(G) jumps with it, and so does the
break-even left-hand side. Runs in well under a minute on a laptop CPU; no download.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sgdprobe


def main(logdir: str | bool = "runs/digits-noise", epochs: int = 6, lr: float = 0.02, every: int = 20):
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    probe = sgdprobe.attach(
        opt,
        model,
        loss_fn,
        loader,  # probe set: its first 8 batches (256 examples); B = 32 and N = 1797 read from it
        num_batches=8,
        logdir=logdir,
        every=every,
        plugins=["sharpness", "noise_kernel", "gradient_covariance"],
    )
    with probe:
        for epoch in range(epochs):
            if epoch == epochs // 2:
                for group in opt.param_groups:
                    group["lr"] = 4 * lr
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
    return dict(probe.history)


def summary(history: dict) -> str:
    tags = ["noise_kernel/K", "grad_cov/conditioning", "grad_cov/break_even_lhs", "sharpness/eos_ratio"]
    lines = ["step  " + "  ".join(f"{t:>24s}" for t in tags)]
    steps = [s for s, _ in history["noise_kernel/K"]]
    values = {t: dict(history[t]) for t in tags}
    for s in steps:
        lines.append(f"{s:4d}  " + "  ".join(f"{values[t].get(s, float('nan')):24.4g}" for t in tags))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits-noise")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    print(summary(main(args.logdir, args.epochs)))
    print(f"\nTensorBoard logs written to {args.logdir}")
