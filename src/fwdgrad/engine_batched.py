r"""Many directions in one pass: the fast path of :mod:`fwdgrad.engine`, batched over K with ``vmap``.

The primal runs once and every tangent carries a leading direction dimension: ``torch.func.vmap`` over
``torch.func.jvp``. ``nn.Linear`` and ``nn.Conv2d`` run as one ``torch.autograd.Function`` whose ``jvp``
forms the output tangent itself,

.. math:: Y_t = X_t W^\top + (x V)\odot U + B_t \quad\text{(rank-1; } X_t: [K, B, in],\ U: [K, out],\ V: [K, in])

so with rank-1 tangents a Linear costs one forward matmul plus one matmul with K·B rows, against two
matmuls per direction for the one-direction loop: about ``1 + K`` units instead of ``2K``. Other modules
get dual parameters from ``jvp`` (their tangents materialised for the chunk). A JVP level does not reach a
module's parameters through ``jvp``'s own primals only: a scalar *trigger* (value 0, tangent 1) is passed
to every fast module so that PyTorch calls its ``jvp`` even when its input carries no tangent.

What cannot run this way (a module that updates buffers, such as BatchNorm in training mode; a parameter
used outside its module's forward; an input a fast module does not expect) makes :func:`batched_directions`
restore the buffers and return ``None``; the caller then takes the one-direction loop.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.engine import TangentSource
    >>> from fwdgrad.engine_batched import batched_directions
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> params = dict(model.named_parameters())
    >>> source = TangentSource("rank1", [p.detach() for p in params.values()], 5, torch.Generator().manual_seed(0))
    >>> loss, dirs = batched_directions(model, lambda m: F.cross_entropy(m(x), y), params, source, where="demo")
    >>> tuple(dirs.shape)
    (5,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vmap

from fwdgrad._validation import check_real_scalar
from fwdgrad.engine import (
    _USE,
    TangentSource,
    _add_input_term,
    _fast_term,
    _fits,
    _is_fast_module,
    _primal,
    _restore_buffers,
    _Slot,
    _snapshot_buffers,
)

Tensor = torch.Tensor
LossFn = Callable[[nn.Module], Tensor]


class _GiveUp(Exception):
    """Raised inside the batched pass when it cannot handle a call; the caller falls back."""


class _FastModuleJvp(torch.autograd.Function):
    """A Linear/Conv2d: the primal from plain tensors, the output tangent formed in ``jvp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, trigger: Tensor, w_a: Tensor | None,
                w_b: Tensor | None, b_t: Tensor | None, module: nn.Module, x_dual: bool) -> Tensor:
        return _primal(module, x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _bias, _trigger, w_a, w_b, b_t, module, x_dual = inputs
        ctx.module, ctx.x_dual, ctx.factored = module, x_dual, w_b is not None
        ctx.save_for_forward(x, weight, w_a, w_b, b_t, output)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, *_unused: Any) -> Tensor:
        x, weight, w_a, w_b, b_t, out = ctx.saved_tensors
        w_dir = (w_a, w_b) if ctx.factored else w_a
        term = _fast_term(ctx.module, x, out, w_dir, b_t)
        if ctx.x_dual:
            term = _add_input_term(ctx.module, term, x_t, weight, inplace=False)
        return term


