"""Models and random batches for the benchmarks (written here: no torchvision).

- ``mlp``: a small tanh MLP on 8×8 digits-shaped inputs (64 → 128 → 128 → 10).
- ``resnet18``: the standard CIFAR-style ResNet-18 (BasicBlock, [2, 2, 2, 2], widths 64–512, 3×3 stem,
  no max-pool; 11.17M parameters at width 64), BatchNorm included.
- ``gpt``: a GPT-style decoder (token + position embeddings, pre-LayerNorm blocks with causal
  multi-head self-attention and a 4× GELU MLP, final LayerNorm, linear head). Attention is written
  out (softmax(QKᵀ/√d)V) so that every tool differentiates the same graph twice on any device.
- ``convnet``: a small CNN without normalization layers (Conv2d/ReLU/pooling/Linear only), for the
  per-example benchmark where BackPACK needs layers it supports.

Every model's ``loss_fn(model(x), y)`` is a mean cross-entropy: ``F.cross_entropy`` itself for 2-d
logits, :func:`cross_entropy` (over every token) for ``gpt``, whose logits are ``(batch, tokens,
vocab)``; :func:`flat_logits` gives peers that want 2-d outputs a view with flattened logits and
targets, same parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, width: int = 128, depth: int = 2, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016, the common kuangliu/pytorch-cifar layout)."""

    def __init__(self, num_classes: int = 10, width: int = 64, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, blocks[3], 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ConvNet(nn.Module):
    """Conv2d/ReLU/MaxPool/Linear only (BackPACK's BatchGrad/BatchL2Grad support all of them)."""

    def __init__(self, width: int = 32, num_classes: int = 10, image: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image // 8
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, h, D // h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 4096, d: int = 512, layers: int = 6, heads: int = 8, context: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        B, T = idx.shape
        # positions indexed per example, (B, T) as in GPT-2's position_ids: the same values as a shared
        # arange(T), and it keeps every layer's input per-example (what the ghost-norm path needs)
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device).expand(B, T))
        return self.head(self.ln(self.blocks(x)))


def cross_entropy(out, y):
    """Mean cross-entropy; sequence outputs ``(batch, tokens, vocab)`` are averaged over every token."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def flat_logits(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """``(model, targets)`` with outputs ``(examples·tokens, classes)``: for peers that take an
    ``nn.CrossEntropyLoss`` module and 2-d outputs (curvlinops, BackPACK). Same parameters."""
    if case.name == "gpt":
        return nn.Sequential(case.model, nn.Flatten(0, 1)), case.y.reshape(-1)
    return case.model, case.y


@dataclass
class Case:
    """One benchmark subject: a model (in eval mode), its loss and one batch, all on one device."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    description: str
    loss_fn: object = field(default=cross_entropy)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.model(self.x), self.y)


def make_case(name: str, size: dict, device: torch.device | str = "cpu", seed: int = 0) -> Case:
    """Build ``name`` with the options in ``size`` (see :data:`SIZES`) and a random batch, seeded.

    Models are put in eval mode: PyHessian switches a model to eval mode itself, so every tool then
    sees the same Hessian (BatchNorm with running statistics, no dropout).
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = dict(size)
    batch = size.pop("batch")
    if name == "mlp":
        model = MLP(**size)
        x = torch.randn(batch, model.net[0].in_features, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        widths = "-".join(str(m.out_features) for m in model.net if isinstance(m, nn.Linear))
        desc = f"MLP {model.net[0].in_features}-{widths} (tanh), batch {batch}"
    elif name == "resnet18":
        image = size.pop("image", 32)
        model = ResNet18(**size)
        x = torch.randn(batch, 3, image, image, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        desc = f"ResNet-18 (width {size.get('width', 64)}), batch {batch}×3×{image}×{image}"
    elif name == "convnet":
        image = size.get("image", 32)
        model = ConvNet(**size)
        x = torch.randn(batch, 3, image, image, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        desc = f"ConvNet (width {size.get('width', 32)}), batch {batch}×3×{image}×{image}"
    elif name == "gpt":
        tokens = size.pop("tokens")
        model = GPT(context=tokens, **size)
        vocab = size.get("vocab", 4096)
        x = torch.randint(0, vocab, (batch, tokens), generator=g)
        y = torch.randint(0, vocab, (batch, tokens), generator=g)
        desc = (
            f"GPT {size.get('layers', 6)} layers d={size.get('d', 512)} vocab {vocab}, "
            f"{batch}×{tokens} tokens"
        )
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device).eval()
    # 2-d logits take F.cross_entropy itself, as a user would write it; the GPT's (batch, tokens, vocab)
    # logits need the token-flattening wrapper
    loss_fn = cross_entropy if name == "gpt" else F.cross_entropy
    return Case(name, model, x.to(device), y.to(device), desc, loss_fn=loss_fn)


# Sizes per mode. "full" is the sizes (ResNet-18 on 256×3×32×32, 6-layer GPT d=512 on 32×128
# tokens): the GPU figures. "cpu" fits a 2-core CPU in minutes. "quick" is the CI smoke test.
SIZES: dict[str, dict[str, dict]] = {
    "full": {
        "mlp": {"batch": 512},
        "resnet18": {"batch": 256},
        "gpt": {"batch": 32, "tokens": 128, "d": 512, "layers": 6, "heads": 8, "vocab": 4096},
        "convnet": {"batch": 256},
    },
    "cpu": {
        "mlp": {"batch": 512},
        "resnet18": {"batch": 16},
        "gpt": {"batch": 8, "tokens": 64, "d": 128, "layers": 6, "heads": 4, "vocab": 2048},
        "convnet": {"batch": 64},
    },
    "quick": {
        "mlp": {"batch": 64, "width": 32},
        "resnet18": {"batch": 4, "width": 4, "image": 8},
        "gpt": {"batch": 2, "tokens": 8, "d": 16, "layers": 2, "heads": 2, "vocab": 64},
        "convnet": {"batch": 8, "width": 4, "image": 8},
    },
}
