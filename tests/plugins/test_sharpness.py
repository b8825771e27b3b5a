"""Sharpness: Lanczos eigenpairs against dense Hessians, and thresholds against the optimizers' dynamics."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sgdprobe
from sgdprobe.config import build_config
from sgdprobe.snapshot import Snapshot
from tests.helpers import cnn_bn_dropout, dense_hessian, mlp, tiny_transformer


def problem(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = mlp().double()
        return (
            model,
            nn.MSELoss(),
            (torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)),
        )
    if kind == "cnn_bn_dropout":
        model = cnn_bn_dropout().double().train()
        x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
        return model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (12,)))
    model = tiny_transformer().double()
    return model, nn.CrossEntropyLoss(), (torch.randint(0, 11, (6, 5)), torch.randint(0, 3, (6,)))


TIGHT = dict(lanczos_tol=1e-10, lanczos_max_iter=400)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn_dropout", "transformer"])
def test_top3_eigenpairs_match_dense_hessian(kind):
    model, loss_fn, batch = problem(kind)
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    H = dense_hessian(model, loss_fn, batch, seed=0)
    w, V = torch.linalg.eigh(H)
    out = sgdprobe.measure(model, loss_fn, batch, lr=0.1, plugins={"sharpness": {"k": 3}}, **TIGHT)
    got = [out[f"sharpness/lambda_{i}"] for i in (1, 2, 3)]
    np.testing.assert_allclose(got, w[-3:].flip(0).numpy(), rtol=1e-6)
    assert out["sharpness/lambda_max"] == got[0]

    snap = Snapshot(build_config(model, None, loss_fn, batch, lr=0.1, **TIGHT), step=0)
    eig = snap.hessian_eigenpairs(3)
    cos = (eig.eigenvectors * V[:, -3:].flip(1)).sum(0).abs()
    assert (cos >= 0.9999).all(), cos
    for n, b in model.named_buffers():  # BatchNorm running stats untouched by the measurement
        assert torch.equal(b, buffers_before[n])


def test_dropout_mask_is_fixed_within_a_measurement():
    model, loss_fn, batch = problem("cnn_bn_dropout")
    snap = Snapshot(build_config(model, None, loss_fn, batch, lr=0.1), step=3)
    assert torch.equal(snap.loss(), snap.loss())
    other = Snapshot(build_config(model, None, loss_fn, batch, lr=0.1), step=4)
    assert not torch.equal(snap.loss(), other.loss())  # a new mask at another step


# --- thresholds -------------------------------------------------------------------------------------
ETA = 0.01


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: torch.optim.SGD(p, lr=ETA), 200.0),
        (lambda p: torch.optim.SGD(p, lr=ETA, momentum=0.9), 380.0),
        (lambda p: torch.optim.SGD(p, lr=ETA, momentum=0.9, nesterov=True), 135.714286),
        (lambda p: torch.optim.SGD(p, lr=ETA, momentum=0.9, dampening=0.5), 760.0),
        (lambda p: torch.optim.SGD(p, lr=ETA, weight_decay=1.0), 199.0),
        (lambda p: torch.optim.Adam(p, lr=ETA), 3800.0),
        (lambda p: torch.optim.AdamW(p, lr=ETA, weight_decay=0.1), 3800.0 * (2 - ETA * 0.1) / 2),
    ],
    ids=["sgd", "heavy_ball", "nesterov", "dampening", "coupled_wd", "adam", "adamw"],
)
def test_threshold_values(make, expected):
    """The oracle's numbers (MATH.md §1.3, eos_thresholds.py) and the formulas of §1.1."""
    opt = make([nn.Parameter(torch.zeros(1))])
    assert sgdprobe.stability_threshold(sgdprobe.describe_optimizer(opt)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.5, dampening=0.3),
        dict(weight_decay=3.0),
    ],
)
def test_sgd_threshold_separates_stable_from_unstable(kwargs):
    """Run the real torch optimizer on a 1-D quadratic ½a·x² with a just below and just above the
    threshold: the iterates must shrink below it and blow up above it."""

    def final(a):
        x = nn.Parameter(torch.ones((), dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=ETA, **kwargs)
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * a * x**2).backward()
            opt.step()
        return abs(x.item())

    thr = sgdprobe.stability_threshold(
        sgdprobe.describe_optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=ETA, **kwargs))
    )
    assert final(0.98 * thr) < 1e-3
    assert final(1.02 * thr) > 1e3


def test_adam_preconditioned_sharpness_matches_dense():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    out = sgdprobe.measure(model, loss_fn, (x, y), optimizer=opt, **TIGHT)
    H = dense_hessian(model, loss_fn, (x, y))
    # P_t = (1 - b1^t)(sqrt(v_t / (1 - b2^t)) + eps), t = 3 (MATH.md §1.2)
    P = torch.cat(
        [
            ((1 - 0.9**3) * ((opt.state[p]["exp_avg_sq"] / (1 - 0.99**3)).sqrt() + 1e-8)).reshape(-1)
            for p in model.parameters()
        ]
    )
    S = P.rsqrt()
    expected = torch.linalg.eigvalsh(S[:, None] * H * S[None, :])[-1].item()
    assert out["sharpness/preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-6)
    assert out["sharpness/threshold"] == pytest.approx(38 / 0.01)
    assert out["sharpness/eos_ratio"] == pytest.approx(expected / 380 / 10, rel=1e-6)
    assert out["sharpness/lambda_max"] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)


def test_parameter_groups_with_different_rates_use_the_preconditioned_operator():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.025}], lr=0.1)
    out = sgdprobe.measure(model, loss_fn, (x, y), optimizer=opt, **TIGHT)
    H = dense_hessian(model, loss_fn, (x, y))
    n1 = sum(p.numel() for p in first)
    s = torch.cat([torch.full((n1,), 1.0), torch.full((H.shape[0] - n1,), 0.25**0.5)]).double()
    expected = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()
    assert out["sharpness/preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-6)
    assert out["sharpness/threshold"] == pytest.approx(20.0)
    assert out["sharpness/eos_ratio"] == pytest.approx(expected / 20.0, rel=1e-6)


def test_threshold_follows_the_lr_scheduler(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1) as probe:
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step()
            sched.step()
    # measured right after step t, before sched.step(): lr = 0.1 * 0.5**(t-1)
    assert [v for _, v in probe.history["sharpness/threshold"]] == pytest.approx([20.0, 40.0, 80.0])


class MyOptimizer(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_unknown_optimizer_gets_lambda_max_and_one_warning(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = MyOptimizer(model.parameters())
    with pytest.warns(sgdprobe.ProbeWarning, match="no stability threshold is known for MyOptimizer") as rec:
        probe = sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step()
    probe.close()
    assert len([r for r in rec if "threshold" in str(r.message)]) == 1
    assert len(probe.history["sharpness/lambda_max"]) == 2
    assert "sharpness/threshold" not in probe.history and "sharpness/eos_ratio" not in probe.history


def test_bad_k():
    with pytest.raises(sgdprobe.ConfigError, match="k must be a positive integer"):
        sgdprobe.measure(
            mlp(),
            nn.MSELoss(),
            (torch.randn(4, 6), torch.randn(4, 3)),
            lr=0.1,
            plugins={"sharpness": {"k": 0}},
        )
