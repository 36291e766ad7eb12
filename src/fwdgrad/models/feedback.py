r"""The networks of Bacho & Chu's FDFA paper ("Low-variance Forward Gradients using Direct Feedback Alignment
and momentum", Neural Networks 2024), written as plain sequential chains so the feedback-alignment estimators
(``fa``, ``dfa``, ``fdfa``) can train them.

``fdfa-mlp``: ``Flatten → [Linear(·→width) → ReLU] × depth → Linear(width→classes)`` (800 units; the paper's
layers also carry BatchNorm, left out here: it couples the examples of a batch and has no feedback rule).

``fdfa-cnn``: ``15C5-P2-40C5-P2-128-10``::

    Conv2d(C→15, 5×5) → ReLU → MaxPool2d(2) → Conv2d(15→40, 5×5) → ReLU → MaxPool2d(2)
    → Flatten → Linear(·→128) → ReLU → Linear(128→classes)

Shapes for MNIST: ``[B,1,28,28] → [B,15,12,12] → [B,40,4,4] → [B,640] → [B,128] → [B,10]``.

Example:
    >>> import torch
    >>> from fwdgrad.models import build_model
    >>> build_model("fdfa-cnn", (1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad.models import register_model


class SequentialNet(nn.Module):
    """A network that is exactly ``self.layers`` (an ``nn.Sequential``) applied to its input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("fdfa-mlp")
def fdfa_mlp(input_shape: Sequence[int], num_classes: int, width: int = 800, depth: int = 2) -> SequentialNet:
    """The FDFA paper's fully connected network: ``depth`` hidden ReLU layers of ``width`` units."""
    where = "fwdgrad.models.fdfa_mlp"
    for name, v in (("width", width), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")
    sizes = [math.prod(input_shape)] + [width] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return SequentialNet(layers)


@register_model("fdfa-cnn")
def fdfa_cnn(input_shape: Sequence[int], num_classes: int) -> SequentialNet:
    """The FDFA paper's CNN, 15C5-P2-40C5-P2-128-10 (see the module docstring)."""
    if len(input_shape) != 3:
        raise ValueError(f"fwdgrad.models.fdfa_cnn: input_shape must be (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    size = [(s - 4) // 2 for s in (h, w)]
    size = [(s - 4) // 2 for s in size]
    if min(size) < 1:
        raise ValueError(f"fwdgrad.models.fdfa_cnn: images of {h}×{w} are too small for two 5×5 conv + 2×2 pools")
    return SequentialNet([
        nn.Conv2d(c, 15, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(15, 40, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(40 * size[0] * size[1], 128), nn.ReLU(), nn.Linear(128, num_classes),
    ])
