"""noise_kernel: 𝒦̂ = η/(2αB)·tr(G) against explicit Jacobians and output Hessians (float64), the
momentum form, the sampled-label estimator, sizes, refusals and TensorBoard."""

import pytest
import torch
from torch import nn

import sgdprobe
from tests.helpers import SmallCNN
from tests.linalg.test_per_example import ce_hz, explicit_gn_traces, problem
from tests.tbutil import scalars

HZ = {"mlp_mse": lambda z: 2 / 3 * torch.eye(3, dtype=z.dtype), "mlp_ce": ce_hz, "cnn_eval": ce_hz}


@pytest.mark.parametrize("kind", ["mlp_mse", "mlp_ce", "cnn_eval"])
def test_K_matches_explicit_jacobians(kind):
    model, loss_fn, batch = problem(kind, n=8)
    trace = explicit_gn_traces(model, loss_fn, batch, HZ[kind]).mean().item()
    out = sgdprobe.measure(model, loss_fn, batch, lr=0.3, batch_size=4, plugins=["noise_kernel"])
    assert out["noise_kernel/sampled"] == 0.0
    assert out["noise_kernel/gn_trace"] == pytest.approx(trace, rel=1e-6)
    assert out["noise_kernel/K"] == pytest.approx(0.3 / (2 * 4) * trace, rel=1e-6)
    assert out["noise_kernel/K_sgd"] == out["noise_kernel/K"]
    assert "noise_kernel/K_finite" not in out  # N unknown


@pytest.mark.parametrize(
    "kwargs, alpha",
    [
        (dict(momentum=0.9), 0.1),
        (dict(momentum=0.9, dampening=0.5), 0.2),
        (dict(momentum=0.5, nesterov=True), 0.5),
    ],
    ids=["heavy_ball", "dampening", "nesterov"],
)
def test_momentum_form_uses_alpha(kwargs, alpha):
    model, loss_fn, batch = problem("mlp_mse", n=8)
    trace = explicit_gn_traces(model, loss_fn, batch, HZ["mlp_mse"]).mean().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **kwargs)
    out = sgdprobe.measure(
        model, loss_fn, batch, optimizer=opt, batch_size=2, dataset_size=10, plugins=["noise_kernel"]
    )
    assert out["noise_kernel/K_sgd"] == pytest.approx(0.05 / 4 * trace, rel=1e-6)
    assert out["noise_kernel/K"] == pytest.approx(0.05 / (4 * alpha) * trace, rel=1e-6)
    assert out["noise_kernel/K_finite"] == pytest.approx((1 - 2 / 10) * out["noise_kernel/K"], rel=1e-12)


def test_adam_logs_the_trace_only():
    model, loss_fn, batch = problem("mlp_mse", n=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.warns(sgdprobe.ProbeWarning, match="defined for SGD"):
        out = sgdprobe.measure(model, loss_fn, batch, optimizer=opt, batch_size=2, plugins=["noise_kernel"])
    assert "noise_kernel/K" not in out and out["noise_kernel/gn_trace"] > 0


def test_sampled_estimator_through_the_plugin():
    model, loss_fn, batch = problem("mlp_ce", n=8)
    trace = explicit_gn_traces(model, loss_fn, batch, ce_hz).mean().item()
    # auto picks the sampled estimator above max_exact_outputs (4 classes here)
    opts = {"noise_kernel": {"max_exact_outputs": 3, "samples": 400}}
    out = sgdprobe.measure(model, loss_fn, batch, lr=0.1, batch_size=4, plugins=opts)
    assert out["noise_kernel/sampled"] == 1.0
    # 400 draws per example: the standard error of tr(G) is well below 5 %
    assert out["noise_kernel/gn_trace"] == pytest.approx(trace, rel=0.05)
    assert out["noise_kernel/gn_trace"] != pytest.approx(trace, rel=1e-9)  # sampled, not exact
    assert out["noise_kernel/K"] == pytest.approx(0.1 / 8 * out["noise_kernel/gn_trace"], rel=1e-12)


def test_refusals_name_the_fix():
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    batch = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(sgdprobe.ConfigError, match=r"bn.*model\.eval\(\)"):
        sgdprobe.measure(model, nn.CrossEntropyLoss(), batch, lr=0.1, batch_size=2, plugins=["noise_kernel"])
    model.eval()
    with pytest.raises(sgdprobe.ConfigError, match=r"batch_size=\.\.\."):
        sgdprobe.measure(model, nn.CrossEntropyLoss(), batch, lr=0.1, plugins=["noise_kernel"])
    with pytest.raises(sgdprobe.ConfigError, match="estimator"):
        sgdprobe.measure(
            model, nn.CrossEntropyLoss(), batch, lr=0.1, plugins={"noise_kernel": {"estimator": "x"}}
        )


def test_tags_reach_tensorboard_with_the_observed_batch_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(40, 5), torch.randn(40, 2)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sgdprobe.attach(
        opt, model, loss_fn, (x[:16], y[:16]), logdir=tmp_path, every=2, plugins=["noise_kernel"]
    ):
        for step in range(4):
            xb, yb = x[10 * step : 10 * step + 10], y[10 * step : 10 * step + 10]  # B = 10, seen in forward
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    K, trace = scalars(tmp_path, "noise_kernel/K"), scalars(tmp_path, "noise_kernel/gn_trace")
    assert [s for s, _ in K] == [2, 4] == [s for s, _ in trace]
    for (_, k), (_, t) in zip(K, trace):
        assert k == pytest.approx(0.05 / (2 * 10) * t, rel=1e-5)
