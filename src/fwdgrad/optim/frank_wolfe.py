r"""Frank-Wolfe (conditional gradient) as a ``torch.optim.Optimizer`` that reads ``.grad``.

For a convex feasible set ``C`` with a linear minimisation oracle (:mod:`fwdgrad.optim.lmo`), step k is

.. math::

    d_k &= (1-\rho_k)\,d_{k-1} + \rho_k\,\phi_k \quad(\text{with } \texttt{variance\_reduction};
           \text{ else } d_k = \phi_k)\\
    s_k &= \arg\min_{s\in C}\ \langle d_k, s\rangle\\
    x_{k+1} &= x_k + \gamma_k\,(s_k - x_k)

where ``φ_k`` is whatever is in ``p.grad``: the true gradient (classic Frank-Wolfe), or a projected forward
gradient ``φ = ⟨∇f, u⟩u`` from any :mod:`fwdgrad` estimator. Rostami & Kia (2024), "Projected forward
gradient-guided Frank-Wolfe algorithm via variance reduction", show that plugging ``φ`` straight in leaves a
non-vanishing error (the oracle answers the noise), and that the running average ``d_k`` removes it:
convergence to the optimum for convex ``f``, to a stationary point otherwise. Default schedules:
``γ_k = 2/(k+2)`` and, for the average, ``ρ_k = 4/(k+8)^{2/3}`` (Mokhtari, Hassani & Karbasi's stochastic
Frank-Wolfe; ``ρ_0 = 1`` so ``d_0 = φ_0``), with ``k = 0, 1, ...``.

The iterates stay feasible if the start is feasible (each update is a convex combination); the optimizer
does not project the starting point. The constraint applies to each parameter tensor on its own (an ℓ1 ball
of ``radius`` per tensor, etc.). After each :meth:`FrankWolfe.step`, :attr:`FrankWolfe.last_gap` holds the
Frank-Wolfe gap ``Σ ⟨d_k, x_k − s_k⟩`` over all tensors, measured with the direction used (with the true
gradient it bounds ``f(x_k) − f*`` for convex ``f``; with an estimate it is itself an estimate).

Example:
    >>> import torch
    >>> from fwdgrad.optim import FrankWolfe
    >>> x = torch.nn.Parameter(torch.zeros(3))
    >>> opt = FrankWolfe([x], constraint="l1", radius=1.0)
    >>> for _ in range(200):
    ...     opt.zero_grad()
    ...     ((x - torch.tensor([2.0, 0.0, 0.0])) ** 2).sum().backward()
    ...     opt.step()
    >>> [round(v, 3) for v in x.tolist()]
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fwdgrad.optim.lmo import LMO_PARAMETERS, LMOS

Tensor = torch.Tensor
Schedule = Callable[[int], float]


def default_step_size(k: int) -> float:
    """``γ_k = 2/(k+2)``, the classic Frank-Wolfe step (``k = 0, 1, ...``; ``γ_0 = 1``)."""
    return 2.0 / (k + 2)


def default_averaging(k: int) -> float:
    """``ρ_k = 4/(k+8)^{2/3}`` (capped at 1), the averaging weight of the variance-reduced direction."""
    return min(1.0, 4.0 / (k + 8) ** (2.0 / 3.0))


def _check_schedule(where: str, name: str, value: Any) -> Schedule:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"{where}: {name} must be a number in (0, 1] or a callable k -> value, got {value!r}")
    const = float(value)
    return lambda k: const


class FrankWolfe(torch.optim.Optimizer):
    r"""Frank-Wolfe over a constraint set, driven by ``.grad`` (true gradients or forward-gradient estimates).

    Args:
        params: parameters or parameter groups (each group may set its own constraint and sizes).
        constraint: ``"l1"``, ``"simplex"``, ``"box"`` or ``"nuclear"`` (see :mod:`fwdgrad.optim.lmo`).
        radius: size of the ℓ1 ball, the simplex or the nuclear-norm ball.
        lower, upper: bounds of the box.
        step_size: ``γ_k``; ``None`` is ``2/(k+2)``; a number in (0, 1] is constant; a callable maps the step
            index k (from 0) to ``γ_k``.
        variance_reduction: use the running average ``d_k`` of past directions (Rostami & Kia 2024) instead of
            the current ``.grad``.
        averaging: ``ρ_k`` of the average; ``None`` is ``4/(k+8)^{2/3}``; a number in (0, 1] or a callable.

    Parameters with ``.grad`` of ``None`` are skipped.
    """

    def __init__(
        self,
        params: Iterable[Any],
        constraint: str = "l1",
        *,
        radius: float = 1.0,
        lower: float = -1.0,
        upper: float = 1.0,
        step_size: float | Schedule | None = None,
        variance_reduction: bool = False,
        averaging: float | Schedule | None = None,
    ) -> None:
        defaults = dict(constraint=constraint, radius=radius, lower=lower, upper=upper, step_size=step_size,
                        variance_reduction=variance_reduction, averaging=averaging)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.last_gap: float = math.nan

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        where = "fwdgrad.optim.FrankWolfe"
        name = group["constraint"]
        if name not in LMOS:
            raise ValueError(f"{where}: unknown constraint {name!r}; choose one of {sorted(LMOS)}")
        if not isinstance(group["variance_reduction"], bool):
            raise TypeError(f"{where}: variance_reduction must be a bool, got {group['variance_reduction']!r}")
        kwargs = {k: group[k] for k in LMO_PARAMETERS[name]}
        LMOS[name](torch.ones(2, 2), **kwargs)  # validates the set's parameters, naming a bad value
        group["_lmo_kwargs"] = kwargs
        group["_gamma"] = default_step_size if group["step_size"] is None else _check_schedule(
            where, "step_size", group["step_size"])
        group["_rho"] = default_averaging if group["averaging"] is None else _check_schedule(
            where, "averaging", group["averaging"])
        for p in group["params"]:
            if name == "nuclear" and p.dim() < 2:
                raise ValueError(f"{where}: constraint 'nuclear' needs parameters with >= 2 dimensions, "
                                 f"got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Frank-Wolfe step on every parameter with a ``.grad``; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gap = 0.0
        for group in self.param_groups:
            lmo = LMOS[group["constraint"]]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                k = state.get("step", 0)
                phi = p.grad.detach()
                if group["variance_reduction"]:
                    rho = 1.0 if "direction" not in state else float(group["_rho"](k))
                    d = state.get("direction")
                    d = phi.clone() if d is None else d.mul_(1 - rho).add_(phi, alpha=rho)
                    state["direction"] = d
                else:
                    d = phi
                s = lmo(d, **group["_lmo_kwargs"])
                gap += float(torch.sum(d * (p - s)))
                gamma = float(group["_gamma"](k))
                p.add_(s - p, alpha=gamma)
                state["step"] = k + 1
        self.last_gap = gap
        return loss
