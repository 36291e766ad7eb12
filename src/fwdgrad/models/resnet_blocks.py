r"""ResNet-18 split into 8 or 16 blocks with auxiliary heads (Fournier et al., ICML 2023, CIFAR-10 setting).

The CIFAR variant of ResNet-18 (3×3 stem, no max-pool; stages of 64, 128, 256, 512 channels, two basic blocks
each) declared through the local-loss protocol of :mod:`fwdgrad.local`, so ``fg-guess`` and ``l-bp`` train it
block by block:

* ``blocks=8``: block 0 is the stem and the first basic block; blocks 1–7 are the other basic blocks;
* ``blocks=16``: block 0 is the stem, block 1 the first basic block, and each of the other seven basic blocks
  is cut in two, ``A: x ↦ ReLU(N(conv₁ x))`` and ``B: (h, x) ↦ ReLU(N(conv₂ h) + shortcut(x))``; ``B`` gets
  the input ``x`` of its ``A`` for the skip connection, cut like every block input (so in the local graph the
  skip path belongs to ``B``).

Each block's auxiliary head is ``AdaptiveAvgPool2d(2) → flatten → Linear(4·C → classes)`` (small: the paper's
auxiliary nets are small conv nets under 10 % of the FLOPs; here a linear head, as the protocol requires); the
read-out is ``global average pool → Linear(512 → classes)``.

Normalisation is ``GroupNorm(8, C)``, not BatchNorm: ``fg-guess`` in activation space needs examples that do not
interact (one JVP gives every example's directional derivative only then).

Example:
    >>> import torch
    >>> from fwdgrad.models.resnet_blocks import ResNet18Blocks
    >>> m = ResNet18Blocks((3, 8, 8), 10, blocks=16, width=8)
    >>> len(m.blocks), m(torch.zeros(2, 3, 8, 8)).shape
    (16, torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad import local
from fwdgrad.models import register_model

Tensor = torch.Tensor


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class HalfA(nn.Module):
    """First half of a basic block, ``x ↦ ReLU(N(conv₁ x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm = _norm(cout)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class HalfB(nn.Module):
    """Second half, ``(h, x) ↦ ReLU(N(conv₂ h) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm = _norm(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU()

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(h)) + self.shortcut(x))


class BasicBlock(nn.Module):
    """A whole basic block (``A`` then ``B``) for the 8-block split."""

    def __init__(self, cin: int, cout: int, stride: int, stem: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.a = HalfA(cin, cout, stride)
        self.b = HalfB(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        return self.b(self.a(x), x)


@register_model("resnet18-blocks")
class ResNet18Blocks(nn.Module):
    """ResNet-18 (CIFAR variant) in ``blocks`` = 8 or 16 locally trained blocks (see the module docstring).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of logits.
        blocks: 8 or 16.
        width: channels of the first stage (64 in ResNet-18; the stages use 1, 2, 4, 8 times it).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, blocks: int = 8, width: int = 64) -> None:
        super().__init__()
        where = "fwdgrad.models.ResNet18Blocks"
        if blocks not in (8, 16):
            raise ValueError(f"{where}: blocks must be 8 or 16, got {blocks!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{where}: width must be an int >= 1, got {width!r}")
        if len(input_shape) != 3:
            raise ValueError(f"{where}: input_shape must be (C, H, W), got {tuple(input_shape)}")
        stem = nn.Sequential(nn.Conv2d(int(input_shape[0]), width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        plan = []
        cin = width
        for stage, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                stride = 2 if stage > 0 and j == 0 else 1
                plan.append((cin, width * mult, stride))
                cin = width * mult
        mods: list[nn.Module] = [] if blocks == 8 else [stem]
        for i, (ci, co, s) in enumerate(plan):
            if blocks == 8 or i == 0:
                mods.append(BasicBlock(ci, co, s, stem if blocks == 8 and i == 0 else None))
            else:
                mods += [HalfA(ci, co, s), HalfB(ci, co, s)]
        self.split = blocks
        self.blocks = nn.ModuleList(mods)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleList(nn.Linear(4 * self._channels(m), num_classes) for m in mods)
        self.readout = nn.Linear(8 * width, num_classes)

    @staticmethod
    def _channels(m: nn.Module) -> int:
        if isinstance(m, BasicBlock):
            return m.b.conv.out_channels
        if isinstance(m, nn.Sequential):  # the stem
            return m[0].out_channels
        return m.conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        rec = local.current()
        h, skip = x, x
        for blk, head in zip(self.blocks, self.heads):
            if rec is not None:
                h, skip = local.stop_gradient(h), local.stop_gradient(skip)
            if isinstance(blk, HalfB):
                out = blk(h, skip)
            else:
                skip = h
                out = blk(h)
            if rec is not None:
                f = self.pool(out).flatten(1)
                hin, split = local.split_head_logits(f[:, None, None, :], head, False)
                rec.add_head(blk, head, hin, split)
            h = out
        feats = h.mean((2, 3))
        if rec is not None:
            return rec.add_head(None, self.readout, local.stop_gradient(feats), None)
        return self.readout(feats)
