"""Shared test problems (model, data, loss), in float64, and autograd references.

Every exactness test runs over ``PROBLEMS``, in the spirit of BackPACK's shared settings: the same model
descriptions serve every check, identified by ``id``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

#: The device of the exactness and estimator tests (``pytest --device cuda``; see the root conftest.py).
DEVICE = torch.device(os.environ.get("FWDGRAD_TEST_DEVICE", "cpu"))


@dataclass
class Problem:
    id: str
    make_model: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make_model().double().to(DEVICE)

    def loss_fn(self, model: nn.Module) -> Tensor:
        return self.loss(model(self.x.to(DEVICE)), self.y.to(DEVICE))


def _data(shape: tuple[int, ...], classes: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (shape[0],), generator=g)
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2, 3)
    )


def _with_buffers() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _shared_layer() -> nn.Module:
    """One ``nn.Linear`` instance in two slots of a ``Sequential`` (a layer shared by position)."""
    shared = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3))


PROBLEMS = [
    Problem("mlp", _mlp, *_data((8, 6), 3, 1)),
    Problem("cnn", _cnn, *_data((4, 1, 6, 6), 3, 2)),
    Problem("batchnorm", _with_buffers, *_data((8, 6), 3, 3)),
    Problem("shared-layer", _shared_layer, *_data((8, 6), 3, 4)),
]


def autograd_gradient(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
    """The exact gradient of ``loss_fn(model)`` for every trainable parameter, in ``named_parameters`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model), params))


def directional(grads: list[Tensor], tangent: list[Tensor]) -> Tensor:
    """``∇f · v`` for one direction given per-tensor gradients and tangents."""
    return sum((g * t).sum() for g, t in zip(grads, tangent))


class RaisingBackward(torch.autograd.Function):
    """``x ↦ 2 tanh(x)`` with a forward-mode rule and a backward that raises: proves no backward runs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return 2 * torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.save_for_forward(x)

    @staticmethod
    def jvp(ctx, x_t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * (1 - torch.tanh(x) ** 2) * x_t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise RuntimeError("RaisingBackward.backward ran: a backward pass happened")


class NoBackwardNet(nn.Module):
    """A small MLP whose hidden activation is :class:`RaisingBackward`."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(RaisingBackward.apply(self.fc1(x)))
