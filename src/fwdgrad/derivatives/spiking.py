"""Spikes that forward mode and reverse mode both differentiate: a Heaviside step with a surrogate derivative.

A spiking neuron emits ``s = H(x)`` (``x`` = membrane potential minus threshold), whose true derivative is zero
almost everywhere. Surrogate-gradient training replaces ``H'(x)`` by a smooth ``σ'(x)`` *in the derivative
only*. Otte (2024, FGI, "Flexible and efficient surrogate gradient modeling with forward gradient injection")
points out that this must hold for forward-mode tangents as well, so that forward gradients and exact
forward-propagated gradients see the same surrogate as backprop. :class:`Spike` is an
``autograd.Function`` whose ``jvp`` returns ``σ'(x)·ẋ`` and whose ``backward`` returns ``σ'(x)·ḡ``;
:func:`spike_fgi` builds the same thing without a Function, by FGI's detach identity
``h = x·sg(σ'(x))``, ``y = h − sg(h) + sg(H(x))`` (``sg`` = stop-gradient).

Surrogates (``k`` = ``slope``; the default slope of each in :data:`DEFAULT_SLOPES`):

=============== ======================================== =====================================
name            σ'(x)                                    source
=============== ======================================== =====================================
``fast-sigmoid`` ``1 / (1 + k|x|)²``                      SuperSpike (Zenke & Ganguli 2018)
``triangle``    ``max(0, 1 − k|x|)``                      Bellec et al. 2018 (pseudo-derivative)
``arctan``      ``(k/2) / (1 + (π k x / 2)²)``            Fang et al. 2021 (SpikingJelly ATan)
=============== ======================================== =====================================

Example:
    >>> import torch
    >>> x = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    >>> spike(x, "triangle").tolist()
    [0.0, 1.0, 1.0]
    >>> spike(x, "triangle").sum().backward(); x.grad.tolist()
    [0.5, 1.0, 0.5]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fwdgrad._validation import check_number

Tensor = torch.Tensor

DEFAULT_SLOPES: dict[str, float] = {"fast-sigmoid": 10.0, "triangle": 1.0, "arctan": 2.0}
SURROGATES = tuple(DEFAULT_SLOPES)


def check_surrogate(where: str, name: object, slope: object = None) -> tuple[str, float]:
    """``(name, slope)`` after validation; ``slope=None`` takes the surrogate's default."""
    if not isinstance(name, str) or name not in DEFAULT_SLOPES:
        raise ValueError(f"{where}: unknown surrogate {name!r}; choose one of {list(SURROGATES)}")
    if slope is None:
        return name, DEFAULT_SLOPES[name]
    return name, check_number(where, "slope", slope, bound="> 0", say_finite=True)


def surrogate_derivative(x: Tensor, name: str, slope: float | None = None) -> Tensor:
    """``σ'(x)`` of surrogate ``name`` (table in the module docstring), element-wise, same shape as ``x``.

    Example:
        >>> surrogate_derivative(torch.tensor([0.0, 1.0]), "fast-sigmoid", 1.0).tolist()
        [1.0, 0.25]
    """
    name, k = check_surrogate("fwdgrad.derivatives.spiking.surrogate_derivative", name, slope)
    if name == "fast-sigmoid":
        return 1.0 / (1.0 + k * x.abs()) ** 2
    if name == "triangle":
        return (1.0 - k * x.abs()).clamp(min=0.0)
    return (k / 2) / (1.0 + (math.pi * k / 2 * x) ** 2)


def heaviside(x: Tensor) -> Tensor:
    """``H(x) = 1`` for ``x ≥ 0``, else 0, in ``x``'s dtype."""
    return (x >= 0).to(x.dtype)


class Spike(torch.autograd.Function):
    """``H(x)`` forward; ``σ'(x)·ẋ`` as its JVP and ``σ'(x)·ḡ`` as its backward (``σ`` = the surrogate).

    Call as ``Spike.apply(x, name, slope)`` or through :func:`spike`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, name: str, slope: float) -> Tensor:  # type: ignore[override]
        return heaviside(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, name, slope = inputs
        ctx.name, ctx.slope = name, slope
        ctx.save_for_forward(x)
        ctx.save_for_backward(x)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, name_t: Any, slope_t: Any) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return surrogate_derivative(x, ctx.name, ctx.slope) * x_t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return surrogate_derivative(x, ctx.name, ctx.slope) * grad, None, None


def spike(x: Tensor, surrogate: str = "fast-sigmoid", slope: float | None = None) -> Tensor:
    """``H(x)`` whose forward- and reverse-mode derivatives are ``σ'(x)`` (see :class:`Spike`)."""
    name, k = check_surrogate("fwdgrad.derivatives.spiking.spike", surrogate, slope)
    return Spike.apply(x, name, k)


def spike_fgi(x: Tensor, surrogate: str = "fast-sigmoid", slope: float | None = None) -> Tensor:
    """The same spike by Otte's forward gradient injection, without an ``autograd.Function``:
    ``h = x·sg(σ'(x))``, ``y = h − sg(h) + sg(H(x))``; value ``H(x)``, derivative ``σ'(x)`` in both modes."""
    name, k = check_surrogate("fwdgrad.derivatives.spiking.spike_fgi", surrogate, slope)
    h = x * surrogate_derivative(x.detach(), name, k)
    return h - h.detach() + heaviside(x.detach())
