"""Sequence views of MNIST: ``seqmnist`` (28 steps of 28 pixels, row by row) and ``pixelmnist`` (784 steps of
one pixel, in raster order), read from the MNIST files with MNIST's normalisation.

Example:
    >>> import torch
    >>> x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    >>> SEQUENCE_VIEWS["seqmnist"](x).shape, SEQUENCE_VIEWS["pixelmnist"](x).shape
    (torch.Size([2, 28, 28]), torch.Size([2, 784, 1]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor

SEQUENCE_VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "seqmnist": lambda x: x.reshape(x.shape[0], 28, 28),
    "pixelmnist": lambda x: x.reshape(x.shape[0], 784, 1),
}
SEQUENCE_BASE = {"seqmnist": "mnist", "pixelmnist": "mnist"}
