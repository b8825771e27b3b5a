"""Per-example engine against explicit float64 computations: per-example Hessians formed densely, one
backward per example, explicit Jacobians and output Hessians; chunking, OOM retry and bounded memory."""

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.profiler import ProfilerActivity, profile

import sgdprobe
from sgdprobe.config import build_config
from sgdprobe.linalg import per_example
from sgdprobe.linalg.ghost import per_example_losses
from sgdprobe.snapshot import Snapshot
from tests.helpers import SmallCNN, TinyTransformer, dense_hessian, mlp, tiny_transformer


def half_squared_error(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def problem(kind: str, n: int = 10):
    torch.manual_seed(0)
    if kind == "mlp_mse":
        model = mlp().double()
        return (
            model,
            nn.MSELoss(),
            (torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)),
        )
    if kind == "mlp_half_se":
        model = mlp().double()
        x, y = torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
        return model, half_squared_error, (x, y)
    if kind == "mlp_ce":
        model = mlp(d_out=4).double()
        return (
            model,
            nn.CrossEntropyLoss(),
            (torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 4, (n,))),
        )
    if kind == "transformer":  # LayerNorm, attention, embedding
        model = tiny_transformer().double()
        return model, nn.CrossEntropyLoss(), (torch.randint(0, 11, (n, 5)), torch.randint(0, 3, (n,)))
    assert kind == "cnn_eval"
    model = SmallCNN().double()
    with torch.no_grad():  # non-trivial running statistics, used in eval mode
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    return (
        model,
        nn.CrossEntropyLoss(),
        (torch.randn(n, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (n,))),
    )


def snapshot(model, loss_fn, batch, **kw):
    return Snapshot(build_config(model, None, loss_fn, batch, lr=0.1, **kw), step=0)


def explicit_grads(model, loss_fn, batch):
    x, y = batch
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


KINDS = ["mlp_mse", "mlp_ce", "cnn_eval"]


@functools.lru_cache
def per_example_hessians(kind: str, n: int) -> torch.Tensor:
    model, loss_fn, (x, y) = problem(kind, n)
    return torch.stack([dense_hessian(model, loss_fn, (x[i : i + 1], y[i : i + 1])) for i in range(n)])


# ----------------------------------------------------------------------------- quadratic forms
@pytest.mark.parametrize("kind", [*KINDS, "transformer"])
@pytest.mark.parametrize("method", ["batched", "vmap"])
def test_quadratic_forms_match_dense_per_example_hessians(kind, method):
    n = 6 if kind in ("cnn_eval", "transformer") else 10
    model, loss_fn, batch = problem(kind, n)
    snap = snapshot(model, loss_fn, batch, per_example_chunk=4)  # 2 or 3 chunks
    V = torch.randn(snap.num_params, 3, dtype=torch.float64)
    Q = snap.per_example_quadratic_forms(V, method=method)
    expected = V.T @ per_example_hessians(kind, n) @ V
    assert Q.shape == (n, 3, 3)
    assert rel(Q, expected) < 1e-10
    q = snap.per_example_quadratic_forms(V[:, 0], method=method)  # r = 1 from a vector
    assert q.shape == (n, 1, 1) and rel(q[:, 0, 0], expected[:, 0, 0]) < 1e-10


