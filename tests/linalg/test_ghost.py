"""Ghost-norm per-example statistics against explicit per-example gradients (vmap(grad), float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from sgdprobe.linalg.ghost import (
    GhostUnsupported,
    _unreduced,
    choose_materialize,
    ghost_sq_norms_and_gram,
    per_example_losses,
)
from tests.helpers import cnn_bn_dropout, mlp

RTOL = 1e-10


class SeqModel(nn.Module):
    """Embedding → LayerNorm → Linear 8→8 (T=6: materialized under "auto") → Linear 8→32 (ghost under
    "auto") → RMSNorm → mean over tokens → Linear head. Called with keyword ``tokens``."""

    def __init__(self, vocab: int = 11, d: int = 8, wide: int = 32, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d, eps=0.1)
        self.mix = nn.Linear(d, d)
        self.up = nn.Linear(d, wide)
        self.rms = nn.RMSNorm(wide, eps=0.1)
        self.head = nn.Linear(wide, classes)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.ln(self.embed(tokens))))
        return self.head(self.rms(torch.tanh(self.up(h))).mean(1))


class ConvNet(nn.Module):
    """Dilated Conv2d (zero padding) → GroupNorm → in-place ReLU → strided Conv2d (reflect) → Linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=(1, 2), dilation=(1, 2))
        self.gn = nn.GroupNorm(2, 4, eps=0.1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(5 * 3 * 3, classes)

    def forward(self, x):
        h = nn.functional.relu(self.gn(self.conv1(x)), inplace=True)
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


class Conv1dNet(nn.Module):
    """Dilated Conv1d with padding="same", then a Linear applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, dilation=2, padding="same")
        self.lin = nn.Linear(7, 7)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.lin(torch.tanh(self.lin(h))).sum(1)


def reference(model, loss_fn, inputs, targets, names):
    """Per-example gradients (n, p) of loss_fn(model(x_i[None]), y_i[None]) w.r.t. ``names``."""
    params = dict(model.named_parameters())
    const = {n: p.detach() for n, p in params.items() if n not in names}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    kw = isinstance(inputs, dict)

    def loss_one(p, x, y):
        x = {k: v.unsqueeze(0) for k, v in x.items()} if kw else (x.unsqueeze(0),)
        out = functional_call(model, {**const, **p, **buffers}, () if kw else x, x if kw else None)
        return loss_fn(out, y.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(
        {n: params[n].detach() for n in names}, inputs, targets
    )
    return torch.cat([grads[n].reshape(len(targets), -1) for n in names], 1)


def ghost(model, loss_fn, inputs, targets, names=None, **kw):
    names = [n for n, p in model.named_parameters() if p.requires_grad] if names is None else names
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors.update({n: b.clone() for n, b in model.named_buffers()})
    return ghost_sq_norms_and_gram(
        model, tensors, inputs, targets, lambda out, y: per_example_losses(loss_fn, out, y), names=names, **kw
    )


def assert_matches(model, loss_fn, inputs, targets, **kw):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    G = reference(model, loss_fn, inputs, targets, names)
    sq, gram = ghost(model, loss_fn, inputs, targets, gram=True, **kw)
    torch.testing.assert_close(gram, G @ G.T, rtol=RTOL, atol=RTOL * float(G.square().sum(1).max()))
    sq_only, none = ghost(model, loss_fn, inputs, targets, gram=False, **kw)
    assert none is None
    for got in (sq, sq_only):
        torch.testing.assert_close(got, G.square().sum(1), rtol=RTOL, atol=0.0)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks
    return G


@pytest.mark.parametrize(
    "loss_fn, classes",
    [
        (nn.MSELoss(), False),
        (nn.MSELoss(reduction="sum"), False),
        (nn.CrossEntropyLoss(), True),
        (nn.CrossEntropyLoss(reduction="sum"), True),
    ],
)
def test_mlp(loss_fn, classes):
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(12, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,)) if classes else torch.randn(12, 3, dtype=torch.float64)
    assert_matches(model, loss_fn, x, y)


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("max_elements", [2**24, 200])
def test_sequence_model(method, max_elements):
    torch.manual_seed(0)
    model = SeqModel().double()
    tokens = torch.randint(0, 11, (9, 6))
    tokens[0, :3] = 0  # padding rows get no gradient
    tokens[1, :] = 4  # repeated index: gradients of the same row add up
    y = torch.randint(0, 3, (9,))
    assert_matches(
        model, nn.CrossEntropyLoss(), {"tokens": tokens}, y, method=method, max_elements=max_elements
    )


def test_auto_choice_exercises_both_branches():
    # SeqModel at T=6: mix (8→8) is materialized, up (8→32) uses the ghost identity.
    assert choose_materialize(9, 6, 8, 8, gram=False)
    assert not choose_materialize(9, 6, 8, 32, gram=False)
    # Few positions of a wide layer: ghost; long sequences of a narrow layer: materialize.
    for gram in (False, True):
        assert not choose_materialize(64, 4, 512, 512, gram=gram)
        assert choose_materialize(64, 512, 16, 16, gram=gram)
    assert choose_materialize(64, 4, 8, 8, gram=False, method="materialize")


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_cnn(method):
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = torch.randn(7, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert_matches(model, nn.CrossEntropyLoss(), x, y, method=method, max_elements=500)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_conv1d_and_shared_module(method):
    torch.manual_seed(0)
    model = Conv1dNet().double()
    x, y = torch.randn(5, 2, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert_matches(model, nn.MSELoss(), x, y, method=method)


def test_frozen_parameters_are_constants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)  # a module with only part of its parameters stepped
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    G = assert_matches(model, nn.MSELoss(), x, y)
    assert G.shape[1] == 8 * 8 + 8 * 3 + 3
    full = reference(model, nn.MSELoss(), x, y, [n for n, _ in model.named_parameters()])
    assert not torch.allclose(full.square().sum(1), G.square().sum(1))  # the exclusion matters


def test_dropout_masks_of_one_batched_forward():
    """In train mode the gradients are those of the batched forward under the caller's RNG state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def losses(v):
        chunks = torch.split(v, [s.numel() for s in shapes])
        torch.manual_seed(5)
        out = functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (x,))
        return ((out - y) ** 2).mean(1)

    J = torch.autograd.functional.jacobian(losses, flat)
    torch.manual_seed(5)
    sq, gram = ghost(model, nn.MSELoss(), x, y, gram=True)
    torch.testing.assert_close(gram, J @ J.T, rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(sq, J.square().sum(1), rtol=RTOL, atol=0.0)


def _batch_of_one_losses(loss_fn, out, y):
    return torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])])


