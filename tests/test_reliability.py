"""Issue 6: bad input fails at attach; faults never stop training; nothing is lost; resume; isolation."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sgdprobe
from sgdprobe.linalg import HessianVectorProduct
from tests.helpers import mlp
from tests.tbutil import read_events, scalars
from tests.test_probe import assert_same_tree


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _step(model, opt, loss_fn, batch):
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    opt.step()


# --- 1. bad input at attach time -------------------------------------------------------------------------
class NoLR(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        pass


def _frozen_mlp():
    model = mlp()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer=lambda m: NoLR(m.parameters())), "has no learning rate"),
        (
            dict(
                model=_frozen_mlp, optimizer=lambda m: torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
            ),
            "no trainable parameters",
        ),
        (dict(data=(torch.randn(4, 5), torch.randn(4, 3))), "does not fit the model.*mat1 and mat2"),
        (dict(data=[torch.randn(4, 6)]), "must be \\(inputs, targets\\)"),
        (dict(loss_fn=nn.MSELoss(reduction="none")), "loss_fn must return a scalar, got \\(4, 3\\)"),
        (dict(plugins=["no_such_plugin"]), "unknown plugin 'no_such_plugin'"),
        (dict(plugins={"sharpness": {"kk": 1}}), "does not take the options"),
        (dict(logdir="/proc/sgdprobe-cannot-write-here"), "cannot write TensorBoard logs"),
        (dict(every=0), "every must be a positive integer"),
        (
            dict(optimizer=lambda m: torch.optim.SGD(mlp().parameters(), lr=0.1)),
            "none of the model's trainable",
        ),
    ],
    ids=[
        "no_lr",
        "no_trainable",
        "data_shape",
        "data_not_batch",
        "loss_not_scalar",
        "unknown_plugin",
        "bad_option",
        "unwritable_logdir",
        "bad_every",
        "foreign_optimizer",
    ],
)
def test_bad_input_fails_at_attach_with_the_fix(kwargs, match):
    model = kwargs.pop("model", mlp)()
    opt = kwargs.pop("optimizer", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))(model)
    args = dict(loss_fn=nn.MSELoss(), data=(torch.randn(4, 6), torch.randn(4, 3)), logdir=False)
    args.update(kwargs)
    with pytest.raises(sgdprobe.ConfigError, match=match):
        sgdprobe.attach(opt, model, **args)


# --- 2. faults during training never stop it --------------------------------------------------------------
def test_out_of_memory_inside_a_measurement_is_skipped(monkeypatch):
    model, loss_fn, batch = mlp(), nn.MSELoss(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    real_call = HessianVectorProduct.__call__
    calls = {"n": 0}

    def flaky(self, v):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, v)

    monkeypatch.setattr(HessianVectorProduct, "__call__", flaky)
    with pytest.warns(sgdprobe.ProbeWarning, match="OutOfMemoryError.*simulated"):
        with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1) as probe:
            for _ in range(3):
                _step(model, opt, loss_fn, batch)
    assert [s for s, _ in probe.history["sharpness/lambda_max"]] == [2, 3]
    assert probe.events[0][:3] == (1, "skip", "sharpness")


def test_a_failure_outside_plugins_is_skipped_too(monkeypatch):
    model, loss_fn, batch = mlp(), nn.MSELoss(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=1) as probe:
        monkeypatch.setattr(sgdprobe.probe, "Snapshot", lambda *a, **k: 1 / 0)
        with pytest.warns(sgdprobe.ProbeWarning, match="ZeroDivisionError"):
            _step(model, opt, loss_fn, batch)
        monkeypatch.undo()
        _step(model, opt, loss_fn, batch)
    assert [s for s, _ in probe.history["sharpness/lambda_max"]] == [2]


# --- 3. nothing lost --------------------------------------------------------------------------------------
KILLED_RUN = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import sgdprobe
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    probe = sgdprobe.attach(opt, model, nn.MSELoss(), (x, y), logdir=sys.argv[1], every=1)
    for step in range(1, 10_000):
        opt.zero_grad(); nn.MSELoss()(model(x), y).backward(); opt.step()
        print(step, flush=True)
        if step == 5:
            time.sleep(600)  # killed here with SIGKILL: no close(), no atexit
    """
)


