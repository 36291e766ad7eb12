r"""The reference path: directional derivatives by ``torch.func`` / dual tensors, through ``functional_call``.

:func:`directional_derivatives` evaluates ``f(primals)`` and ``⟨∇f, v_k⟩`` for materialised tangents, for
any function of a list of tensors; :func:`reference_directions` applies it to ``loss_fn(model)`` with the
model's parameters replaced (:func:`call_with_parameters`). Every fast path is tested against this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fwdgrad._validation import check_real_scalar
from fwdgrad.derivatives.watch import LossFn, functional_call_once
from fwdgrad.directions import TangentSource

Tensor = torch.Tensor

_MUTATION_HINTS = ("mutate a captured Tensor", "inplace arithmetic", "in-place operation")


def _primal_of(x: Any) -> Any:
    return fwAD.unpack_dual(x).primal if isinstance(x, Tensor) else x


def _jvp_one(
    where: str, f: Callable[[list[Tensor]], Any], primals: Sequence[Tensor], tangents: Sequence[Tensor],
    has_aux: bool,
) -> tuple[Tensor, Tensor, Any]:
    """One JVP with dual tensors (``torch.autograd.forward_ad``): works with any module, including ones
    that update buffers in their forward (BatchNorm in training mode)."""
    with fwAD.dual_level():
        out = f([fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        value, aux = out if has_aux else (out, None)
        check_real_scalar(where, value, "fn")
        primal, tangent = fwAD.unpack_dual(value)
        if tangent is None:  # the output does not depend on the primals
            tangent = torch.zeros_like(primal)
        aux = tree_map(_primal_of, aux)
    return primal.detach(), tangent.detach(), aux


def _jvp_batched(
    where: str, f: Callable[[list[Tensor]], Any], primals: Sequence[Tensor], tangents: Sequence[Tensor],
    has_aux: bool,
) -> tuple[Tensor, Tensor, Any]:
    """K JVPs in one pass: ``vmap`` over ``torch.func.jvp``; the primal is computed once and only the
    tangent computations are batched. Random ops (dropout) use the same sample for every direction."""

    # torch.func.jvp carries only tensors as aux: pass tensor leaves through it, keep the rest aside.
    aux_spec: list[Any] = []

    def one(*ts: Tensor) -> Any:
        def g(*ps: Tensor) -> Any:
            out = f(list(ps))
            value = out[0] if has_aux else out
            check_real_scalar(where, value, "fn")
            if not has_aux:
                return value
            leaves, spec = tree_flatten(out[1])
            aux_spec[:] = [spec, leaves]
            return value, [x for x in leaves if isinstance(x, Tensor)]

        return jvp(g, tuple(primals), ts, has_aux=has_aux)

    res = vmap(one, randomness="same")(*tangents)
    aux = None
    if has_aux:
        value, dirs, tensor_leaves = res
        spec, leaves = aux_spec
        batched = iter(t[0] for t in tensor_leaves)
        aux = tree_unflatten([next(batched) if isinstance(x, Tensor) else x for x in leaves], spec)
    else:
        value, dirs = res
    return value[0].detach(), dirs.detach(), aux


def directional_derivatives(
    f: Callable[[list[Tensor]], Any],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    has_aux: bool = False,
    where: str = "fwdgrad.directional_derivatives",
) -> tuple[Tensor, Tensor, Any]:
    """``f(primals)`` and ``⟨∇f, v_k⟩`` for every direction ``k``.

    Args:
        f: maps a list of tensors (like ``primals``) to a real scalar (or ``(scalar, aux)`` with ``has_aux``).
        primals: the point ``θ``, a list of tensors.
        tangents: one tensor ``[K, *p.shape]`` per primal.
        chunk_size: at most this many directions per pass (``None``: all K at once).

    Returns:
        ``(value, dirs, aux)``: the detached value, ``dirs`` of shape ``[K]``, and ``aux`` of the first pass.

    Chunks of one direction run with dual tensors; larger chunks with ``vmap(jvp)``. A function that
    mutates captured tensors (BatchNorm's running statistics) cannot run under ``vmap``; it is detected
    and its directions then run one at a time (its buffers are then updated once per direction).
    """
    value, dirs, aux, _ = _directions(f, primals, tangents, chunk_size, has_aux, where)
    return value, dirs, aux


def _directions(
    f: Callable[[list[Tensor]], Any], primals: Sequence[Tensor], tangents: Sequence[Tensor],
    chunk_size: int | None, has_aux: bool, where: str,
) -> tuple[Tensor, Tensor, Any, bool]:
    """:func:`directional_derivatives`, and whether it had to finish one direction at a time."""
    k = tangents[0].shape[0]
    step = k if chunk_size is None else min(chunk_size, k)
    value, aux, dirs = None, None, []
    for start in range(0, k, step):
        chunk = [t[start : start + step] for t in tangents]
        if step > 1:
            try:
                v, d, a = _jvp_batched(where, f, primals, chunk, has_aux)
            except RuntimeError as exc:
                if not any(h in str(exc) for h in _MUTATION_HINTS):
                    raise
                return (*_finish_one_by_one(where, f, primals, tangents, start, has_aux, value, aux, dirs), True)
        else:
            v, d, a = _jvp_one(where, f, primals, [t[0] for t in chunk], has_aux)
            d = d.reshape(1)
        if value is None:
            value, aux = v, a
        dirs.append(d)
    return value, torch.cat(dirs), aux, False


def _finish_one_by_one(
    where: str, f: Callable[[list[Tensor]], Any], primals: Sequence[Tensor], tangents: Sequence[Tensor],
    start: int, has_aux: bool, value: Tensor | None, aux: Any, dirs: list[Tensor],
) -> tuple[Tensor, Tensor, Any]:
    for i in range(start, tangents[0].shape[0]):
        v, d, a = _jvp_one(where, f, primals, [t[i] for t in tangents], has_aux)
        if value is None:
            value, aux = v, a
        dirs.append(d.reshape(1))
    return value, torch.cat(dirs), aux



def call_with_parameters(model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor]) -> Any:
    """``loss_fn(model)`` with the named parameters replaced by ``params`` (dual or batched tensors), via
    :func:`functional_call_once`; the module's own parameters are restored afterwards, every slot of a
    module registered twice included."""
    return functional_call_once(_LossOf(model, loss_fn), {"model." + n: t for n, t in params.items()})


class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> Any:
        return self.loss_fn(self.model)


def reference_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], tangents: list[Tensor] | TangentSource, *,
    chunk_size: int | None, where: str,
) -> tuple[Tensor, Tensor]:
    """``(loss, dirs [K])`` by ``torch.func`` JVPs through ``functional_call`` (:func:`directional_derivatives`,
    ``chunk_size`` directions at a time). ``tangents``: materialised ``[K, *p.shape]`` blocks, or a
    :class:`~fwdgrad.directions.TangentSource` whose directions are drawn one chunk at a time
    (:meth:`~fwdgrad.directions.TangentSource.chunk`), so that a lean source holds ``chunk_size``
    model-sized tangents at most, not K."""
    names = list(params)
    primals = [p.detach() for p in params.values()]

    def f(xs: list[Tensor]) -> Tensor:
        return check_real_scalar(where, call_with_parameters(model, loss_fn, dict(zip(names, xs))))

    if not isinstance(tangents, TangentSource):
        value, dirs, _ = directional_derivatives(f, primals, tangents, chunk_size=chunk_size, where=where)
        return value, dirs
    source, k_total = tangents, tangents.num_directions
    step = k_total if chunk_size is None else min(chunk_size, k_total)
    loss, dirs_list, one_by_one = None, [], False
    for start in range(0, k_total, step):
        stop = min(start + step, k_total)
        chunk = [source.chunk(i, start, stop) for i in range(len(primals))]
        # after a chunk had to run one direction at a time (buffers mutated under vmap), the rest do too
        value, dirs, _, fell_back = _directions(f, primals, chunk, 1 if one_by_one else None, False, where)
        del chunk
        one_by_one = one_by_one or fell_back
        loss = value if loss is None else loss
        dirs_list.append(dirs)
    return loss, torch.cat(dirs_list)
