r"""Layer 2 — derivatives: how ``⟨∇L, v_k⟩`` is obtained for K directions, behind one entry point.

:func:`module_directions` returns the loss and the K directional derivatives of ``loss_fn(model)`` along
the tangents of a :class:`fwdgrad.directions.TangentSource`. It picks, in order:

1. the batched per-module pass (:mod:`~fwdgrad.derivatives.batched`, ``vmap`` over K > 1 directions),
2. the windowed per-module pass (:mod:`~fwdgrad.derivatives.window`, one direction at a time),
3. the reference path (:mod:`~fwdgrad.derivatives.reference`: ``torch.func`` JVPs through
   ``functional_call``, the tangents of ``chunk_size`` directions materialised at a time),

falling back, buffers restored, whenever a faster path cannot vouch for the model (a parameter used
outside its module, a module updating buffers under ``vmap``). ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` run the windowed pass through whole-module rules
(:mod:`~fwdgrad.derivatives.transformer`). Whatever the path, buffers move as in one
forward (:func:`~fwdgrad.derivatives.watch.once_per_step`), and a missing forward-AD rule raises
:class:`fwdgrad.ForwardADNotSupportedError` naming the operation and module. Per-layer rules live in one
registry (:mod:`~fwdgrad.derivatives.rules`). Finite differences and forward mode through time join as
further backends in this layer.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.directions import TangentSource
    >>> from fwdgrad.derivatives import module_directions
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> params = dict(model.named_parameters())
    >>> source = TangentSource("rank1", [p.detach() for p in params.values()], 3, torch.Generator().manual_seed(0))
    >>> loss, dirs = module_directions(model, lambda m: F.cross_entropy(m(x), y), params, source, where="demo")
    >>> tuple(dirs.shape)
    (3,)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.derivatives.batched import batched_directions
from fwdgrad.derivatives.reference import call_with_parameters, directional_derivatives, reference_directions
from fwdgrad.derivatives.rules import (
    MODULE_RULES,
    RULES,
    ActivityLayer,
    LayerRule,
    ModuleRule,
    fast_rule,
    is_activity_layer,
    local_weight_grads,
    module_rule,
    register_module_rule,
    register_rule,
)
from fwdgrad.derivatives.watch import LossFn, functional_call_once, once_per_step, restore_buffers, snapshot_buffers
from fwdgrad.derivatives.window import windowed_directions
from fwdgrad.directions import PER_TENSOR_SAMPLERS, TangentSource
from fwdgrad.errors import explain_forward_ad_errors

Tensor = torch.Tensor


@contextlib.contextmanager
def forward_mode(where: str, model: nn.Module | None) -> Iterator[None]:
    """A forward-AD level for a pass through ``model``: attention on the math path, and PyTorch's missing
    forward-AD rules reported as :class:`fwdgrad.ForwardADNotSupportedError` naming ``where`` and the module."""
    with explain_forward_ad_errors(where, model), forward_mode_attention(model), fwAD.dual_level():
        yield


def uses_fast_loop(name: str, num_directions: int, chunk_size: int | None = None) -> bool:
    """Whether the per-module passes apply: to every per-tensor sampler (``gaussian``, ``rademacher``,
    ``rank1``) whatever K is. K > 1 runs the batched pass, ``chunk_size`` directions at a time, where a
    Linear/Conv2d forms the K weight tangents' term as one wide product (about ``1 + 2K`` matmul units dense,
    ``1 + K`` rank-1); one direction per pass (``chunk_size=1``) runs the windowed pass, which draws each
    tensor's tangent as its module runs (no model-sized tangent). Stored tangents (``given``): one direction
    only. ``num_directions`` and ``chunk_size`` matter only for ``given``; kept for callers."""
    if name == "given":  # stored tangents (a guess): one direction runs the windowed pass
        return num_directions == 1
    return name in PER_TENSOR_SAMPLERS


def fast_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], source: TangentSource, *, where: str,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The per-module passes alone: batched over K (``chunk_size`` at a time) where the model allows it, else
    (rank-1, or one direction) one windowed pass per direction; ``None``, buffers restored, when neither can
    vouch for the model, and for dense K > 1 that the batched pass declines (the reference ``vmap(jvp)``,
    about ``1 + 2K`` units, beats K windowed passes of 3 each)."""
    plist = list(params.values())
    if source.num_directions > 1 and chunk_size != 1:  # one direction a pass: windowed
        got = batched_directions(
            model, once_per_step(model, loss_fn), plist, source, where=where, chunk_size=chunk_size
        )
        if got is not None or not source.factored:  # dense: the reference vmap(jvp) beats K windowed passes
            return got
    saved = snapshot_buffers(model)
    got = windowed_directions(model, once_per_step(model, loss_fn), plist, source, where=where)
    if got is None:
        restore_buffers(saved)
    return got


def module_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], source: TangentSource, *,
    where: str, chunk_size: int | None = None, fast: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(loss, dirs [K])``: ``loss_fn(model)`` and ``⟨∇L, v_k⟩`` for the K tangents of ``source``.

    Args:
        model: the module; ``params`` (name → parameter) are the trainable parameters, in ``source`` order.
        loss_fn: ``loss_fn(model)`` returns a real scalar.
        source: the step's tangents.
        where: the public call, for error messages.
        chunk_size: at most this many directions per pass.
        fast: allow the per-module passes (``False``: the reference path only).
    """
    with explain_forward_ad_errors(where, model), forward_mode_attention(model):
        if fast and uses_fast_loop(source.name, source.num_directions, chunk_size):
            got = fast_directions(model, loss_fn, params, source, where=where, chunk_size=chunk_size)
            if got is not None:
                return got
        return reference_directions(
            model, once_per_step(model, loss_fn), params, source, chunk_size=chunk_size, where=where
        )


__all__ = [
    "MODULE_RULES",
    "RULES",
    "ActivityLayer",
    "LayerRule",
    "ModuleRule",
    "call_with_parameters",
    "directional_derivatives",
    "fast_directions",
    "fast_rule",
    "forward_mode",
    "functional_call_once",
    "is_activity_layer",
    "local_weight_grads",
    "module_directions",
    "module_rule",
    "once_per_step",
    "reference_directions",
    "register_module_rule",
    "register_rule",
    "uses_fast_loop",
]
