"""gradient_covariance: spectrum of K_g against the explicit P×P covariance of per-example gradients
(float64), the rank rule, the mini-batch estimator's scale, break-even against dense per-example
Hessians, refusals and TensorBoard."""

import numpy as np
import pytest
import torch
from torch import nn

import sgdprobe
from tests.helpers import SmallCNN, dense_hessian
from tests.linalg.test_per_example import explicit_grads, problem
from tests.tbutil import scalars

TIGHT = dict(lanczos_tol=1e-10, lanczos_max_iter=400)


def explicit_covariance(model, loss_fn, batch):
    G = explicit_grads(model, loss_fn, batch)
    A = G - G.mean(0)
    return A.T @ A / len(G)  # P × P


@pytest.mark.parametrize("kind", ["mlp_mse", "mlp_ce", "cnn_eval"])
def test_spectrum_matches_the_explicit_covariance(kind):
    n = 10
    model, loss_fn, batch = problem(kind, n)
    K = explicit_covariance(model, loss_fn, batch)
    ev = torch.linalg.eigvalsh(K).flip(0)
    assert ev[n - 2] > 1e-8 * ev[0] and ev[n - 1].abs() < 1e-12 * ev[0]  # rank n − 1: the rule's case
    out = sgdprobe.measure(
        model, loss_fn, batch, lr=0.1, plugins={"gradient_covariance": {"break_even": False}}
    )
    assert out["grad_cov/rank"] == n - 1
    assert out["grad_cov/lambda_max"] == pytest.approx(ev[0].item(), rel=1e-6)
    assert out["grad_cov/lambda_min_nonzero"] == pytest.approx(ev[n - 2].item(), rel=1e-6)
    assert out["grad_cov/conditioning"] == pytest.approx((ev[n - 2] / ev[0]).item(), rel=1e-6)
    assert out["grad_cov/trace"] == pytest.approx(torch.trace(K).item(), rel=1e-6)


