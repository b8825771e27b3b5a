"""The three HVP strategies against a dense Hessian."""

import pytest
import torch

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
