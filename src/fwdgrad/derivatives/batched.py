r"""Many directions in one pass: the per-module fast path batched over K with ``vmap``.

The primal runs once and every tangent carries a leading direction dimension: ``torch.func.vmap`` over
``torch.func.jvp``. A module with a fast rule (:func:`fwdgrad.derivatives.rules.fast_rule`: ``nn.Linear``,
``nn.Conv2d`` without hooks or overrides) runs as one ``torch.autograd.Function`` whose ``jvp`` forms the
output tangent from the rule,

.. math:: Y_t = X_t W^\top + (x V)\odot U + B_t \quad\text{(rank-1; } X_t: [K, B, in],\ U: [K, out],\ V: [K, in])

so with rank-1 tangents a Linear costs one forward matmul plus one matmul with K·B rows, against two
matmuls per direction for the one-direction loop: about ``1 + K`` units instead of ``2K``. Other modules
get dual parameters from ``jvp`` (their tangents materialised for the chunk). A JVP level does not reach a
module's parameters through ``jvp``'s own primals only: a scalar *trigger* (value 0, tangent 1) is passed
to every fast module so that PyTorch calls its ``jvp`` even when its input carries no tangent.

What cannot run this way (a module that updates buffers, such as BatchNorm in training mode; a parameter
used outside its module's forward; an input a fast module does not expect; an operation without a batching
rule) makes :func:`batched_directions` return ``None``; the caller restores the buffers and takes another
path.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.directions import TangentSource
    >>> from fwdgrad.derivatives.batched import batched_directions
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> params = list(model.parameters())
    >>> source = TangentSource("rank1", [p.detach() for p in params], 5, torch.Generator().manual_seed(0))
    >>> loss, dirs = batched_directions(model, lambda m: F.cross_entropy(m(x), y), params, source, where="demo")
    >>> tuple(dirs.shape)
    (5,)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vmap

from fwdgrad._validation import check_real_scalar
from fwdgrad.derivatives import transformer as _transformer  # noqa: F401  (registers the attention ModuleRules)
from fwdgrad.derivatives.rules import LayerRule, fast_rule, global_hooks_active, module_rule
from fwdgrad.derivatives.watch import USES, LossFn, ModulePass, restore_buffers, snapshot_buffers
from fwdgrad.directions import TangentSource

Tensor = torch.Tensor


class _GiveUp(Exception):
    """Raised inside the batched pass when it cannot handle a call; the caller falls back."""


class _FastModuleJvp(torch.autograd.Function):
    """A Linear/Conv2d: the primal from plain tensors, the output tangent formed in ``jvp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, trigger: Tensor, w_a: Tensor | None,
                w_b: Tensor | None, b_t: Tensor | None, module: nn.Module, rule: LayerRule, x_dual: bool) -> Tensor:
        return rule.primal(module, x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _bias, _trigger, w_a, w_b, b_t, module, rule, x_dual = inputs
        ctx.module, ctx.rule, ctx.x_dual, ctx.factored = module, rule, x_dual, w_b is not None
        ctx.set_materialize_grads(False)  # jvp reads no input tangent but x's: no zero tangents of the weights
        ctx.save_for_forward(x, weight, w_a, w_b, b_t, output)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, *_unused: Any) -> Tensor:
        x, weight, w_a, w_b, b_t, out = ctx.saved_tensors
        w_dir = (w_a, w_b) if ctx.factored else w_a
        term = ctx.rule.param_tangent(ctx.module, x, out, w_dir, b_t)
        if ctx.x_dual and x_t is not None:  # None: x carries no tangent at this level
            term = ctx.rule.add_input_tangent(ctx.module, term, x_t, weight, inplace=False)
        return term


