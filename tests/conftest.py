"""Shared fixtures: small models whose Hessians can be formed densely, and their probe batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import cnn_bn_dropout, dense_hessian, mlp, tiny_transformer  # noqa: F401


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def mlp_problem():
    """(model, loss_fn, (x, y)) in float64: a 2-layer tanh MLP with MSE."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randn(24, 3, dtype=torch.float64)
    return model, nn.MSELoss(), (x, y)