def test_records_survive_sigkill(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    logdir = tmp_path / "tb"
    proc = subprocess.Popen([sys.executable, str(script), str(logdir)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "5":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in scalars(logdir, "sharpness/lambda_max")] == [1, 2, 3, 4, 5]


# --- 4. resume ---------------------------------------------------------------------------------------------
class Counter:
    """A plugin with state: counts its measurements across resumes."""

    name = "counter"

    def __init__(self):
        self.count = 0

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot):
        self.count += 1
        return {"counter/count": self.count}

    @sgdprobe.hookimpl
    def sgdprobe_state_dict(self):
        return {"count": self.count}

    @sgdprobe.hookimpl
    def sgdprobe_load_state_dict(self, state):
        self.count = state["count"]


def test_resume_continues_the_same_run(tmp_path):
    loss_fn, batch = nn.MSELoss(), _batch()
    logdir = tmp_path / "tb"
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    probe = sgdprobe.attach(
        opt, model, loss_fn, batch, logdir=logdir, every=2, plugins=["sharpness", Counter()]
    )
    for _ in range(4):
        _step(model, opt, loss_fn, batch)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "probe": probe.state_dict()},
        tmp_path / "ckpt.pt",
    )
    for _ in range(2):  # steps 5-6 are measured, then the run "crashes"
        _step(model, opt, loss_fn, batch)
    probe.close()

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = mlp()
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.load_state_dict(ckpt["opt"])
    probe = sgdprobe.attach(
        opt, model, loss_fn, batch, logdir=logdir, every=2, plugins=["sharpness", Counter()]
    )
    probe.load_state_dict(ckpt["probe"])
    assert probe.step == 4 and probe.config.warm_start[False].shape == (
        sum(p.numel() for p in model.parameters()),
    )
    for _ in range(4):
        _step(model, opt, loss_fn, batch)
    probe.close()
    assert [s for s, _ in probe.history["counter/count"]] == [6, 8]
    assert [s for s, v in scalars(logdir, "counter/count")] == [2, 4, 6, 8]  # the crashed step 6 is purged
    assert [v for s, v in scalars(logdir, "counter/count")] == [1, 2, 3, 4]


# --- 5. isolation: bit-identical trajectories in the harder setups ----------------------------------------
def _run(setup, with_probe, tmp_path=None, steps=8):
    torch.manual_seed(0)
    model = mlp()
    loss_fn = nn.MSELoss()
    extra = {}
    if setup == "frozen":
        model[0].weight.requires_grad_(False)
    if setup == "param_groups":
        opt = torch.optim.SGD(
            [{"params": model[0].parameters(), "lr": 0.05}, {"params": model[2].parameters(), "lr": 0.01}],
            lr=0.05,
            momentum=0.9,
        )
    else:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    train_model = model
    if setup == "compile":
        train_model = torch.compile(model, backend="eager")
    scaler = torch.amp.GradScaler("cpu") if setup == "amp" else None
    probe = None
    if with_probe:
        probe = sgdprobe.attach(opt, train_model, loss_fn, _batch(16, 99), logdir=False, every=1, **extra)
    accumulate = 3 if setup == "accumulation" else 1
    for step in range(steps):
        for micro in range(accumulate):
            x, y = _batch(8, 100 * step + micro)
            if setup == "amp":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(train_model(x), y)
                scaler.scale(loss).backward()
            else:
                (loss_fn(train_model(x), y) / accumulate).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    if probe is not None:
        probe.close()
    return model, opt, torch.rand(2), probe


@pytest.mark.parametrize("setup", ["amp", "accumulation", "compile", "frozen", "param_groups"])
def test_isolation_bit_identical(setup):
    ref_model, ref_opt, ref_draw, _ = _run(setup, False)
    model, opt, draw, probe = _run(setup, True)
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    assert_same_tree(ref_opt.state_dict(), opt.state_dict())
    assert torch.equal(ref_draw, draw)
    measured = [s for s, _ in probe.history["sharpness/lambda_max"]]
    assert measured == list(range(1, 9))  # once per real optimizer step (not per micro-batch)
    if setup == "frozen":
        assert "0.weight" not in probe.config.param_names
    if setup == "amp":
        assert probe.history["sharpness/lambda_max"][0][1] == pytest.approx(
            sgdprobe.measure(ref_model, nn.MSELoss(), _batch(16, 99), lr=0.05)["sharpness/lambda_max"],
            rel=0.5,
        )


