"""DFA and FA on models of units: the pieces that run a model made of ``nn.Linear`` / ``nn.Conv2d`` /
:class:`~fwdgrad.derivatives.ActivityLayer` units without needing it to be a chain (see "DFA on models of
units" and "FA on models of units" in :mod:`fwdgrad.estimators.feedback`, whose estimators use them).

- :class:`UnitRunner` stands in for the model inside ``loss_fn``: one graph-free run recording every unit
  call (its inputs and output) and the element-wise activation that follows it.
- :class:`FeedbackUnit` is a unit inside FA's backward: the unit's local weight gradients with its true
  weights, its input gradient with the feedback matrix in place of the weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fwdgrad.derivatives import local_weight_grads
from fwdgrad.estimators.activity import select_modules, uncovered_parameters

Tensor = torch.Tensor

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.Hardtanh,
)


def is_elementwise(m: nn.Module) -> bool:
    """Whether ``m`` acts entry by entry: one of :data:`ELEMENTWISE`, or a module that sets
    ``fwdgrad_elementwise = True``."""
    return isinstance(m, ELEMENTWISE) or bool(getattr(m, "fwdgrad_elementwise", False))


@dataclasses.dataclass
class UnitCall:
    """One call of a unit: its inputs and output (primal, detached) and the element-wise activation that
    consumes its output (the module and its input), if one follows before the next unit."""

    name: str
    module: nn.Module
    inputs: tuple[Any, ...]
    output: Tensor
    act: tuple[nn.Module, Tensor] | None = None


class UnitRunner:
    """Stands in for the model inside ``loss_fn`` for DFA on models of units: runs the model once without a
    graph, recording every unit call and the activation after it; hands the criterion the logits as a leaf."""

    def __init__(self, model: nn.Module, chosen: list[tuple[str, nn.Module]], where: str) -> None:
        self.model, self.chosen, self.where = model, chosen, where
        self.units: list[UnitCall] = []
        self.logits: Tensor | None = None
        self._out: Tensor | None = None

    def _on_unit(self, name: str, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.where}: unit {name!r} must return one tensor, got {type(out).__name__}")
        inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        self.units.append(UnitCall(name, m, inputs, out.detach()))
        self._out = out

    def _on_act(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        last = self.units[-1] if self.units else None
        if last is None or last.act is not None or not args or not isinstance(args[0], Tensor):
            return
        if args[0].shape == last.output.shape:  # the unit's output itself, or it plus a residual
            last.act = (m, args[0].detach())

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.logits is not None:
            raise ValueError(f"{self.where}: loss_fn must call its model argument once")
        handles = [m.register_forward_hook(lambda m, a, o, _n=n: self._on_unit(_n, m, a, o))
                   for n, m in self.chosen]
        handles += [m.register_forward_pre_hook(self._on_act) for m in self.model.modules() if is_elementwise(m)]
        try:
            with torch.no_grad():
                y = self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if (not isinstance(y, Tensor) or y.dim() != 2 or not self.units or y is not self._out):
            raise ValueError(f"{self.where}: dfa needs the model's output [B, C] to be the output of its last "
                             "Linear/ActivityLayer unit (the read-out)")
        self.logits = y.detach().requires_grad_(True)
        return self.logits

    def check(self, value: Any) -> None:
        if self.logits is None:
            raise ValueError(f"{self.where}: loss_fn must call its model argument (as m(x))")
        if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
            raise TypeError(f"{self.where}: loss_fn must return a floating-point tensor, got {type(value).__name__}")


class FeedbackUnit(torch.autograd.Function):
    """A unit inside FA's backward: the forward hands on the unit's own output; the backward adds the unit's
    local weight gradients (true weights) to the estimate and returns the input gradient with the feedback
    matrix in place of the weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, anchor: Tensor, info: tuple[Any, ...]) -> Tensor:
        ctx.save_for_backward(x.detach())
        ctx.info = info
        return out.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        module, b, where, name_of, grads = ctx.info
        g = g.detach()
        for pname, gr in local_weight_grads(module, (x,), g).items():
            n = name_of.get(id(module.get_parameter(pname)))
            if n is not None:
                grads[n] = grads[n] + gr.to(grads[n].dtype)
        gx = unit_input_grad(where, module, x, g, b) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


def unit_input_grad(where: str, module: nn.Module, x: Tensor, g: Tensor, b: Tensor) -> Tensor:
    """The unit's input gradient from ``g`` with ``b`` in place of its weight: the unit's own
    ``feedback_input_grad(x, g, b)`` when it has one, else the rule of ``nn.Linear`` / ``nn.Conv2d``."""
    own = getattr(module, "feedback_input_grad", None)
    if callable(own):
        return own(x, g, b)
    if isinstance(module, nn.Linear):
        return g @ b
    if isinstance(module, nn.Conv2d):
        return torch.nn.grad.conv2d_input(x.shape, b, g, module.stride, module.padding, module.dilation,
                                          module.groups)
    raise ValueError(f"{where}: fa needs unit {type(module).__name__} to define feedback_input_grad(x, g, b) (its "
                     "input gradient with the feedback b in place of its weight)")


def shared_dims(module: nn.Module, out: Tensor) -> tuple[int, ...]:
    """The output dimensions (batch excluded) over which ``module`` applies the same weights: its
    ``fwdgrad_weight_shared_dims`` when it declares them, every dimension between the batch and the features
    for an ``nn.Linear``, none otherwise."""
    declared = getattr(module, "fwdgrad_weight_shared_dims", None)
    if declared is not None:
        return tuple(int(d) for d in declared)
    if isinstance(module, nn.Linear):
        return tuple(range(1, out.dim() - 1))
    return ()


def units_covering(
    where: str, method: str, model: nn.Module, params: dict[str, nn.Parameter]
) -> list[tuple[str, nn.Module]]:
    """The model's units (``(name, module)`` from :func:`select_modules`), refused with one error listing up to
    eight parameters that no unit holds: ``method`` updates unit parameters only."""
    chosen = select_modules(where, model, None)
    uncovered = uncovered_parameters(model, chosen, params)
    if uncovered:
        listed = "; ".join(f"{n} ({why})" for n, why in list(uncovered.items())[:8])
        raise ValueError(f"{where}: {method} updates the parameters of Linear/Conv2d/ActivityLayer units only; "
                         f"{len(uncovered)} parameter(s) are outside them: {listed}")
    return chosen