class BatchedPass:
    """``loss_fn(model)`` and its derivatives along directions ``start..stop-1`` of ``source`` in one pass.

    Args:
        model: the module; its trainable parameters are ``params`` (index = position in ``params``).
        params: the trainable parameters, in the estimator's order.
        source: the step's tangents (rank-1 factors are used as they are).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], source: TangentSource) -> None:
        self.model, self.source = model, source
        index_of = {id(p): i for i, p in enumerate(params)}
        self.slots: dict[nn.Module, list[_Slot]] = {}
        for m in model.modules():
            found = [
                _Slot(name, p, index_of[id(p)], source.primals[index_of[id(p)]])
                for name, p in m._parameters.items()
                if p is not None and id(p) in index_of
            ]
            if found:
                self.slots[m] = found
        self.fast = [m for m in self.slots if _is_fast_module(m) and "forward" not in m.__dict__]
        fast = set(self.fast)
        self.generic_index = sorted({s.index for m, ss in self.slots.items() if m not in fast for s in ss})
        self.fast_index = sorted({s.index for m in self.fast for s in self.slots[m]})
        self._trigger: Tensor | None = None
        self._duals: dict[int, Tensor] = {}
        self._dirs: dict[int, Any] = {}
        self._depth: dict[nn.Module, int] = {}

    # -- the module side --------------------------------------------------------------------------------

    def _fast_forward(self, m: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or not _fits(m, args[0]):
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
            x, plain["weight"], plain["bias"], self._trigger, w_a, w_b, dirs["bias"], m, x_dual
        )

    def _open(self, m: nn.Module, args: Any) -> None:
        depth = self._depth.get(m, 0)
        self._depth[m] = depth + 1
        if not depth:
            for s in self.slots[m]:
                m._parameters[s.name] = self._duals[s.index]

    def _close(self, m: nn.Module, args: Any, output: Any) -> None:
        self._depth[m] -= 1
        if not self._depth[m]:
            for s in self.slots[m]:
                m._parameters[s.name] = s.watched

    @contextmanager
    def _installed(self) -> Iterator[None]:
        handles = []
        fast = set(self.fast)
        try:
            for m, slots in self.slots.items():
                for s in slots:
                    m._parameters[s.name] = s.watched
                if m in fast:
                    m.forward = functools.partial(self._fast_forward, m)
                else:
                    handles.append(m.register_forward_pre_hook(self._open))
                    handles.append(m.register_forward_hook(self._close, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for m, slots in self.slots.items():
                if m in fast:
                    m.__dict__.pop("forward", None)
                for s in slots:
                    m._parameters[s.name] = s.param
            self._depth.clear()
            self._duals, self._dirs, self._trigger = {}, {}, None

    # -- the direction side -----------------------------------------------------------------------------

    def _blocks(self, start: int, stop: int) -> list[Tensor]:
        """The vmapped inputs: rank-1 factors / dense blocks of fast tensors, dense blocks of generic ones."""
        flat: list[Tensor] = []
        for i in self.fast_index:
            block = self.source._block(i)
            if isinstance(block, tuple):
                flat += [block[0][start:stop], block[1][start:stop]]
            else:
                flat.append(block[start:stop])
        for i in self.generic_index:
            flat.append(torch.stack([self.source.dense(i, k) for k in range(start, stop)]))
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
        generic_primals = [self.source.primals[i] for i in self.generic_index]
        ones = torch.ones((), dtype=self.source.primals[0].dtype, device=self.source.primals[0].device)

        def one(*flat: Tensor) -> tuple[Tensor, Tensor]:
            generic_tangents = self._split(flat)

            def f(trigger: Tensor, *duals: Tensor) -> Tensor:
                self._trigger = trigger
                self._duals = dict(zip(self.generic_index, duals))
                return check_real_scalar(where, loss_fn(self.model))

            return jvp(f, (torch.zeros_like(ones), *generic_primals), (ones, *generic_tangents))

        before = _USE.hits
        try:
            with torch.no_grad(), self._installed():
                value, dirs = vmap(one, randomness="same")(*self._blocks(start, stop))
        except (_GiveUp, RuntimeError):
            return None
        if _USE.hits != before:
            return None
        return value[0].detach(), dirs.detach()


def batched_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], source: TangentSource, *,
    where: str, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``(loss, dirs [K])`` by :class:`BatchedPass`, ``chunk_size`` directions per pass; ``None`` (buffers
    restored) when the model or the loss needs the one-direction loop."""
    k_total = source.num_directions
    step = k_total if chunk_size is None else min(chunk_size, k_total)
    saved = _snapshot_buffers(model)
    run = BatchedPass(model, list(params.values()), source)
    loss, dirs = None, []
    for start in range(0, k_total, step):
        got = run.run(loss_fn, start, min(start + step, k_total), where)
        if got is None:
            _restore_buffers(saved)
            return None
        loss = got[0] if loss is None else loss
        dirs.append(got[1])
    return loss, torch.cat(dirs)