def test_measurements_are_float32_under_autocast():
    model = mlp()
    seen = []

    class Dtype:
        name = "dtype"

        @sgdprobe.hookimpl
        def sgdprobe_measure(self, snapshot):
            seen.append((snapshot.dtype, snapshot.loss().dtype))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sgdprobe.measure(model, nn.MSELoss(), _batch(), lr=0.1, plugins=[Dtype()])
    assert seen == [(torch.float32, torch.float32)]


class UpdateRecorder:
    """A plugin that requires the update and records ``snapshot.update`` at every measurement."""

    name = "needs_update"

    def __init__(self):
        self.updates = []

    @sgdprobe.hookimpl
    def sgdprobe_requirements(self):
        return ["update"]

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot):
        self.updates.append(None if snapshot.update is None else snapshot.flatten(snapshot.update))


def test_update_is_provided_when_a_plugin_requires_it():
    model, loss_fn, batch = mlp(), nn.MSELoss(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = UpdateRecorder()
    with sgdprobe.attach(opt, model, loss_fn, batch, logdir=False, every=2, plugins=[recorder]):
        for _ in range(4):
            before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            _step(model, opt, loss_fn, batch)
            after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert len(recorder.updates) == 2
    torch.testing.assert_close(recorder.updates[-1], after - before)


def test_update_is_provided_at_every_auto_measurement(monkeypatch):
    """With the time budget the decision is taken before the step, so every measured step has its
    update (checking again after the step, with that step's time added, could say yes without one)."""
    import sgdprobe.probe as probe_module

    clock = iter(range(10**6))  # every reading of the clock advances it by 1 s
    monkeypatch.setattr(probe_module.time, "perf_counter", lambda: float(next(clock)))
    model, loss_fn, batch = mlp(), nn.MSELoss(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = UpdateRecorder()
    with sgdprobe.attach(
        opt, model, loss_fn, batch, logdir=False, every="auto", overhead=0.5, plugins=[recorder]
    ) as probe:
        for _ in range(60):
            _step(model, opt, loss_fn, batch)
    assert len(recorder.updates) == probe.schedule.measurements >= 3
    assert all(u is not None for u in recorder.updates)


# --- 6. broken installed plugins are reported and skipped ---------------------------------------------------
def _install(tmp_path, monkeypatch, name, source):
    site = tmp_path / f"site_{name}"
    site.mkdir()
    (site / f"sgdprobe_{name}.py").write_text(textwrap.dedent(source))
    dist = site / f"sgdprobe_{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sgdprobe-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[sgdprobe]\n{name} = sgdprobe_{name}:Plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, f"sgdprobe_{name}", raising=False)


def test_installed_plugin_that_fails_to_import_is_skipped(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "broken", "import not_a_module_anywhere\n")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(sgdprobe.ProbeWarning, match="'broken'.*failed to import.*not_a_module_anywhere"):
        probe = sgdprobe.attach(
            opt, model, nn.MSELoss(), _batch(), logdir=False, every=1, plugins=["sharpness", "broken"]
        )
    _step(model, opt, nn.MSELoss(), _batch())
    probe.close()
    assert len(probe.history["sharpness/lambda_max"]) == 1


def test_installed_plugin_with_a_bad_hook_is_skipped_with_its_name(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "badhook",
        """
        import sgdprobe
        class Plugin:
            @sgdprobe.hookimpl
            def sgdprobe_measure(self, snapshot, oops):
                return {}
        """,
    )
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(sgdprobe.ProbeWarning, match="(?s)plugin 'badhook'.*sgdprobe_measure.*oops"):
        probe = sgdprobe.attach(
            opt, model, nn.MSELoss(), _batch(), logdir=False, plugins=["sharpness", "badhook"]
        )
    assert probe.pm.get_plugin("badhook") is None
    probe.close()


def test_events_reach_tensorboard(tmp_path):
    class Fails:
        name = "fails"

        @sgdprobe.hookimpl
        def sgdprobe_measure(self, snapshot):
            raise ValueError("bad luck")

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(sgdprobe.ProbeWarning):
        with sgdprobe.attach(opt, model, nn.MSELoss(), _batch(), logdir=tmp_path, every=1, plugins=[Fails()]):
            _step(model, opt, nn.MSELoss(), _batch())
    events = read_events(tmp_path)
    assert "probe/events/fails/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("probe/events/fails/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "bad luck" in text and "[skip]" in text
