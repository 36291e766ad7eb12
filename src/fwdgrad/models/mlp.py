"""A multilayer perceptron: flatten, then ``depth`` blocks ``Linear → activation``, then a ``Linear``
to the logits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad.models import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def parse_widths(where: str, widths: str | int | Sequence[int]) -> tuple[int, ...]:
    """Hidden widths from ``"1024x1024"`` (the CLI form), an int, or a sequence of ints.

    >>> parse_widths("MLP", "128x64")
    (128, 64)
    """
    if isinstance(widths, str):
        parts = [w for w in widths.replace("+", "x").split("x") if w.strip()]
        try:
            values = tuple(int(w) for w in parts)
        except ValueError:
            raise ValueError(f"{where}: widths must look like '256x128', got {widths!r}") from None
    elif isinstance(widths, int) and not isinstance(widths, bool):
        values = (widths,)
    else:
        values = tuple(widths)
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values):
        raise ValueError(f"{where}: every hidden width must be an int >= 1, got {widths!r}")
    return values


@register_model("mlp")
class MLP(nn.Module):
    r"""Fully connected classifier.

    .. math:: h_0 = \mathrm{flatten}(x),\quad h_{i} = \sigma(W_i h_{i-1} + b_i),\quad
              \mathrm{logits} = W_{out} h_{depth} + b_{out}

    Shapes: input ``[B, *input_shape]`` (flattened to ``[B, prod(input_shape)]``), output ``[B, num_classes]``.
    Baydin et al. (2022) used ``widths="1024x1024"`` with ReLU on MNIST.

    Args:
        input_shape: shape of one example.
        num_classes: number of logits.
        width: width of every hidden layer (ignored when ``widths`` is given).
        depth: number of hidden layers (0 gives multinomial logistic regression).
        widths: explicit hidden widths, ``"1024x1024"`` or a list of ints; overrides width and depth.
        activation: one of ``relu``, ``tanh``, ``gelu``, ``sigmoid`` (never in-place: forward AD safe).

    Example:
        >>> import torch
        >>> MLP((1, 28, 28), 10, widths="64x32")(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 256,
        depth: int = 2,
        widths: str | Sequence[int] | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        where = "fwdgrad.models.MLP"
        if activation not in ACTIVATIONS:
            raise ValueError(f"{where}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if widths is None:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
                raise ValueError(f"{where}: depth must be an int >= 0, got {depth!r}")
            hidden = parse_widths(where, [width] * depth) if depth else ()
        else:
            hidden = parse_widths(where, widths)
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.hidden_widths = hidden
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
