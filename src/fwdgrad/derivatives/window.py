r"""Windowed forward AD: one direction through the model, each parameter dual only inside its own module.

A pass runs ``loss_fn(model)`` under ``torch.no_grad`` inside a forward-AD level, with every trainable
parameter swapped out of its module (:class:`fwdgrad.derivatives.watch.ModulePass`). A parameter becomes a
dual tensor ``(θ_i, v_i)`` only during the forward of a module that owns it (a *window*, opened by a
forward pre-hook and closed by a forward hook). A module with a fast rule
(:func:`fwdgrad.derivatives.rules.fast_rule`: ``nn.Linear``, ``nn.Conv2d`` without hooks or overrides) gets
no dual at all: the pre-hook strips the input's tangent, the module computes the primal output only, and
the forward hook forms the whole output tangent from the rule (PyTorch's forward-AD rule for ``addmm``
with a plain weight would also multiply the input by a zero weight tangent, a wasted matmul):

.. math:: y_t = x_t W^\top + x W_t^\top + b_t, \qquad x W_t^\top = (x v)\,u^\top \text{ when } W_t = u v^\top,

so with ``rank1`` tangents the weight's term costs ``O(B·(in + out))`` and ``u vᵀ`` is never formed. Any
other module gets dual parameters and PyTorch's own forward-AD rules, hooks included. A module with a
whole-module rule (:class:`fwdgrad.derivatives.rules.ModuleRule`: ``nn.MultiheadAttention``, which reads
``out_proj``'s tensors outside ``out_proj``'s forward, and ``nn.TransformerEncoderLayer``) runs that rule in
place of its forward, with the tangents of every tensor it reads drawn from the same source.

Example:
    >>> import torch
    >>> from fwdgrad.directions import TangentSource
    >>> from fwdgrad.derivatives.window import WindowedPass
    >>> conv = torch.nn.Conv2d(1, 2, 3)
    >>> x = torch.randn(4, 1, 5, 5)
    >>> params = list(conv.parameters())
    >>> source = TangentSource("gaussian", [p.detach() for p in params], 1, torch.Generator().manual_seed(0))
    >>> loss, d, clean = WindowedPass(conv, params, source).run(lambda m: m(x).pow(2).mean(), 0, "demo")
    >>> clean, tuple(d.shape)
    (True, ())
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad._validation import check_real_scalar
from fwdgrad.derivatives import transformer as _transformer  # noqa: F401  (registers the attention ModuleRules)
from fwdgrad.derivatives.rules import LayerRule, ModuleRule, fast_rule, global_hooks_active, module_rule
from fwdgrad.derivatives.watch import USES, LossFn, ModulePass, Slot
from fwdgrad.directions import TangentSource

Tensor = torch.Tensor


class WindowedPass(ModulePass):
    """Evaluates ``loss_fn(model)`` and its derivative along direction ``k`` of ``source``.

    Args:
        model: the module; its trainable parameters are ``params`` (index = position in ``params``).
        params: the trainable parameters, in the estimator's order.
        source: the step's tangents.
        fast_modules: use the fast rules where they apply (``False``: dual parameters in every module).
    """

    def __init__(
        self, model: nn.Module, params: Sequence[Tensor], source: TangentSource, *, fast_modules: bool = True
    ) -> None:
        super().__init__(model, params, source)
        hooks = global_hooks_active()
        self.rules: dict[nn.Module, LayerRule] = {}
        if fast_modules:
            for m in self.slots:
                rule = fast_rule(m, global_hooks=hooks)
                if rule is not None:
                    self.rules[m] = rule
        # modules with a whole-module rule (nn.MultiheadAttention): (rule, [(name, owner, attribute, slot)])
        self.module_rules: dict[nn.Module, tuple[ModuleRule, list[tuple[str, nn.Module, str, Slot | None]]]] = {}
        if fast_modules:
            for m in model.modules():
                mrule = module_rule(m, global_hooks=hooks)
                if mrule is None:
                    continue
                covered = [
                    (name, owner, attr, next((s for s in self.slots.get(owner, ()) if s.name == attr), None))
                    for name, (owner, attr) in mrule.parameters(m).items()
                ]
                if not covered or any(c[3] is not None for c in covered):  # a structural rule, or tangents
                    self.module_rules[m] = (mrule, covered)
        self._direction = 0
        self._input_tangent: dict[nn.Module, Tensor | None] = {}

    def _open(self, m: nn.Module, args: Any) -> Any:
        if not self._enter(m):
            return None
        slots = self.slots[m]
        rule = self.rules.get(m)
        if rule is not None and args and isinstance(args[0], Tensor) and rule.fits(m, args[0]):
            # The module computes the primal only; _close adds the whole output tangent.
            x_p, x_t = fwAD.unpack_dual(args[0])
            self._input_tangent[m] = x_t
            for s in slots:
                m._parameters[s.name] = s.primal
            return (x_p, *args[1:])
        for s in slots:
            m._parameters[s.name] = fwAD.make_dual(s.primal, self.source.dense(s.index, self._direction))
        return None

    def _close(self, m: nn.Module, args: Any, output: Any) -> Any:
        if not self._leave(m):
            return None
        result = None
        if m in self._input_tangent:
            result = self._fast_output(m, args[0], output, self._input_tangent.pop(m))
        self._watch(m)
        return result

    def _fast_output(self, m: nn.Module, x: Tensor, out: Tensor, x_t: Tensor | None) -> Tensor:
        """``make_dual(y, x_t W^T + x W_t^T + b_t)`` (conv: the same with convolutions)."""
        rule = self.rules[m]
        tangents: dict[str, Any] = {"weight": None, "bias": None}
        for s in self.slots[m]:
            tangents[s.name] = self.source.direction(s.index, self._direction)
        term = rule.param_tangent(m, x, out, tangents["weight"], tangents["bias"])
        if x_t is not None:
            term = rule.add_input_tangent(m, term, x_t, m.weight)
        return fwAD.make_dual(out, term)

    def _rule_forward(self, m: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``m``'s forward under its :class:`~fwdgrad.derivatives.rules.ModuleRule`: every tensor it reads
        (its own and its children's, such as ``out_proj.weight``) with its tangent of this direction; a call
        the rule declines runs ``m``'s own forward with those tensors dual (PyTorch's forward-AD rules)."""
        rule, covered = self.module_rules[m]
        k = self._direction
        values: dict[str, tuple[Any, Any]] = {}
        for name, owner, attr, slot in covered:
            if slot is None:  # frozen: the module's own tensor, no tangent
                values[name] = (owner._parameters[attr], None)
            else:
                values[name] = (slot.primal, self.source.direction(slot.index, k))
        out = rule.jvp(m, args, kwargs, values)
        if out is not None:
            return out
        slots = [(owner, slot) for _, owner, _, slot in covered if slot is not None]
        try:
            for owner, slot in slots:
                owner._parameters[slot.name] = fwAD.make_dual(slot.primal, self.source.dense(slot.index, k))
            return type(m).forward(m, *args, **kwargs)
        finally:
            for owner, slot in slots:
                owner._parameters[slot.name] = slot.watched

    def _reset(self) -> None:
        super()._reset()
        self._input_tangent.clear()

    def run(self, loss_fn: LossFn, direction: int, where: str) -> tuple[Tensor, Tensor, bool]:
        """``(loss, ⟨∇L, v_k⟩, clean)``; ``clean`` is ``False`` when a parameter was used outside a window."""
        self._direction = direction
        before = USES.hits
        forwards = {m: functools.partial(self._rule_forward, m) for m in self.module_rules}
        with torch.no_grad(), fwAD.dual_level(), self.installed(forwards):
            out = check_real_scalar(where, loss_fn(self.model))
            primal, tangent = fwAD.unpack_dual(out)
            tangent = torch.zeros_like(primal) if tangent is None else tangent
        return primal.detach(), tangent.detach(), USES.hits == before


def windowed_directions(
    model: nn.Module, loss_fn: LossFn, params: Sequence[Tensor], source: TangentSource, *, where: str,
) -> tuple[Tensor, Tensor] | None:
    """``(loss, dirs [K])`` by one windowed pass per direction, or ``None`` when a parameter was used
    outside its module's forward (the caller restores the buffers and takes the reference path)."""
    run = WindowedPass(model, params, source)
    loss, dirs = None, []
    for k in range(source.num_directions):
        value, d, clean = run.run(loss_fn, k, where)
        if not clean:
            return None
        loss = value if loss is None else loss
        dirs.append(d.reshape(1))
    return loss, torch.cat(dirs)
