"""Small models and exact references used across the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def mlp(d_in: int = 6, width: int = 8, d_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))


class SmallCNN(nn.Module):
    """Conv → BatchNorm → ReLU → Dropout → Linear: mixes examples (BN) and is random (dropout)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


def cnn_bn_dropout() -> nn.Module:
    return SmallCNN()


class TinyTransformer(nn.Module):
    """One pre-norm transformer block (multi-head self-attention through SDPA + MLP), mean-pooled."""

    def __init__(self, d: int = 8, heads: int = 2, vocab: int = 11, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, tokens):
        h = self.embed(tokens)
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def tiny_transformer() -> nn.Module:
    return TinyTransformer()


def dense_hessian(model: nn.Module, loss_fn, batch, names=None, seed: int | None = None) -> torch.Tensor:
    """The dense Hessian of loss_fn(model(x), y) w.r.t. the named parameters, by
    torch.autograd.functional.hessian (buffers cloned, dropout seeded with ``seed`` if given)."""
    x, y = batch
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    buffers = dict(model.named_buffers())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        p.update({n: b.clone() for n, b in buffers.items()})
        if seed is not None:
            torch.manual_seed(seed)
        return loss_fn(functional_call(model, p, (x,)), y)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        return torch.autograd.functional.hessian(loss_of, flat0)
