"""The small convolutional network of Baydin et al. (2022), "Gradients without Backpropagation"."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad.models import register_model


@register_model("cnn")
class ConvNet(nn.Module):
    r"""Four 3×3 convolutions (``channels`` each, padding 1) with ReLU, a 2×2 max-pool after the second and
    the fourth, then ``Linear(hidden) → ReLU → Linear(num_classes)``: the MNIST CNN of Baydin et al. (2022)
    with its defaults (64 channels, 1024 hidden units).

    Images ``[B, C, H, W]`` use ``Conv2d``; sequences ``[B, L]`` (read as one channel) or ``[B, C, L]``,
    such as MNIST-1D, use ``Conv1d`` with the same layout. Every op has a forward-AD rule and none is
    in-place, so the ``fg-w`` estimator works on it.

    Shapes (MNIST, defaults): ``[B,1,28,28] → [B,64,14,14] → [B,64,7,7] → [B,3136] → [B,1024] → [B,10]``.

    Args:
        input_shape: ``(L,)``, ``(C, L)`` or ``(C, H, W)``.
        num_classes: number of logits.
        channels: output channels of every convolution.
        hidden: width of the hidden linear layer.

    Example:
        >>> import torch
        >>> ConvNet((1, 28, 28), 10, channels=8, hidden=32)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> ConvNet((40,), 10, channels=8, hidden=32)(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 64, hidden: int = 1024) -> None:
        super().__init__()
        where = "fwdgrad.models.ConvNet"
        for name, value in (("channels", channels), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
        shape = tuple(input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"{where}: input_shape must be (L,), (C, L) or (C, H, W), got {tuple(input_shape)}")
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(shape) == 2 else (nn.Conv2d, nn.MaxPool2d)
        spatial = shape[1:]
        if any(s < 4 for s in spatial):
            raise ValueError(f"{where}: every spatial size must be >= 4 for two 2x pools, got {tuple(input_shape)}")
        self.example_shape = shape
        self.features = nn.Sequential(
            conv(shape[0], channels, 3, padding=1), nn.ReLU(),
            conv(channels, channels, 3, padding=1), nn.ReLU(),
            pool(2),
            conv(channels, channels, 3, padding=1), nn.ReLU(),
            conv(channels, channels, 3, padding=1), nn.ReLU(),
            pool(2),
        )
        flat = channels * math.prod(s // 2 // 2 for s in spatial)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], *self.example_shape)))
