r"""Stateful direction sources: directions that depend on the past, as pairs ``init`` / ``update``.

In the style of optax's transforms, a source is two pure functions of explicit state: ``init(params) ->
state`` and ``update(state, estimate) -> state``; the estimator keeps the state between steps.

:class:`MomentumDirections` (Silver et al. 2022, "Learning by Directional Gradient Descent") keeps an
exponential moving average of past gradient estimates, :math:`m \leftarrow \beta m + (1-\beta)\hat g`, and
offers its unit direction :math:`u = m/\|m\|` as a *guess* for the next step. The estimator combines the
exact derivative along the guess with fresh random directions projected off it,

.. math:: \hat g = \langle\nabla L, u\rangle u + (I - u u^\top)\,\frac1K\sum_k \langle\nabla L, v_k\rangle v_k,

which is unbiased for any ``u`` (``E[v vᵀ] = I``), exact along ``u``, and costs K + 1 directional
derivatives. (Silver et al. use the guess alone, a biased descent direction; this is the unbiased variant.
``fg-w``'s ``directions="mixed"`` uses the same average for their biased form: each tangent is the guess mixed
with fresh noise.)

Example:
    >>> import torch
    >>> from fwdgrad.directions.stateful import MomentumDirections
    >>> src = MomentumDirections(beta=0.5)
    >>> state = src.init([torch.zeros(2)])
    >>> src.guess(state) is None          # nothing learnt yet: no guess
    True
    >>> state = src.update(state, [torch.tensor([3.0, 4.0])])
    >>> [u.tolist() for u in src.guess(state)]
    [[0.6000000238418579, 0.800000011920929]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


@dataclasses.dataclass
class MomentumState:
    """The running average ``m`` (one tensor per parameter) and the number of updates."""

    average: list[Tensor]
    count: int = 0


class MomentumDirections:
    """A running average of past estimates whose unit direction is the next step's guess.

    Args:
        beta: the average's decay, in ``[0, 1)``.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise ValueError(f"fwdgrad.directions.MomentumDirections: beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)

    def init(self, params: Sequence[Tensor]) -> MomentumState:
        """Zero averages shaped (and placed) like ``params``."""
        return MomentumState([torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params])

    def update(self, state: MomentumState, estimate: Sequence[Tensor]) -> MomentumState:
        """``m ← β m + (1 − β) ĝ`` in place; returns the state."""
        with torch.no_grad():
            for m, g in zip(state.average, estimate):
                m.mul_(self.beta).add_(g, alpha=1 - self.beta)
        state.count += 1
        return state

    def guess(self, state: MomentumState) -> list[Tensor] | None:
        """``u = m / ‖m‖`` over all tensors, or ``None`` while ``m`` is zero."""
        sq = sum(float(m.pow(2).sum()) for m in state.average)
        if state.count == 0 or not math.isfinite(sq) or sq == 0.0:
            return None
        scale = 1.0 / math.sqrt(sq)
        return [m * scale for m in state.average]


class BoundMomentum:
    """A :class:`MomentumDirections` state bound to one model's parameters, with a checkpoint round trip.

    :meth:`bind` returns the state for a list of parameters, starting a fresh one when the parameters (by
    identity) change; a state restored by :meth:`load_state_dict` binds to the first parameters of matching
    shapes it meets (and moves to their device).

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(2))]
        >>> bound = BoundMomentum(MomentumDirections(0.5))
        >>> bound.state_dict() is None
        True
        >>> state = bound.update(bound.bind(p), [torch.tensor([3.0, 4.0])])
        >>> bound.state_dict()["count"]
        1
    """

    def __init__(self, source: MomentumDirections) -> None:
        self.source = source
        self._ids: list[int] | None = None
        self._state: MomentumState | None = None

    def bind(self, params: Sequence[Tensor]) -> MomentumState:
        """The state of ``params`` (zero averages the first time, or after the parameters changed), its
        averages in the parameters' dtype and on their device: a state restored from a checkpoint, or kept
        across ``model.double()`` / ``model.to(device)``, follows the parameters (values converted, as
        ``torch.optim`` does on ``load_state_dict``)."""
        ids = [id(p) for p in params]
        if self._state is not None and self._ids is None:  # restored from a checkpoint
            if [m.shape for m in self._state.average] == [p.shape for p in params]:
                self._ids = ids
        if self._state is None or self._ids != ids:
            self._state, self._ids = self.source.init([p.detach() for p in params]), ids
        state = self._state
        if any(m.dtype != p.dtype or m.device != p.device for m, p in zip(state.average, params)):
            state.average = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(state.average, params)]
        return state

    def update(self, state: MomentumState, estimate: Sequence[Tensor]) -> MomentumState:
        """:meth:`MomentumDirections.update`."""
        return self.source.update(state, estimate)

    def state_dict(self) -> dict[str, object] | None:
        """``{"average": [tensors], "count": int}``, or ``None`` before the first step."""
        if self._state is None:
            return None
        return {"average": [m.clone() for m in self._state.average], "count": self._state.count}

    def load_state_dict(self, state: dict[str, object] | None) -> None:
        """Restore :meth:`state_dict`; it binds to the parameters at the next :meth:`bind`."""
        if state is None:
            self._state, self._ids = None, None
            return
        average = state["average"]
        assert isinstance(average, list)
        self._state = MomentumState([t.clone() for t in average], int(state["count"]))  # type: ignore[arg-type]
        self._ids = None