def test_float32_measurement_resolves_small_eigenvalues():
    """The Gram matrix is accumulated in float64: a float32 model's conditioning (≈ 2e-5 on digits)
    matches the float64 reference, where a float32 Gram product stops at its rounding floor (≈ 3e-5)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    out = sgdprobe.measure(
        model, nn.CrossEntropyLoss(), (x, y), lr=0.1, plugins={"gradient_covariance": {"break_even": False}}
    )
    G = explicit_grads(model.double(), nn.CrossEntropyLoss(), (x.double(), y))
    ev = torch.linalg.svdvals(G - G.mean(0)) ** 2 / len(G)  # K_g's spectrum by an SVD, no Gram matrix
    assert out["grad_cov/rank"] == 255
    assert (ev[254] / ev[0]).item() < 3e-5
    assert out["grad_cov/conditioning"] == pytest.approx((ev[254] / ev[0]).item(), rel=1e-3)


def test_rank_is_capped_by_the_number_of_parameters():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()  # P = 3 < n − 1
    batch = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(explicit_covariance(model, nn.MSELoss(), batch)).flip(0)
    out = sgdprobe.measure(
        model, nn.MSELoss(), batch, lr=0.1, plugins={"gradient_covariance": {"break_even": False}}
    )
    assert out["grad_cov/rank"] == 3
    assert out["grad_cov/conditioning"] == pytest.approx((ev[2] / ev[0]).item(), rel=1e-6)


def test_break_even_lhs_matches_dense_per_example_hessians():
    n, S, N, eta = 8, 2, 50, 0.3
    model, loss_fn, (x, y) = problem("mlp_ce", n)
    Hs = torch.stack([dense_hessian(model, loss_fn, (x[i : i + 1], y[i : i + 1])) for i in range(n)])
    w, V = torch.linalg.eigh(Hs.mean(0))
    lam, v = w[-1].item(), V[:, -1]
    s2 = torch.einsum("p,ipq,q->i", v, Hs, v).var(unbiased=False).item()
    expected = (1 - eta * lam) ** 2 + s2 * eta**2 * (N - S) / (S * (N - 1))
    out = sgdprobe.measure(
        model, loss_fn, (x, y), lr=eta, batch_size=S, dataset_size=N, plugins=["gradient_covariance"], **TIGHT
    )
    assert out["grad_cov/curvature_variance"] == pytest.approx(s2, rel=1e-6)
    assert out["grad_cov/break_even_lhs"] == pytest.approx(expected, rel=1e-6)
    assert s2 * eta**2 * (N - S) / (S * (N - 1)) > 1e-3 * expected  # the noise term matters here


@pytest.mark.parametrize("M, L", [(3, 4), (2, 3)], ids=["LM=n", "LM<n"])
def test_minibatch_estimator_is_unbiased_for_the_trace(M, L):
    n = 12
    model, loss_fn, batch = problem("mlp_mse", n)
    exact = torch.trace(explicit_covariance(model, loss_fn, batch)).item()
    opts = {
        "gradient_covariance": {
            "estimator": "minibatch",
            "num_batches": L,
            "minibatch_size": M,
            "break_even": False,
        }
    }
    draws = np.array(
        [
            sgdprobe.measure(model, loss_fn, batch, lr=0.1, seed=s, plugins=opts)["grad_cov/trace"]
            for s in range(150)
        ]
    )
    assert abs(draws.mean() - exact) <= 3 * draws.std() / np.sqrt(len(draws)), (draws.mean(), exact)
    assert draws.std() > 0.05 * exact  # random mini-batches: a single draw is not exact


def test_minibatch_estimator_runs_with_batchnorm_in_train_mode_and_per_example_is_refused():
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    batch = torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    with pytest.raises(sgdprobe.ConfigError, match=r"bn.*model\.eval\(\).*'minibatch'"):
        sgdprobe.measure(model, nn.CrossEntropyLoss(), batch, lr=0.1, plugins=["gradient_covariance"])
    opts = {"gradient_covariance": {"estimator": "minibatch", "num_batches": 4, "minibatch_size": 4}}
    out = sgdprobe.measure(model, nn.CrossEntropyLoss(), batch, lr=0.1, plugins=opts)
    assert (
        out["grad_cov/rank"] == 3 and out["grad_cov/lambda_max"] > 0 and "grad_cov/break_even_lhs" not in out
    )
    with pytest.raises(sgdprobe.ConfigError, match="need 40 probe examples"):
        sgdprobe.measure(
            model,
            nn.CrossEntropyLoss(),
            batch,
            lr=0.1,
            plugins={"gradient_covariance": {**opts["gradient_covariance"], "num_batches": 10}},
        )


def test_break_even_requires_the_dataset_size():
    model, loss_fn, batch = problem("mlp_mse", 6)
    with pytest.raises(sgdprobe.ConfigError, match=r"dataset_size=\.\.\."):
        sgdprobe.measure(model, loss_fn, batch, lr=0.1, batch_size=2, plugins=["gradient_covariance"])


def test_tags_reach_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (x[:16], y[:16])
    with sgdprobe.attach(
        opt, model, loss_fn, data, logdir=tmp_path, every=2, dataset_size=40, plugins=["gradient_covariance"]
    ):
        for step in range(4):
            opt.zero_grad()
            loss_fn(model(x[10 * step : 10 * step + 10]), y[10 * step : 10 * step + 10]).backward()
            opt.step()
    for tag in ("lambda_max", "conditioning", "trace", "break_even_lhs"):
        values = scalars(tmp_path, f"grad_cov/{tag}")
        assert [s for s, _ in values] == [2, 4] and all(np.isfinite(v) for _, v in values)


def test_example_runs_both_plugins_enabled_by_name(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "digits_noise_and_covariance.py"
    spec = importlib.util.spec_from_file_location("digits_noise_and_covariance", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(logdir=str(tmp_path), epochs=2, every=45)  # 57 steps per epoch
    K = scalars(tmp_path, "noise_kernel/K")
    assert [s for s, _ in K] == [45, 90]
    assert K[1][1] > 2 * K[0][1]  # the learning rate was multiplied by 4 after the first epoch
    for tag in ("grad_cov/conditioning", "grad_cov/break_even_lhs", "noise_kernel/gn_trace"):
        assert [s for s, _ in scalars(tmp_path, tag)] == [45, 90] == [s for s, _ in history[tag]]