class MixesExamples(nn.Module):
    """Centres its input over the batch: a forward that mixes examples without a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x - 0.5 * x.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "make", [MixesExamples, lambda: nn.Sequential(mlp(), nn.Dropout(0.5))], ids=["mixes", "dropout"]
)
def test_quadratic_forms_auto_falls_back_to_vmap(make):
    """Where a batched forward is not the one-example forward (the model mixes examples, or dropout
    draws one mask per example instead of one for all), "auto" must give the vmap values."""
    torch.manual_seed(0)
    model = make().double().train()
    batch = (torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))
    snap = snapshot(model, nn.MSELoss(), batch)
    V = torch.randn(snap.num_params, 2, dtype=torch.float64)
    expected = snap.per_example_quadratic_forms(V, method="vmap")
    assert rel(snap.per_example_quadratic_forms(V), expected) < 1e-12
    if make is MixesExamples:
        with pytest.raises(sgdprobe.MeasurementError, match="differ from the one-example"):
            snap.per_example_quadratic_forms(V, method="batched")


def test_quadratic_forms_reject_unknown_method():
    model, loss_fn, batch = problem("mlp_mse")
    snap = snapshot(model, loss_fn, batch)
    with pytest.raises(ValueError, match="method must be"):
        snap.per_example_quadratic_forms(torch.randn(snap.num_params, 1, dtype=torch.float64), method="x")


def test_quadratic_forms_average_to_the_probe_hessian():
    model, loss_fn, batch = problem("mlp_mse")
    snap = snapshot(model, loss_fn, batch)
    V = torch.randn(snap.num_params, 2, dtype=torch.float64)
    assert (
        rel(snap.per_example_quadratic_forms(V).mean(0), V.T @ dense_hessian(model, loss_fn, batch) @ V)
        < 1e-10
    )


def test_quadratic_forms_reject_wrong_shape():
    model, loss_fn, batch = problem("mlp_mse")
    snap = snapshot(model, loss_fn, batch)
    with pytest.raises(ValueError, match="V must be"):
        snap.per_example_quadratic_forms(torch.randn(snap.num_params + 1, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- gradients, Gram
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_norms_and_gram_match_one_backward_per_example(kind):
    model, loss_fn, batch = problem(kind)
    G = explicit_grads(model, loss_fn, batch)
    snap = snapshot(model, loss_fn, batch, per_example_chunk=4)
    assert rel(snap.per_example_gradients(), G) < 1e-12
    assert rel(snap.per_example_sq_norms(), (G**2).sum(1)) < 1e-12
    assert rel(snap.per_example_gram(), G @ G.T) < 1e-12
    # block-by-block Gram (max_memory below n·P bytes): same matrix, gradients never all stored
    small = snapshot(
        model, loss_fn, batch, per_example_chunk=3, per_example_max_memory=8 * snap.num_params * 4
    )
    assert rel(small.per_example_gram(), G @ G.T) < 1e-12
    assert "per_example_gradients" not in small._cache
    assert rel(small.per_example_sq_norms(), (G**2).sum(1)) < 1e-12


@pytest.mark.parametrize("kind, ghost", [("mlp_mse", True), ("mlp_ce", True), ("cnn_eval", False)])
def test_snapshot_uses_the_ghost_identity_where_the_model_allows(kind, ghost):
    """A fresh snapshot computes squared norms (any dtype) and the float64 Gram by the ghost identity
    for Linear-only models, and falls back to vmap for the CNN (BatchNorm's affine parameters); the
    values are the explicit ones either way."""
    model, loss_fn, batch = problem(kind)
    G = explicit_grads(model, loss_fn, batch)
    snap = snapshot(model, loss_fn, batch)
    assert (per_example.ghost_statistics(snap) is not None) == ghost
    assert rel(snap.per_example_sq_norms(), (G**2).sum(1)) < 1e-12
    assert rel(snap.per_example_gram(), G @ G.T) < 1e-12
    assert ("per_example_gradients" in snap._cache) == (not ghost)
    targets = batch[1].float() if batch[1].is_floating_point() else batch[1]
    single = snapshot(model.float(), loss_fn, (batch[0].float(), targets))
    assert rel(single.per_example_sq_norms().double(), (G**2).sum(1)) < 1e-5
    # float32 model: the ghost Gram is formed in float64 from the float32 layer quantities
    gram32 = single.per_example_gram()
    assert gram32.dtype == torch.float64 and rel(gram32, G @ G.T) < 1e-5
    assert ("per_example_gradients" in single._cache) == (not ghost)


def test_dropout_uses_one_mask_independent_of_chunking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double().train()
    batch = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    one = snapshot(model, nn.MSELoss(), batch, per_example_chunk=1).per_example_gradients()
    all_ = snapshot(model, nn.MSELoss(), batch).per_example_gradients()
    assert torch.allclose(one, all_, rtol=1e-12, atol=1e-14)
    # a mask is applied (gradients differ from those without dropout) and it is shared by all examples
    model.eval()
    assert not torch.allclose(one, snapshot(model, nn.MSELoss(), batch).per_example_gradients())


def test_batchnorm_in_train_mode_is_refused():
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    batch = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    snap = snapshot(model, nn.CrossEntropyLoss(), batch)
    with pytest.raises(sgdprobe.MeasurementError, match="bn.*eval mode.*minibatch"):
        snap.per_example_gradients()


# ----------------------------------------------------------------------------- Gauss–Newton traces
def explicit_gn_traces(model, loss_fn, batch, hz):
    """tr(J_iᵀ H_z J_i) with J_i by jacrev and the output Hessian H_z written out by hand."""
    x, y = batch
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    out = []
    for i in range(len(y)):
        J = jacrev(f)(params, x[i])
        Jm = torch.cat([J[k].reshape(J[k].shape[0], -1) for k in params], 1)
        out.append(torch.trace(Jm.T @ hz(f(params, x[i]).detach()) @ Jm))
    return torch.stack(out)


def ce_hz(z):
    p = torch.softmax(z, -1)
    return torch.diag(p) - torch.outer(p, p)


@pytest.mark.parametrize(
    "kind, hz",
    [
        ("mlp_mse", lambda z: 2 / 3 * torch.eye(3, dtype=z.dtype)),  # MSELoss: (1/C)||z − y||²
        ("mlp_half_se", lambda z: torch.eye(3, dtype=z.dtype)),  # ½||z − y||²
        ("mlp_ce", ce_hz),
        ("cnn_eval", ce_hz),
    ],
)
@pytest.mark.parametrize("path", ["ghost", "vmap"])
def test_exact_gauss_newton_trace_matches_explicit_jacobians(kind, hz, path, monkeypatch):
    model, loss_fn, batch = problem(kind)
    expected = explicit_gn_traces(model, loss_fn, batch, hz)
    snap = snapshot(model, loss_fn, batch, per_example_chunk=4)
    ghost = per_example._gauss_newton_trace_ghost(snap)
    assert (ghost is None) == (kind == "cnn_eval")  # BatchNorm: outside the ghost path
    if path == "vmap":
        monkeypatch.setattr(per_example, "_gauss_newton_trace_ghost", lambda snapshot: None)
    elif ghost is None:
        pytest.skip("the ghost path does not cover this model")
    assert rel(snap.gauss_newton_trace("exact"), expected) < 1e-10


def test_sampled_gauss_newton_trace_is_unbiased():
    model, loss_fn, batch = problem("mlp_ce", n=6)
    snap = snapshot(model, loss_fn, batch)
    exact = snap.gauss_newton_trace("exact")
    draws = torch.stack([per_example.gauss_newton_trace_sampled(snap, 1, seed=s) for s in range(200)])
    mean, se = draws.mean(0), draws.std(0) / 200**0.5
    assert ((mean - exact).abs() <= 3 * se).all(), (mean, exact, se)
    assert (draws.std(0) > 0.05 * exact).all()  # really random: one draw is not the exact value
    # averaging `samples` draws: same expectation, variance down by the number of draws
    many = per_example.gauss_newton_trace_sampled(snap, 200, seed=1234)
    assert ((many - exact).abs() <= 4 * draws.std(0) / 200**0.5).all()


def test_sampled_gauss_newton_trace_same_on_ghost_and_vmap_paths(monkeypatch):
    """Same seed, same labels: the ghost route and the vmap fallback give the same estimates."""
    from sgdprobe.linalg.ghost import GhostUnsupported

    model, loss_fn, batch = problem("mlp_ce", n=7)
    ghost = per_example.gauss_newton_trace_sampled(snapshot(model, loss_fn, batch, per_example_chunk=3), 3)

    def unsupported(*args, **kwargs):
        raise GhostUnsupported("forced")

    monkeypatch.setattr(per_example, "_ghost_one", unsupported)
    vmapped = per_example.gauss_newton_trace_sampled(snapshot(model, loss_fn, batch, per_example_chunk=3), 3)
    assert rel(ghost, vmapped) < 1e-12


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(label_smoothing=0.1), lambda z, y: 0.5 * nn.functional.cross_entropy(z, y)],
    ids=["label_smoothing", "half_ce"],
)
def test_sampled_estimator_refuses_losses_that_are_not_the_nll(loss_fn):
    model, _, batch = problem("mlp_ce", n=4)
    with pytest.raises(sgdprobe.MeasurementError, match="estimator='exact'"):
        snapshot(model, loss_fn, batch).gauss_newton_trace("sampled")


# ----------------------------------------------------------------------------- mini-batch gradients
def test_minibatch_gradients_partition_the_probe_set():
    model, loss_fn, batch = problem("mlp_ce", n=12)
    snap = snapshot(model, loss_fn, batch)
    rows = snap.minibatch_gradients(3, 4)  # L·M = n: disjoint batches cover every example once
    G = explicit_grads(model, loss_fn, batch)
    assert rows.shape == (4, snap.num_params)
    assert rel(rows.mean(0), G.mean(0)) < 1e-12
    # each row is the mean gradient of 3 distinct examples: find them by least squares on G
    coef = torch.linalg.lstsq(G.T, rows.T).solution
    assert torch.allclose(coef.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-8)
    assert torch.allclose((coef > 0.1).sum(0), torch.full((4,), 3))
    with pytest.raises(sgdprobe.MeasurementError, match="probe examples"):
        snap.minibatch_gradients(5, 3)


def test_minibatch_gradients_work_with_batchnorm_in_train_mode():
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    batch = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    rows = snapshot(model, nn.CrossEntropyLoss(), batch).minibatch_gradients(2, 4)
    assert rows.shape[0] == 4 and torch.isfinite(rows).all() and (rows.norm(dim=1) > 0).all()


# ----------------------------------------------------------------------------- chunks, OOM, memory
def test_out_of_memory_halves_the_chunk_and_then_reports(monkeypatch):
    model, loss_fn, batch = problem("mlp_mse", n=10)
    monkeypatch.setattr(per_example, "ghost_statistics", lambda *a, **k: None)  # the vmap path
    expected = explicit_grads(model, loss_fn, batch)
    real = per_example._grads_chunk
    sizes = []

    def flaky(snap, start, stop, targets=None):
        sizes.append(stop - start)
        if stop - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(snap, start, stop, targets)

    monkeypatch.setattr(per_example, "_grads_chunk", flaky)
    snap = snapshot(model, loss_fn, batch, per_example_chunk=8)
    assert rel(snap.per_example_gradients(), expected) < 1e-12
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2
    assert snap.config.per_example_chunk == 2  # kept for later measurements

    def always(snap, start, stop, targets=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(per_example, "_grads_chunk", always)
    with pytest.raises(sgdprobe.MeasurementError, match="out of memory on a single example"):
        snapshot(model, loss_fn, batch).per_example_sq_norms()
    monkeypatch.setattr(per_example, "_grads_chunk", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors are not retried
        snapshot(model, loss_fn, batch).per_example_sq_norms()


def profiled_peak(fn) -> int:
    """Peak of tensor memory allocated on the CPU while ``fn`` runs (profiler memory events, in time
    order: self allocations of each op and the frees outside ops)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_examples(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))  # P = 42210, float32
    P = sum(p.numel() for p in model.parameters())
    held = []
    real = per_example._grads_chunk

    def counting(snap, start, stop, targets=None):
        out = real(snap, start, stop, targets)
        held.append(out.shape[0])
        return out

    monkeypatch.setattr(per_example, "_grads_chunk", counting)
    # the Gram's fallback is what is measured here (this model's ghost Gram would fit; see below)
    ghost = per_example.ghost_statistics
    monkeypatch.setattr(
        per_example, "ghost_statistics", lambda snap, gram=False: None if gram else ghost(snap)
    )

    def peak(what, n):
        batch = torch.randn(n, 200), torch.randn(n, 10)
        # 16 examples per chunk; all n·P gradients would fit in max_memory only for n <= 64
        snap = snapshot(model, nn.MSELoss(), batch, per_example_chunk=16, per_example_max_memory=256 * P)
        return profiled_peak(getattr(snap, what))

    all_grads = 64 * P * 4  # the gradients of 64 examples, stored
    for what, small, large in (("per_example_sq_norms", 64, 256), ("per_example_gram", 80, 160)):
        peaks = peak(what, small), peak(what, large)
        assert peaks[1] < 1.3 * peaks[0], (what, peaks)  # bounded by the chunk, not by n ...
        assert peaks[1] < 0.5 * large * P * 4, (what, peaks)  # ... and far below storing all n·P
    assert 0 < max(held) <= 16  # the Gram's vmap chunks (the squared norms go through the ghost path)
    # the instrument sees a stored (n, P) tensor
    stored = snapshot(model, nn.MSELoss(), (torch.randn(64, 200), torch.randn(64, 10)))
    assert profiled_peak(stored.per_example_gradients) > all_grads


