"""generalized_sharpness: exact value and bounds on real networks against dense per-example Hessians and
explicit Kronecker products; the threshold against real torch SGD; configuration errors."""

import itertools
import warnings

import pytest
import torch
from torch import nn

import sgdprobe
from sgdprobe.linalg import mean_square as ms
from tests.helpers import cnn_bn_dropout, dense_hessian
from tests.linalg.test_mean_square import brute_value, rayleigh

TIGHT = dict(lanczos_tol=1e-10, lanczos_max_iter=200)
G = "generalized_sharpness/"


def interpolating_relu_net(n: int = 16, d_in: int = 4, width: int = 3, seed: int = 0):
    """A one-hidden-layer ReLU net with MSE at an interpolating minimum (targets = its own outputs), so
    every H_i = (2/C) J_iᵀ J_i is PSD (Def. 2); 19 parameters, n examples (H singular when n < 19)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, 1)).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return model, nn.MSELoss(), (x, y)


def dense_per_example_hessians(model, loss_fn, batch) -> torch.Tensor:
    x, y = batch
    return torch.stack([dense_hessian(model, loss_fn, (x[i : i + 1], y[i : i + 1])) for i in range(len(x))])


@pytest.mark.parametrize("B", [1, 3, 16])
def test_exact_mode_on_a_relu_net_matches_kronecker_products(B):
    model, loss_fn, batch = interpolating_relu_net()
    N = 16
    Hs = dense_per_example_hessians(model, loss_fn, batch)
    H = dense_hessian(model, loss_fn, batch)
    assert torch.allclose(Hs.mean(0), H, atol=1e-12)  # mean-reduced loss: H = mean H_i
    p = ms.mixing_weight(B, N)
    expected = brute_value(Hs, p)
    out = sgdprobe.measure(
        model, loss_fn, batch, lr=0.05, batch_size=B, dataset_size=N, plugins={G[:-1]: {"rank": 3}}, **TIGHT
    )
    assert out[G + "value"] == pytest.approx(expected, rel=1e-8)
    assert out[G + "threshold_lr"] == pytest.approx(2 / expected, rel=1e-8)
    assert out[G + "lr_ratio"] == pytest.approx(0.05 * expected / 2, rel=1e-8)
    lam, V = torch.linalg.eigh(H)
    assert out[G + "hessian_lambda_max"] == pytest.approx(float(lam[-1]), rel=1e-10)
    if B == N:
        assert out[G + "value"] == pytest.approx(float(lam[-1]), rel=1e-8)
    # eq. (15) and (16) are the explicit pencil's Rayleigh quotients at v_max v_maxᵀ and I
    v = V[:, -1]
    assert out[G + "lower_bound_eq15"] == pytest.approx(rayleigh(Hs, p, torch.outer(v, v)), rel=1e-8)
    assert out[G + "lower_bound_eq16"] == pytest.approx(rayleigh(Hs, p, torch.eye(len(H)).double()), rel=1e-8)
    for name in ("eq15", "eq16", "rank1", "rank3"):
        assert out[G + f"lower_bound_{name}"] <= expected * (1 + 1e-9)
        upper = out[G + f"threshold_lr_upper_bound_{name}"]
        assert upper == pytest.approx(2 / out[G + f"lower_bound_{name}"])
    assert out[G + "lower_bound_rank1"] >= out[G + "lower_bound_eq15"] * (1 - 1e-12)
    assert "generalized_sharpness/lr_ratio_lower_bound" not in out  # exact mode: no ambiguous tags


def test_bounds_mode_matches_the_dense_computation_on_the_lanczos_subspace():
    model, loss_fn, batch = interpolating_relu_net()
    Hs = dense_per_example_hessians(model, loss_fn, batch)
    p = ms.mixing_weight(2, 50)
    kw = dict(lr=0.05, batch_size=2, dataset_size=50, **TIGHT)
    bounds = sgdprobe.measure(model, loss_fn, batch, plugins={G[:-1]: {"mode": "bounds", "rank": 3}}, **kw)
    exact = sgdprobe.measure(model, loss_fn, batch, plugins={G[:-1]: {"mode": "exact", "rank": 3}}, **kw)
    assert G + "value" not in bounds and G + "lr_ratio" not in bounds and G + "threshold_lr" not in bounds
    lam, E = torch.linalg.eigh(Hs.mean(0))
    W = E.flip(1)[:, :3]
    compressed = W.T @ Hs @ W  # the exact problem on span of the top-3 eigenvectors, formed densely
    dense = ms.generalized_sharpness(compressed, p).value
    assert bounds[G + "lower_bound_rank3"] == pytest.approx(dense, rel=1e-7)
    assert bounds[G + "lower_bound_eq15"] == pytest.approx(exact[G + "lower_bound_eq15"], rel=1e-7)
    best = max(bounds[G + f"lower_bound_{k}"] for k in ("eq15", "rank1", "rank3"))
    assert bounds[G + "lower_bound"] == best <= exact[G + "value"] * (1 + 1e-9)
    assert bounds[G + "lr_ratio_lower_bound"] == pytest.approx(0.05 * best / 2)
    assert bounds[G + "lr_ratio_lower_bound"] <= exact[G + "lr_ratio"] * (1 + 1e-9)


def test_auto_switches_to_bounds_above_max_exact_params():
    model, loss_fn, batch = interpolating_relu_net()
    kw = dict(lr=0.05, batch_size=2, dataset_size=16, **TIGHT)
    small = sgdprobe.measure(model, loss_fn, batch, plugins={G[:-1]: {}}, **kw)
    large = sgdprobe.measure(model, loss_fn, batch, plugins={G[:-1]: {"max_exact_params": 18}}, **kw)
    assert G + "value" in small and G + "value" not in large and G + "lower_bound" in large


@pytest.mark.parametrize("B", [1, 2, 4])
def test_threshold_is_where_real_torch_sgd_loses_mean_square_stability(B):
    """Interpolating linear regression with nn.MSELoss: one real torch.optim.SGD step on batch b maps
    θ − θ* to A_b (θ − θ*); read every A_b off the optimizer (d probes per batch, all C(N, B) batches)
    and form the exact second-moment operator Q(η) = mean_b A_b⊗A_b. Its spectral radius must be 1 at
    the logged η* = threshold_lr (below 1 just under it, above just over it)."""
    torch.manual_seed(1)
    N, d = 6, 3
    x = torch.randn(N, d, dtype=torch.float64)
    theta_star = torch.randn(1, d, dtype=torch.float64)
    y = x @ theta_star.T
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta_star)
    out = sgdprobe.measure(
        model, nn.MSELoss(), (x, y), lr=1.0, batch_size=B, dataset_size=N, plugins=[G[:-1]], **TIGHT
    )
    eta_star = out[G + "threshold_lr"]

    def rho(eta):
        Q = torch.zeros(d * d, d * d, dtype=torch.float64)
        batches = list(itertools.combinations(range(N), B))
        for b in batches:
            A = torch.empty(d, d, dtype=torch.float64)
            for k in range(d):
                w = nn.Parameter(theta_star + torch.eye(d, dtype=torch.float64)[k : k + 1])
                opt = torch.optim.SGD([w], lr=eta)
                opt.zero_grad()
                nn.MSELoss()(x[list(b)] @ w.T, y[list(b)]).backward()
                opt.step()
                A[:, k] = (w.detach() - theta_star)[0]
            Q += torch.kron(A, A) / len(batches)
        return float(torch.linalg.eigvals(Q).abs().max())

    assert rho(eta_star) == pytest.approx(1.0, abs=1e-9)
    assert rho(0.98 * eta_star) < 1 - 1e-4 and rho(1.02 * eta_star) > 1 + 1e-4


def test_attach_reads_sizes_from_a_dataloader_and_logs_during_training():
    model, loss_fn, (x, y) = interpolating_relu_net()
    y = y + 0.1 * torch.randn_like(y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sgdprobe.attach(opt, model, loss_fn, loader, num_batches=4, logdir=False, every=2,
                         plugins=[G[:-1]], **TIGHT) as probe:
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    assert [s for s, _ in probe.history[G + "value"]] == [2, 4]
    assert probe.history[G + "p"][0][1] == pytest.approx(ms.mixing_weight(4, 16))
    assert all(v > 0 for _, v in probe.history[G + "threshold_lr"])


def test_momentum_warns_once():
    model, loss_fn, batch = interpolating_relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(sgdprobe.ProbeWarning, match="plain SGD") as rec:
        probe = sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1, plugins=[G[:-1]],
                                batch_size=4, dataset_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step()
    probe.close()
    assert len([r for r in rec if "plain SGD" in str(r.message)]) == 1
    assert len(probe.history[G + "value"]) == 2


def test_configuration_errors():
    model, loss_fn, batch = interpolating_relu_net()
    with pytest.raises(sgdprobe.ConfigError, match="dataset_size=..."):
        sgdprobe.measure(model, loss_fn, batch, lr=0.1, batch_size=2, plugins=[G[:-1]])
    with pytest.raises(sgdprobe.MeasurementError, match="batch_size=..."):
        sgdprobe.measure(model, loss_fn, batch, lr=0.1, dataset_size=16, plugins=[G[:-1]])
    with pytest.raises(sgdprobe.ConfigError, match="mode must be one of"):
        sgdprobe.measure(model, loss_fn, batch, lr=0.1, plugins={G[:-1]: {"mode": "fast"}})
    cnn = cnn_bn_dropout().double().train()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(sgdprobe.ConfigError, match="BatchNorm in train mode.*model.eval"):
        sgdprobe.measure(cnn, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (6,))), lr=0.1,
                         batch_size=2, dataset_size=6, plugins=[G[:-1]])


@pytest.mark.parametrize("mode", ["exact", "bounds"])
def test_sum_reduced_loss_is_refused(mode):
    model, _, (x, y) = interpolating_relu_net()
    with pytest.raises(sgdprobe.MeasurementError, match="mean-reduced"):
        sgdprobe.measure(model, nn.MSELoss(reduction="sum"), (x, y + 0.1), lr=0.1, batch_size=2,
                         dataset_size=16, plugins={G[:-1]: {"mode": mode}}, **TIGHT)
