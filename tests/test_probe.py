"""The probe: one-line attach, bit-identical training, fault isolation, third-party plugins, TensorBoard."""

import math
import sys
import textwrap

import pytest
import torch
from torch import nn

import sgdprobe
from tests.helpers import cnn_bn_dropout, mlp
from tests.tbutil import read_events, scalars


# --- bit-identical training ---------------------------------------------------------------------------
def _mlp_sgd_momentum():
    model = mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), None, nn.MSELoss(), "regression"


def _mlp_adamw_scheduler():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return (
        model,
        opt,
        torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
        nn.MSELoss(),
        "regression",
    )


def _cnn_bn_dropout():
    model = cnn_bn_dropout().train()
    return (
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        None,
        nn.CrossEntropyLoss(),
        "images",
    )


def _mlp_cross_entropy_nesterov():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return model, opt, None, nn.CrossEntropyLoss(), "classes"


SETUPS = {
    "sgd_momentum": _mlp_sgd_momentum,
    "cross_entropy_nesterov": _mlp_cross_entropy_nesterov,
    "adamw_scheduler": _mlp_adamw_scheduler,
    "cnn_bn_dropout": _cnn_bn_dropout,
}


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "images":
        return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    if kind == "classes":
        return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def train(setup, probe_kwargs=None, steps=20):
    torch.manual_seed(0)
    model, opt, sched, loss_fn, kind = SETUPS[setup]()
    probe = None
    if probe_kwargs is not None:
        probe = sgdprobe.attach(opt, model, loss_fn, _data(kind, 16, 99), **probe_kwargs)
    for step in range(steps):
        x, y = _data(kind, 8, step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    if probe is not None:
        probe.close()
    return model, opt, torch.rand(3), probe


def assert_same_tree(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_is_bit_identical_with_the_probe_measuring_every_step(setup, tmp_path):
    ref_model, ref_opt, ref_draw, _ = train(setup)
    model, opt, draw, probe = train(setup, dict(logdir=tmp_path, every=1, plugins={"sharpness": {"k": 2}}))
    assert len(probe.history["sharpness/lambda_max"]) == 20  # it really measured every step
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(p.grad, q.grad), n
    for (n, b), (_, c) in zip(ref_model.named_buffers(), model.named_buffers()):
        assert torch.equal(b, c), n  # BatchNorm running stats and num_batches_tracked
    assert_same_tree(ref_opt.state_dict(), opt.state_dict())
    assert torch.equal(ref_draw, draw)  # the next random draw: the RNG stream was not consumed


ALL_BUILTINS = {
    "sharpness": {"k": 2},
    "eigenvector_similarity": {"k": 2},
    "noise_kernel": {},
    "gradient_covariance": {},
    "generalized_sharpness": {},
}
# BatchNorm in train mode mixes the examples of a batch: the per-example plugins refuse it at attach
# (tested in test_reliability), and the mini-batch covariance estimator stands in for them.
BN_BUILTINS = {
    "sharpness": {"k": 2},
    "eigenvector_similarity": {"k": 2},
    "gradient_covariance": {"estimator": "minibatch", "num_batches": 4, "minibatch_size": 4},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_is_bit_identical_with_every_builtin_plugin_measuring_every_step(setup, tmp_path):
    """The same contract with every built-in plugin enabled (per-example engines, sampled labels,
    Lanczos warm starts, stored eigenvectors): nothing they do reaches the training state."""
    plugins = BN_BUILTINS if setup == "cnn_bn_dropout" else dict(ALL_BUILTINS)
    if setup == "cross_entropy_nesterov":  # sampled labels: random draws that must stay off the training RNG
        plugins["noise_kernel"] = {"estimator": "sampled"}
    ref_model, ref_opt, ref_draw, _ = train(setup)
    kwargs = dict(logdir=tmp_path, every=1, plugins=plugins, batch_size=8, dataset_size=160)
    model, opt, draw, probe = train(setup, kwargs)
    skipped = [e for e in probe.events if e[1] != "warning"]
    measured = {tag.split("/")[0] for tag in probe.history}
    assert {"sharpness", "eigvec", "grad_cov"} <= measured, (measured, skipped)
    if setup != "cnn_bn_dropout":
        assert {"noise_kernel", "generalized_sharpness"} <= measured, (measured, skipped)
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(p.grad, q.grad), n
    for (n, b), (_, c) in zip(ref_model.named_buffers(), model.named_buffers()):
        assert torch.equal(b, c), n
    assert_same_tree(ref_opt.state_dict(), opt.state_dict())
    assert torch.equal(ref_draw, draw)


# --- schedule, history, close ------------------------------------------------------------------------
def _loop(model, opt, loss_fn, batch, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()


def test_every_n_steps_and_close_removes_hooks(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=3) as probe:
        _loop(model, opt, loss_fn, batch, 10)
    assert [s for s, _ in probe.history["sharpness/lambda_max"]] == [3, 6, 9]
    assert probe.step == 10
    _loop(model, opt, loss_fn, batch, 5)
    assert probe.step == 10 and len(probe.history["sharpness/lambda_max"]) == 3
    assert set(probe.history) >= {"probe/seconds", "probe/seconds/sharpness", "sharpness/threshold"}


def test_auto_schedule_measures_first_step_and_respects_budget(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, overhead=0.05) as probe:
        _loop(model, opt, loss_fn, batch, 50)
    steps = [s for s, _ in probe.history["sharpness/lambda_max"]]
    assert steps[0] == 1
    # a Lanczos run costs far more than 5% of one tiny training step, so most steps are not measured
    assert len(steps) < 25


def test_data_as_dataloader_takes_first_batches_and_sizes():
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randn(40, 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = sgdprobe.attach(opt, model, nn.MSELoss(), loader, logdir=False, num_batches=2)
    assert probe.config.num_examples == 16
    assert probe.config.batch_size == 8 and probe.config.dataset_size == 40
    probe.close()


def test_training_batch_size_is_observed_from_the_forward_pass(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []

    class Spy:
        name = "spy"

        @sgdprobe.hookimpl
        def sgdprobe_measure(self, snapshot):
            seen.append(snapshot.batch_size)

    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1, plugins=[Spy()]):
        x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert seen == [5]


# --- faults never stop training ----------------------------------------------------------------------
class Boom:
    name = "boom"

    def __init__(self):
        self.calls = 0

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot):
        self.calls += 1
        raise RuntimeError("plugin bug")


def test_a_raising_plugin_is_skipped_then_disabled_and_training_goes_on(mlp_problem, tmp_path):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    boom = Boom()
    with pytest.warns(sgdprobe.ProbeWarning, match="plugin bug"):
        with sgdprobe.attach(
            opt, model, loss_fn, batch, logdir=tmp_path, every=1, plugins=["sharpness", boom]
        ) as probe:
            _loop(model, opt, loss_fn, batch, 6)
    assert boom.calls == 3  # disabled after max_failures=3
    assert len(probe.history["sharpness/lambda_max"]) == 6  # the other plugin kept measuring
    kinds = [k for _, k, src, _ in probe.events if src == "boom"]
    assert kinds == ["skip", "skip", "skip", "disabled"]
    assert [v for _, v in scalars(tmp_path, "probe/events/skip")] == [1, 2, 3]


def test_nan_loss_at_a_measured_step_is_skipped_and_the_next_measures(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    poisoned = {"on": False}

    def probe_loss(out, y):
        value = loss_fn(out, y)
        return value * math.nan if poisoned["on"] else value

    with pytest.warns(sgdprobe.ProbeWarning, match="loss is nan"):
        with sgdprobe.attach(opt, model, probe_loss, batch, logdir=False, every=1) as probe:
            for step in range(1, 5):
                poisoned["on"] = step == 2
                _loop(model, opt, loss_fn, batch, 1)
    assert [s for s, _ in probe.history["sharpness/lambda_max"]] == [1, 3, 4]
    assert any("loss is nan" in msg for _, _, _, msg in probe.events)


def test_non_finite_parameters_skip_the_measurement(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(sgdprobe.ProbeWarning, match="parameters are not finite"):
        with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1) as probe:
            _loop(model, opt, loss_fn, batch, 1)
            with torch.no_grad():
                model[0].weight[0, 0] = math.inf
            _loop(model, opt, loss_fn, batch, 1)
    assert [s for s, _ in probe.history["sharpness/lambda_max"]] == [1]


def test_unconverged_lanczos_is_reported_never_logged_as_converged(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(sgdprobe.ProbeWarning, match="did not converge in 2 matvecs"):
        with sgdprobe.attach(
            opt, model, loss_fn, batch, logdir=False, every=1, lanczos_tol=1e-12, lanczos_max_iter=2
        ) as probe:
            _loop(model, opt, loss_fn, batch, 2)
    assert "sharpness/lambda_max" not in probe.history
    assert len([e for e in probe.events if e[1] == "skip"]) == 2


# --- third-party plugins -----------------------------------------------------------------------------
PLUGIN_SOURCE = textwrap.dedent(
    '''
    import sgdprobe

    class NormPlugin:
        """Logs the parameter norm and the step it saw."""

        def __init__(self, scale=1.0):
            self.scale = scale
            self.snapshots = []

        @sgdprobe.hookimpl
        def sgdprobe_measure(self, snapshot):
            self.snapshots.append(snapshot)
            norm = snapshot.flatten(snapshot.params).norm()
            return {"norm/params": self.scale * norm, "norm/step": snapshot.step}

        @sgdprobe.hookimpl
        def sgdprobe_layout(self):
            return {"parameter norm": ["norm/params"]}
    '''
)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path with an entry point in the 'sgdprobe' group, as pip would install it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sgdprobe_norm.py").write_text(PLUGIN_SOURCE)
    dist = site / "sgdprobe_norm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sgdprobe-norm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sgdprobe]\nnorm = sgdprobe_norm:NormPlugin\n")
    monkeypatch.syspath_prepend(str(site))
    yield "norm"
    sys.modules.pop("sgdprobe_norm", None)


def test_third_party_plugin_from_an_entry_point_reaches_tensorboard(installed_plugin, mlp_problem, tmp_path):
    assert "norm" in sgdprobe.available_plugins()
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logdir = tmp_path / "run"
    with sgdprobe.attach(
        opt, model, loss_fn, batch, logdir=logdir, every=2, plugins={"sharpness": {}, "norm": {"scale": 2.0}}
    ) as probe:
        _loop(model, opt, loss_fn, batch, 4)
    plugin = probe.pm.get_plugin("norm")
    assert [s.step for s in plugin.snapshots] == [2, 4]
    assert isinstance(plugin.snapshots[0], sgdprobe.Snapshot)
    expected = 2.0 * torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm().item()
    events = read_events(logdir)
    assert {
        "norm/params",
        "norm/step",
        "sharpness/lambda_max",
        "sharpness/threshold",
        "probe/seconds",
        "probe/seconds/norm",
    } <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("norm/params")] == [2, 4]
    assert events.Scalars("norm/params")[-1].value == pytest.approx(expected, rel=1e-5)
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0].decode(errors="ignore")
    assert "sharpness/lambda_max" in layout and "sharpness/threshold" in layout and "norm/params" in layout


def test_unknown_plugin_and_bad_options_fail_at_attach(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(sgdprobe.ConfigError, match="unknown plugin 'nope'.*Installed plugins"):
        sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, plugins=["nope"])
    with pytest.raises(
        sgdprobe.ConfigError, match="does not take the options \\['kk'\\].*Its options are: \\['k'\\]"
    ):
        sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, plugins={"sharpness": {"kk": 2}})


def test_misspelled_hook_is_rejected_at_attach(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    class Typo:
        name = "typo"

        def sgdprobe_mesure(self, snapshot):
            return {}

    with pytest.raises(sgdprobe.ConfigError, match="unknown hook 'sgdprobe_mesure'"):
        sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, plugins=[Typo()])


def test_measure_returns_scalars_without_hooks(mlp_problem):
    model, loss_fn, batch = mlp_problem
    out = sgdprobe.measure(model, loss_fn, batch, lr=0.5)
    assert out["sharpness/threshold"] == 4.0
    assert out["sharpness/eos_ratio"] == pytest.approx(out["sharpness/lambda_max"] / 4.0)


def test_per_example_limits_reach_the_engine(mlp_problem):
    model, loss_fn, batch = mlp_problem
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sgdprobe.attach(
        opt, model, loss_fn, batch, logdir=False, every=1, per_example_chunk=3, per_example_max_memory=2**20
    ) as probe:
        assert (probe.config.per_example_chunk, probe.config.per_example_max_memory) == (3, 2**20)
    with pytest.raises(sgdprobe.ConfigError, match="per_example_chunk"):
        sgdprobe.measure(model, loss_fn, batch, lr=0.1, per_example_chunk=0)
