"""Spiking network ``lif``: leaky integrate-and-fire neurons with surrogate derivatives, and spike encodings.

One layer of ``H`` LIF neurons with element-wise (diagonal) recurrence through the membrane, a rate readout:

``pre_t = W x_t + b``,  ``v_t = β v_{t−1} + pre_t − θ·s(v_{t−1})`` (soft reset),  ``s(v) = H(v − θ)``,
``o_t = o_{t−1} + s(v_t)/T`` (the firing rate at ``t = T``),  logits ``= R o_T`` (``R`` linear).

``H`` is a Heaviside step whose derivative, in forward *and* reverse mode, is a surrogate (FGI-style,
:mod:`fwdgrad.derivatives.spiking`). ``neuron="leaky"`` swaps the spike for a non-spiking leaky integrator
(``v_t = β v_{t−1} + pre_t``, output ``tanh(v_t)``): a diagonal linear recurrent unit with a nonlinear output.
With ``learn_decay=True`` each neuron learns its own ``β_i = sigmoid(a_i)``. The cell implements
:class:`fwdgrad.derivatives.through_time.DiagonalCell`, so ``forward-exact`` computes the exact gradient
forward in time. ``recurrent=True`` adds lateral weights, ``pre_t = W x_t + b + R s(v_{t−1})``: a full
recurrence, trained by BPTT or ``online-fg``; ``forward-exact`` refuses it (its traces would no longer be
O(parameters)).

Inputs: a sequence ``(T, F)`` (``seqmnist``) is fed as input current; an image or vector is flattened to
``F`` features and encoded over ``steps`` steps: ``"current"`` (the standardised values at every step),
``"rate"`` (Bernoulli spikes with probability = intensity) or ``"latency"`` (one spike per pixel, earlier
for brighter; see :func:`latency_encode`). Rate and latency read intensities in ``[0, 1]`` after a per-example
min-max rescaling.

Example:
    >>> import torch
    >>> from fwdgrad.models import build_model
    >>> model = build_model("lif", (1, 28, 28), 10, hidden=8, steps=4, encoding="rate")
    >>> model(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fwdgrad.derivatives.spiking import check_surrogate, spike
from fwdgrad.derivatives.through_time import State, run_sequence
from fwdgrad.models import register_model

Tensor = torch.Tensor

ENCODINGS = ("current", "rate", "latency")
NEURONS = ("lif", "leaky")


def check_encoding(where: str, encoding: object) -> str:
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ValueError(f"{where}: unknown encoding {encoding!r}; choose one of {list(ENCODINGS)}")
    return encoding


def _unit_interval(x: Tensor) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)


def rate_encode(intensity: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
    """``[B, F]`` intensities in ``[0, 1]`` → ``[B, steps, F]`` Bernoulli spikes, ``P(spike) = intensity``.

    Example:
        >>> rate_encode(torch.tensor([[0.0, 1.0]]), 3, torch.Generator().manual_seed(0)).tolist()
        [[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fwdgrad.models.spiking.rate_encode: steps must be an int >= 1, got {steps!r}")
    shape = (intensity.shape[0], steps, intensity.shape[1])
    u = torch.rand(shape, generator=generator, dtype=intensity.dtype, device="cpu").to(intensity.device)
    return (u < intensity[:, None, :]).to(intensity.dtype)


def latency_encode(intensity: Tensor, steps: int, threshold: float = 0.2) -> Tensor:
    """``[B, F]`` intensities in ``[0, 1]`` → ``[B, steps, F]``: one spike at ``t = round((1 − x)(steps − 1))``
    for ``x > threshold``, none otherwise (time-to-first-spike coding).

    Example:
        >>> latency_encode(torch.tensor([[1.0, 0.5, 0.1]]), 3)[0].T.tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fwdgrad.models.spiking.latency_encode: steps must be an int >= 1, got {steps!r}")
    when = torch.round((1.0 - intensity) * (steps - 1)).long()
    out = torch.zeros(intensity.shape[0], steps, intensity.shape[1], dtype=intensity.dtype, device=intensity.device)
    out.scatter_(1, when[:, None, :], (intensity > threshold).to(intensity.dtype)[:, None, :])
    return out


class LIFCell(nn.Module):
    """One step of a layer of LIF (or leaky) neurons with a rate output; state ``(v, o)``.

    Implements :class:`fwdgrad.derivatives.through_time.DiagonalCell` (math in the module docstring).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        *,
        steps: int,
        neuron: str = "lif",
        decay: float = 0.9,
        threshold: float = 1.0,
        surrogate: str = "fast-sigmoid",
        slope: float | None = None,
        learn_decay: bool = False,
        recurrent: bool = False,
    ) -> None:
        super().__init__()
        where = "fwdgrad.models.spiking.LIFCell"
        if neuron not in NEURONS:
            raise ValueError(f"{where}: unknown neuron {neuron!r}; choose one of {list(NEURONS)}")
        if not (isinstance(decay, int | float) and 0.0 < decay < 1.0):
            raise ValueError(f"{where}: decay must lie in (0, 1), got {decay!r}")
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"{where}: threshold must be a positive number, got {threshold!r}")
        self.surrogate, self.slope = check_surrogate(where, surrogate, slope)
        self.neuron, self.threshold = neuron, float(threshold)
        self.input_layer = nn.Linear(in_features, hidden)
        # lateral weights R s_{t-1}: a full (non-diagonal) recurrence, which forward-exact refuses
        self.recurrent = nn.Linear(hidden, hidden, bias=False) if recurrent else None
        logit = torch.full((hidden,), math.log(decay / (1.0 - decay)))
        if learn_decay:
            self.decay_logit = nn.Parameter(logit)
        else:
            self.register_buffer("decay_logit", logit)
        self.output_decay = 1.0
        self.output_scale = 1.0 / steps

    def neuron_parameters(self) -> dict[str, Tensor]:
        p = self.decay_logit
        return {"decay_logit": p} if isinstance(p, nn.Parameter) and p.requires_grad else {}

    def neuron_step(self, pre: Tensor, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        beta = torch.sigmoid(params.get("decay_logit", self.decay_logit))
        if self.neuron == "leaky":
            return beta * v + pre
        return beta * v + pre - self.threshold * spike(v - self.threshold, self.surrogate, self.slope)

    def neuron_output(self, v: Tensor) -> Tensor:
        if self.neuron == "leaky":
            return torch.tanh(v)
        return spike(v - self.threshold, self.surrogate, self.slope)

    def forward(self, x_t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        v, o = state
        pre = self.input_layer(x_t)
        if self.recurrent is not None:
            pre = pre + self.recurrent(self.neuron_output(v))
        v = self.neuron_step(pre, v, self.neuron_parameters())
        return v, self.output_decay * o + self.output_scale * self.neuron_output(v)


class SpikingClassifier(nn.Module):
    """An LIF layer (:class:`LIFCell`) over the encoded input and a linear readout of the firing rates."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: int = 128,
        *,
        steps: int = 25,
        encoding: str = "current",
        surrogate: str = "fast-sigmoid",
        slope: float | None = None,
        decay: float = 0.9,
        threshold: float = 1.0,
        learn_decay: bool = False,
        neuron: str = "lif",
        recurrent: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        where = "fwdgrad.models.SpikingClassifier"
        self.encoding = check_encoding(where, encoding)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"{where}: hidden must be an int >= 1, got {hidden!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
        self.input_shape = tuple(input_shape)
        if len(self.input_shape) == 2:  # already a sequence: fed as current
            if encoding != "current":
                raise ValueError(
                    f"{where}: encoding {encoding!r} needs image or vector inputs; a sequence input "
                    f"{self.input_shape} is fed as current (encoding='current')"
                )
            self.steps, features = self.input_shape
        else:
            self.steps, features = steps, math.prod(self.input_shape)
        self.hidden = hidden
        self.generator = torch.Generator().manual_seed(seed)
        self.cell = LIFCell(
            features, hidden, steps=self.steps, neuron=neuron, decay=decay, threshold=threshold,
            surrogate=surrogate, slope=slope, learn_decay=learn_decay, recurrent=recurrent,
        )  # fmt: skip
        self.fc = nn.Linear(hidden, num_classes)

    def to_sequence(self, x: Tensor) -> Tensor:
        if len(self.input_shape) == 2:
            return x
        flat = x.reshape(x.shape[0], -1)
        if self.encoding == "current":
            return flat[:, None, :].expand(-1, self.steps, -1)
        if self.encoding == "rate":
            return rate_encode(_unit_interval(flat), self.steps, self.generator)
        return latency_encode(_unit_interval(flat), self.steps)

    def init_state(self, batch: int, like: Tensor) -> State:
        v = like.new_zeros(batch, self.hidden)
        return v, torch.zeros_like(v)

    def readout(self, state: State) -> Tensor:
        return self.fc(state[1])

    def forward(self, x: Tensor) -> Tensor:
        return run_sequence(self, x)


# the registered builder is the class itself: its options (in this order) are those ``fwdgrad models`` lists
lif = register_model("lif")(SpikingClassifier)
