"""Recurrent classifiers ``gru`` and ``lstm``: a cell run over the input's time steps, a linear readout at the end.

Both follow the sequence protocol of :mod:`fwdgrad.derivatives.through_time` (``cell``, ``init_state``,
``readout``, ``to_sequence``), so ``online-fg``, ``bp-tbptt`` and every ordinary estimator train them.

Inputs ``[B, *input_shape]`` become sequences ``[B, T, F]``: a 2-D shape ``(T, F)`` is already one
(``seqmnist``: 28 × 28, ``pixelmnist``: 784 × 1); an image ``(C, H, W)`` is read row by row (``T = H``,
``F = C·W``); a vector ``(F,)`` one value per step (``T = F``, ``F = 1``).

Example:
    >>> import torch
    >>> from fwdgrad.models import build_model
    >>> model = build_model("gru", (28, 28), 10, hidden=16)
    >>> model(torch.randn(3, 28, 28)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import fwdgrad.estimators.recurrent  # noqa: F401  (registers online-fg, forward-exact, bp-tbptt)
from fwdgrad.derivatives.through_time import State, run_sequence
from fwdgrad.models import register_model

Tensor = torch.Tensor

CELLS = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}


def sequence_layout(where: str, input_shape: Sequence[int]) -> tuple[int, int]:
    """``(T, F)`` for inputs of shape ``input_shape`` (see the module docstring)."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(f"{where}: input_shape must have 1, 2 or 3 dims, got {shape}")


def to_sequence(x: Tensor, input_shape: Sequence[int]) -> Tensor:
    """``x [B, *input_shape]`` as ``[B, T, F]`` (see the module docstring)."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        return x.unsqueeze(-1)
    if len(shape) == 2:
        return x
    return x.permute(0, 2, 1, 3).reshape(x.shape[0], shape[1], shape[0] * shape[2])


class RecurrentClassifier(nn.Module):
    """``readout(h_T)`` after ``h_t = cell(x_t, h_{t−1})``, ``h_0 = 0``; ``cell`` one of ``rnn``, ``gru``, ``lstm``.

    Args:
        input_shape: shape of one input (see the module docstring).
        num_classes: number of logits.
        cell: ``"rnn"`` (tanh), ``"gru"`` or ``"lstm"``.
        hidden: state size.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, cell: str = "gru", hidden: int = 128) -> None:
        super().__init__()
        where = "fwdgrad.models.RecurrentClassifier"
        if cell not in CELLS:
            raise ValueError(f"{where}: unknown cell {cell!r}; choose one of {sorted(CELLS)}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"{where}: hidden must be an int >= 1, got {hidden!r}")
        self.input_shape = tuple(input_shape)
        self.steps, features = sequence_layout(where, self.input_shape)
        self.kind, self.hidden = cell, hidden
        self.cell = CELLS[cell](features, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def to_sequence(self, x: Tensor) -> Tensor:
        return to_sequence(x, self.input_shape)

    def init_state(self, batch: int, like: Tensor) -> State:
        h = like.new_zeros(batch, self.hidden)
        return (h, torch.zeros_like(h)) if self.kind == "lstm" else h

    def readout(self, state: State) -> Tensor:
        return self.fc(state[0] if isinstance(state, tuple) else state)

    def forward(self, x: Tensor) -> Tensor:
        return run_sequence(self, x)


@register_model("gru")
def gru(input_shape: Sequence[int], num_classes: int, hidden: int = 128) -> nn.Module:
    """A GRU over the input's time steps with a linear readout of the last state."""
    return RecurrentClassifier(input_shape, num_classes, cell="gru", hidden=hidden)


@register_model("lstm")
def lstm(input_shape: Sequence[int], num_classes: int, hidden: int = 128) -> nn.Module:
    """An LSTM over the input's time steps with a linear readout of the last hidden state."""
    return RecurrentClassifier(input_shape, num_classes, cell="lstm", hidden=hidden)


from fwdgrad.models import spiking as _spiking  # noqa: E402,F401  (registers lif)
