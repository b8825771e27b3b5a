"""The 2-parameter diagonal linear network of Wang & Roberts (§3.1, Fig. 1; MATH.md §5): the top Hessian
eigenvector rotates toward the sharp parameter θ1 for stable learning rates and away from it, at first,
for unstable ones.

    python examples/dln_eigenvector_rotation.py [--logdir runs/dln-eigvec]

L = z(Θ) = Θ², Θ = θ1θ2, GD (torch.optim.SGD) from (θ1, θ2) = (−0.1, 10), η ∈ {0.001, 0.0095, 0.011,
0.013}; 2/λ_max(θ0) ≈ 0.01. The probe measures after every step (at θ_{t+1}); a small plugin logs
``dln/R2`` = |u11/u12| of the probe's top eigenvector (from the shared cache) next to the
``eigenvector_similarity`` tags. Runs in a few seconds on CPU.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import sgdprobe

ETAS = (0.001, 0.0095, 0.011, 0.013)


class DLN(nn.Module):
    """Θ = θ1θ2 with two scalar parameters (the loss ``loss_fn`` is z(Θ) = Θ²)."""

    def __init__(self, theta1: float = -0.1, theta2: float = 10.0):
        super().__init__()
        self.theta1 = nn.Parameter(torch.tensor(theta1, dtype=torch.float64))
        self.theta2 = nn.Parameter(torch.tensor(theta2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.theta1 * self.theta2).expand(x.shape[0])


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out**2).mean()


class Orientation:
    """Logs R2 = |u11/u12| (Wang & Roberts eq. 1) of the top Hessian eigenvector, from the shared cache."""

    name = "dln"

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        u = snapshot.hessian_eigenpairs(1).eigenvectors[:, 0]
        return {"dln/R2": abs(float(u[0] / u[1])) if u[1] != 0 else float("inf")}


def run(eta: float, steps: int = 200, logdir: str | bool = False) -> dict:
    model = DLN()
    data = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    probe = sgdprobe.attach(
        opt,
        model,
        loss_fn,
        data,
        logdir=logdir,
        every=1,
        plugins=["sharpness", "eigenvector_similarity", Orientation()],
        lanczos_tol=1e-10,
    )
    probe.measure_now()  # step 0: θ0
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()
    probe.close()
    r2 = np.array([v for _, v in probe.history["dln/R2"]])
    cos = np.array([v for _, v in probe.history["eigvec/cos_prev_1"]])
    return {
        "R2": r2,
        "min_cos_prev": float(cos.min()),
        "theta": (model.theta1.item(), model.theta2.item()),
        "eos_ratio_0": probe.history["sharpness/eos_ratio"][0][1],
    }


def main(logdir: str | None = "runs/dln-eigvec") -> dict:
    results = {}
    for eta in ETAS:
        res = run(eta, logdir=f"{logdir}/eta={eta}" if logdir else False)
        results[eta] = res
        r2 = res["R2"][:41]
        argmin = int(np.argmin(r2))
        regime = "stable  " if res["eos_ratio_0"] < 1 else "unstable"
        trend = (
            "grows from step 0"
            if argmin == 0
            else f"falls for {argmin} steps (min {r2.min():.3f}), then grows"
        )
        print(
            f"eta={eta:<6} ({regime}, eta*lambda_max/2 = {res['eos_ratio_0']:.3f}): "
            f"R2[0:4] = {np.round(r2[:4], 4).tolist()}; R2 {trend}; "
            f"min |cos(v1(t), v1(t+1))| = {res['min_cos_prev']:.6f}; theta(200) = "
            f"({res['theta'][0]:.2e}, {res['theta'][1]:.6f})"
        )
    if logdir:
        print(f"TensorBoard: tensorboard --logdir {logdir}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/dln-eigvec")
    main(parser.parse_args().logdir)
