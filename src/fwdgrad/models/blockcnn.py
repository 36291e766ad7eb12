r"""A small convolutional network split into blocks, each with a small auxiliary head (local-loss protocol).

Built for the gradient-guess estimator ``fg-guess`` (Fournier et al., ICML 2023) and the local-loss
estimators (``l-bp``); outside :func:`fwdgrad.local.recording` it is an ordinary end-to-end CNN.

Block ``k`` (``channels = "c_1 x … x c_K"``)::

    block k:  Conv2d(c_{k-1} → c_k, 3×3, padding 1) → ReLU → MaxPool2d(2)      (pool skipped below 2×2)
    head k:   AdaptiveAvgPool2d(p) → flatten → Linear(c_k·p² → classes)         (p = head_pool)
    read-out: AdaptiveAvgPool2d(p) → flatten → Linear(c_K·p² → classes)

``last_head="own"`` gives the last block a head of its own beside the read-out; ``last_head="readout"``
makes the read-out the last block's head, so the last block's local loss is the model's loss (as in
Fournier et al.'s code, where the last block's auxiliary net is the classifier and that block gets its exact
gradient). The read-out is then recorded twice (as the last block's head and as the read-out); the
estimators train it once.

Each head costs ``c_k·p²·classes`` multiply-adds per example, far below its block's convolution (the
paper's auxiliary nets are < 10 % of the FLOPs). Shapes for MNIST with the defaults:
``[B,1,28,28] → [B,32,14,14] → [B,64,7,7] → [B,64,3,3] → [B,10]``.

Example:
    >>> import torch
    >>> from fwdgrad.models.blockcnn import BlockCNN
    >>> BlockCNN((1, 28, 28), 10, channels="8x8")(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad import local
from fwdgrad.models import register_model
from fwdgrad.models.mlp import parse_widths

Tensor = torch.Tensor


class ConvBlock(nn.Module):
    """``Conv2d(3×3, padding 1) → ReLU → MaxPool2d(2)`` (no pool when ``pool`` is false)."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.conv(x)))


@register_model("block-cnn")
class BlockCNN(nn.Module):
    """Block-split CNN with an auxiliary linear head per block (see the module docstring).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of logits.
        channels: output channels of each block, ``"32x64x64"`` or a sequence of ints.
        head_pool: side ``p`` of the average pool in front of every head and the read-out.
        last_head: ``"own"`` (a separate head for the last block) or ``"readout"`` (the read-out is the last
            block's head; see the module docstring).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: str | Sequence[int] = "32x64x64",
        head_pool: int = 2, last_head: str = "own",
    ) -> None:
        super().__init__()
        where = "fwdgrad.models.BlockCNN"
        if len(input_shape) != 3:
            raise ValueError(f"{where}: input_shape must be (C, H, W), got {tuple(input_shape)}")
        if isinstance(head_pool, bool) or not isinstance(head_pool, int) or head_pool < 1:
            raise ValueError(f"{where}: head_pool must be an int >= 1, got {head_pool!r}")
        if last_head not in ("own", "readout"):
            raise ValueError(f"{where}: last_head must be 'own' or 'readout', got {last_head!r}")
        widths = parse_widths(where, channels)
        c, h, w = (int(s) for s in input_shape)
        blocks = []
        for width in widths:
            pool = min(h, w) >= 2
            blocks.append(ConvBlock(c, width, pool))
            c = width
            if pool:
                h, w = h // 2, w // 2
        self.blocks = nn.ModuleList(blocks)
        self.head_pool = head_pool
        self.pool = nn.AdaptiveAvgPool2d(head_pool)
        own = widths if last_head == "own" else widths[:-1]
        self.heads = nn.ModuleList(nn.Linear(wd * head_pool * head_pool, num_classes) for wd in own)
        self.readout = nn.Linear(widths[-1] * head_pool * head_pool, num_classes)
        self.last_head = last_head

    def _features(self, h: Tensor) -> Tensor:
        return self.pool(h).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        rec = local.current()
        h = x
        heads = list(self.heads) if self.last_head == "own" else [*self.heads, self.readout]
        for blk, head in zip(self.blocks, heads):
            if rec is not None:
                h = local.stop_gradient(h)
            h = blk(h)
            if rec is not None:
                f = self._features(h)
                head_input, split = local.split_head_logits(f[:, None, None, :], head, False)
                rec.add_head(blk, head, head_input, split)
        if rec is not None:
            return rec.add_head(None, self.readout, local.stop_gradient(self._features(h)), None)
        return self.readout(self._features(h))
