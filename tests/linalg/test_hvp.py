"""The three HVP strategies against a dense Hessian."""

import pytest
import torch

import sgdprobe
from sgdprobe.linalg import HVP_METHODS, HessianVectorProduct, flatten
from tests.helpers import dense_hessian, mlp


@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_matches_dense_hessian(method):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    loss_fn = torch.nn.MSELoss()

    def loss(plist):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, plist)), (x,)), y)

    op = HessianVectorProduct(loss, [p for p in model.parameters()], method)
    H = dense_hessian(model, loss_fn, (x, y))
    for _ in range(3):
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.n_calls == 3
    grad = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    torch.testing.assert_close(op.gradient().detach(), flatten(grad))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown HVP method"):
        HessianVectorProduct(lambda p: p[0].sum(), [torch.zeros(1)], "magic")


def _layer_norm_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)).double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 5, (6, 3))
    names = [n for n, _ in model.named_parameters()]

    def loss(plist):
        out = torch.func.functional_call(model, dict(zip(names, plist)), (x,))
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())

    return model, loss


@pytest.mark.parametrize("method", ["reuse", "double_backward"])
def test_reverse_over_reverse_is_right_through_layer_norm(method):
    """Against float64 central finite differences of the gradient."""
    model, loss = _layer_norm_problem()
    op = HessianVectorProduct(loss, list(model.parameters()), method)
    v = torch.randn(op.dim, dtype=torch.float64)
    params = [p.detach() for p in model.parameters()]

    def grad_at(t):
        shifted = [p.clone().requires_grad_(True) for p in params]
        offset = 0
        for p in shifted:
            p.data += t * v[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return flatten(torch.autograd.grad(loss(shifted), shifted))

    fd = (grad_at(1e-5) - grad_at(-1e-5)) / 2e-5
    torch.testing.assert_close(op(v), fd, rtol=1e-6, atol=1e-8)


def test_forward_over_reverse_is_checked_and_refused_when_wrong():
    """torch 2.13's forward mode through LayerNorm gives wrong products: the operator must say so
    rather than return them (if torch fixes it, the product must then be right)."""
    model, loss = _layer_norm_problem()
    reference = HessianVectorProduct(loss, list(model.parameters()), "double_backward")
    op = HessianVectorProduct(loss, list(model.parameters()), "forward_over_reverse")
    v = torch.randn(op.dim, dtype=torch.float64)
    try:
        hv = op(v)
    except sgdprobe.MeasurementError as exc:
        assert "use hvp_method='reuse'" in str(exc).lower()
    else:
        torch.testing.assert_close(hv, reference(v), rtol=1e-8, atol=1e-10)