HARD = torch.tensor([0, 2, 1, 2, 0])
SOFT = torch.softmax(torch.randn(5, 3, dtype=torch.float64), 1)


@pytest.mark.parametrize(
    "loss_fn, y, unreduced",
    [
        (F.cross_entropy, HARD, True),
        (nn.CrossEntropyLoss(label_smoothing=0.1), HARD, True),
        (nn.CrossEntropyLoss(reduction="sum"), HARD, True),
        (nn.CrossEntropyLoss(), SOFT, True),  # probabilities as targets
        (nn.MSELoss(), SOFT, True),
        (nn.MSELoss(reduction="sum"), SOFT, True),
        (F.mse_loss, SOFT, True),
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), HARD, False),
        (nn.CrossEntropyLoss(ignore_index=2), HARD, True),  # ignored targets: NaN, as a batch of one
        (nn.CrossEntropyLoss(ignore_index=2, reduction="sum"), HARD, True),  # ... or 0
        (lambda out, y: F.cross_entropy(out, y) * 2.0, HARD, False),  # unknown callables: vmap
        (nn.L1Loss(), SOFT, False),
    ],
)
def test_per_example_losses(loss_fn, y, unreduced):
    """Every loss gives each example's loss as a batch of one; the common ones are computed unreduced
    (no vmap), the rest by vmap."""
    out = torch.randn(5, 3, dtype=torch.float64)
    expected = _batch_of_one_losses(loss_fn, out, y)
    losses = per_example_losses(loss_fn, out, y)
    torch.testing.assert_close(losses, expected, rtol=1e-14, atol=0.0, equal_nan=True)
    assert (_unreduced(loss_fn, out, y) is not None) == unreduced


class BareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x) * self.scale


class FunctionalUse(nn.Module):
    """Uses the child's weight outside the child's forward: module hooks alone would miss it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) @ self.fc.weight)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


class FlattensTokens(nn.Module):
    """Runs its Linear on (n·T, d): the layer's rows are not examples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1)


class InPlaceInput(nn.Module):
    """Modifies a layer's input in place after the layer ran (its captured input is then wrong)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = x.clone()
        out = self.fc(h)
        h.mul_(2.0)
        return out + h


@pytest.mark.parametrize(
    "model, x, match",
    [
        (cnn_bn_dropout(), torch.randn(4, 1, 6, 6), "bn"),
        (BareParameter(), torch.randn(4, 4), "scale"),
        (FunctionalUse(), torch.randn(4, 4), "fc.weight"),
        (Tied(), torch.randint(0, 5, (4, 3)), "tied"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()), torch.randn(4, 2, 3, 3), "Conv2d"),
        (
            nn.Sequential(nn.Embedding(5, 2, scale_grad_by_freq=True), nn.Flatten()),
            torch.randint(0, 5, (4, 1)),
            "Embedding",
        ),
        (FlattensTokens(), torch.randn(4, 3, 4), "another size"),
        (InPlaceInput(), torch.randn(4, 4), "in place"),
    ],
)
def test_unsupported_models_raise(model, x, match):
    y = torch.randn(
        4, 2 if not isinstance(model, (Tied, InPlaceInput)) else (5 if isinstance(model, Tied) else 4)
    )
    if isinstance(model, FlattensTokens):
        y = torch.randn(4, 6)
    with pytest.raises(GhostUnsupported, match=match):
        ghost(model, nn.MSELoss(), x, y)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_parameter_name():
    with pytest.raises(ValueError, match="not parameters"):
        ghost(mlp(), nn.MSELoss(), torch.randn(2, 6), torch.randn(2, 3), names=["nope"])