def test_ghost_gram_in_one_batch_when_its_trial_footprint_fits(monkeypatch):
    """The one-batch ghost Gram is sized by a trial on a few examples (what it holds per example), not
    by the parameter count: it runs where it fits in ``per_example_max_memory`` and falls back to the
    vmap blocks where it does not, with the same matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.Tanh(), nn.Linear(512, 3)).double()  # wide, P = 6147
    batch = torch.randn(160, 8, dtype=torch.float64), torch.randn(160, 3, dtype=torch.float64)
    G = explicit_grads(model, nn.MSELoss(), batch)
    probe = snapshot(model, nn.MSELoss(), batch)
    footprint, trial = [], per_example._GRAM_TRIAL
    losses = functools.partial(per_example_losses, probe.loss_fn)
    per_example._ghost_one(probe, 0, trial, losses, dtype=torch.float64, footprint=footprint)
    needed = per_example._GRAM_MARGIN * 160 * (footprint[0] + 8 * 160)
    assert needed < 160 * G.shape[1] * 8  # far below the 6·P-per-example rule this replaced
    vmap_chunks = []
    real = per_example._grads_chunk
    monkeypatch.setattr(per_example, "_grads_chunk", lambda *a, **k: vmap_chunks.append(1) or real(*a, **k))
    fits = snapshot(model, nn.MSELoss(), batch, per_example_max_memory=int(2 * needed))
    assert rel(fits.per_example_gram(), G @ G.T) < 1e-12 and not vmap_chunks
    tight = snapshot(model, nn.MSELoss(), batch, per_example_max_memory=int(0.5 * needed))
    assert rel(tight.per_example_gram(), G @ G.T) < 1e-12 and vmap_chunks


def test_ghost_gram_trial_bounds_the_measured_peak():
    """The trial's estimate (with its margin) must bound the peak memory of the one-batch Gram: with
    attention, most of it is what autograd saves (scores, softmax), not the layer quantities (the
    estimate without them was 5.7× too small here)."""
    torch.manual_seed(0)
    model = TinyTransformer(d=16, heads=8)
    n, tokens = 32, 64
    batch = torch.randint(0, 11, (n, tokens)), torch.randint(0, 3, (n,))
    snap = snapshot(model, nn.CrossEntropyLoss(), batch)

    def losses(out, y):
        return per_example_losses(snap.loss_fn, out, y)

    footprint = []
    per_example._ghost_one(snap, 0, per_example._GRAM_TRIAL, losses, dtype=torch.float64, footprint=footprint)
    estimate = per_example._GRAM_MARGIN * n * (footprint[0] + 8 * n)
    peak = profiled_peak(lambda: per_example._ghost_one(snap, 0, n, losses, gram=True, dtype=torch.float64))
    assert peak <= estimate <= 3 * peak, (peak, estimate)


def test_ghost_gram_respects_the_chunk_cap_and_remembers_out_of_memory(monkeypatch):
    model, loss_fn, batch = problem("mlp_ce", n=32)
    G = explicit_grads(model, loss_fn, batch)
    full_batches = []
    real = per_example._ghost_one

    def spy(snap, start, stop, *args, **kw):
        if stop - start > per_example._GRAM_TRIAL:
            full_batches.append(stop - start)
        return real(snap, start, stop, *args, **kw)

    monkeypatch.setattr(per_example, "_ghost_one", spy)
    capped = snapshot(model, loss_fn, batch, per_example_chunk=4)
    assert rel(capped.per_example_gram(), G @ G.T) < 1e-12 and not full_batches

    def out_of_memory(snap, start, stop, *args, **kw):
        if stop - start > per_example._GRAM_TRIAL:
            full_batches.append(stop - start)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(snap, start, stop, *args, **kw)

    monkeypatch.setattr(per_example, "_ghost_one", out_of_memory)
    first = snapshot(model, loss_fn, batch)
    assert rel(first.per_example_gram(), G @ G.T) < 1e-12  # the vmap blocks
    assert full_batches == [32] and first.config.per_example_chunk == 16
    again = Snapshot(first.config, step=1)  # a later measurement of the same probe
    assert rel(again.per_example_gram(), G @ G.T) < 1e-12 and full_batches == [32]