class BatchedPass(ModulePass):
    """``loss_fn(model)`` and its derivatives along directions ``start..stop-1`` of ``source`` in one pass.

    Args:
        model: the module; its trainable parameters are ``params`` (index = position in ``params``).
        params: the trainable parameters, in the estimator's order.
        source: the step's tangents (rank-1 factors are used as they are).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], source: TangentSource) -> None:
        super().__init__(model, params, source)
        hooks = global_hooks_active()
        self.rules: dict[nn.Module, LayerRule] = {}
        for m in self.slots:
            rule = fast_rule(m, global_hooks=hooks)
            if rule is not None:
                self.rules[m] = rule
        # a module whose rule reads a child's parameters (nn.MultiheadAttention's out_proj): no vmap form of
        # such rules yet, and the pass would only find out at the end (a watched use): the windowed pass runs it
        self.declines = any(
            owner is not m and any(s.name == attr for s in self.slots.get(owner, ()))
            for m in model.modules() if (mrule := module_rule(m, global_hooks=hooks)) is not None
            for owner, attr in mrule.parameters(m).values()
        )
        self.generic_index = sorted({s.index for m, ss in self.slots.items() if m not in self.rules for s in ss})
        self.fast_index = sorted({s.index for m in self.rules for s in self.slots[m]})
        self._trigger: Tensor | None = None
        self._duals: dict[int, Tensor] = {}
        self._dirs: dict[int, Any] = {}

    # -- the module side --------------------------------------------------------------------------------

    def _fast_forward(self, m: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        rule = self.rules[m]
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or not rule.fits(m, args[0]):
            raise _GiveUp
        x = args[0]
        plain: dict[str, Any] = {"weight": m._parameters.get("weight"), "bias": m._parameters.get("bias")}
        dirs: dict[str, Any] = {"weight": None, "bias": None}
        for s in self.slots[m]:
            plain[s.name], dirs[s.name] = s.primal, self._dirs[s.index]
        w = dirs["weight"]
        w_a, w_b = w if isinstance(w, tuple) else (w, None)
        x_dual = bool(torch._C._functorch.is_gradtrackingtensor(x))
        return _FastModuleJvp.apply(
            x, plain["weight"], plain["bias"], self._trigger, w_a, w_b, dirs["bias"], m, rule, x_dual
        )

    def _open(self, m: nn.Module, args: Any) -> None:
        if self._enter(m):
            for s in self.slots[m]:
                m._parameters[s.name] = self._duals[s.index]

    def _close(self, m: nn.Module, args: Any, output: Any) -> None:
        if self._leave(m):
            self._watch(m)

    def _reset(self) -> None:
        super()._reset()
        self._duals, self._dirs, self._trigger = {}, {}, None

    # -- the direction side -----------------------------------------------------------------------------

    def _blocks(self, start: int, stop: int) -> list[Tensor]:
        """The vmapped inputs: rank-1 factors / dense blocks of fast tensors, dense blocks of generic ones."""
        flat: list[Tensor] = []
        for i in self.fast_index:
            block = self.source._kept(i)
            if isinstance(block, tuple):
                flat += [block[0][start:stop], block[1][start:stop]]
            else:
                flat.append(self.source.chunk(i, start, stop))
        for i in self.generic_index:
            flat.append(self.source.chunk(i, start, stop))
        return flat

    def _split(self, flat: Sequence[Tensor]) -> list[Tensor]:
        pos = 0
        for i in self.fast_index:
            if self.source.factored and self.source.primals[i].dim() >= 2:
                self._dirs[i] = (flat[pos], flat[pos + 1])
                pos += 2
            else:
                self._dirs[i] = flat[pos]
                pos += 1
        return list(flat[pos:])

    def run(self, loss_fn: LossFn, start: int, stop: int, where: str) -> tuple[Tensor, Tensor] | None:
        """``(loss, dirs [stop - start])``, or ``None`` when this pass cannot handle the model or loss."""
        if self.declines:
            return None
        generic_primals = [self.source.primals[i] for i in self.generic_index]
        ones = torch.ones((), dtype=self.source.primals[0].dtype, device=self.source.primals[0].device)

        def one(*flat: Tensor) -> tuple[Tensor, Tensor]:
            generic_tangents = self._split(flat)

            def f(trigger: Tensor, *duals: Tensor) -> Tensor:
                self._trigger = trigger
                self._duals = dict(zip(self.generic_index, duals))
                return check_real_scalar(where, loss_fn(self.model))

            return jvp(f, (torch.zeros_like(ones), *generic_primals), (ones, *generic_tangents))

        before = USES.hits
        forwards = {m: functools.partial(self._fast_forward, m) for m in self.rules}
        try:
            with torch.no_grad(), self.installed(forwards):
                value, dirs = vmap(one, randomness="same")(*self._blocks(start, stop))
        except _GiveUp:
            return None
        except RuntimeError as exc:  # vmap cannot batch an operation of this model: another path can
            if not _is_batching_error(exc):
                raise  # the user's own error (their forward, their loss): never swallowed and run again
            return None
        if USES.hits != before:
            return None
        return value[0].detach(), dirs.detach()


def _is_batching_error(exc: RuntimeError) -> bool:
    """Whether ``exc`` says that ``vmap`` / functorch could not batch an operation (a reason to take another
    path), rather than an error of the model's or the loss's own code (which must reach the caller)."""
    text = str(exc).lower()
    return any(k in text for k in ("vmap", "batching rule", "batched tensor", "functorch", "batchedtensor",
                                   "transform", "captured tensor"))


def batched_directions(
    model: nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | dict[str, Tensor], source: TangentSource, *,
    where: str, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``(loss, dirs [K])`` by :class:`BatchedPass`, ``chunk_size`` directions per pass; ``None``, buffers
    restored, when the model or the loss needs another path."""
    k_total = source.num_directions
    step = k_total if chunk_size is None else min(chunk_size, k_total)
    saved = snapshot_buffers(model)
    run = BatchedPass(model, list(params.values()) if isinstance(params, dict) else params, source)
    loss, dirs = None, []
    for start in range(0, k_total, step):
        got = run.run(loss_fn, start, min(start + step, k_total), where)
        if got is None:
            restore_buffers(saved)
            return None
        loss = got[0] if loss is None else loss
        dirs.append(got[1])
    return loss, torch.cat(dirs)
