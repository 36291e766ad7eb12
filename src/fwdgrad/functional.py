r"""The functional core: forward gradients of a function of a pytree of tensors.

For ``f: R^n -> R`` and tangents ``v_1 … v_K`` with ``E[v vᵀ] = I``, the forward gradient is

.. math:: \hat g = \frac1K \sum_{k=1}^K \langle \nabla f(\theta), v_k\rangle\, v_k,

where each directional derivative ``⟨∇f, v_k⟩`` is one forward-mode Jacobian-vector product (JVP). No
backward pass runs and no activation is stored for one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fwdgrad._validation import check_positive_int, check_real_scalar
from fwdgrad.errors import explain_forward_ad_errors
from fwdgrad.tangents import SAMPLERS, check_sampler_name

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
                return _finish_one_by_one(where, f, primals, tangents, start, has_aux, value, aux, dirs)
        else:
            v, d, a = _jvp_one(where, f, primals, [t[0] for t in chunk], has_aux)
            d = d.reshape(1)
        if value is None:
            value, aux = v, a
        dirs.append(d)
    return value, torch.cat(dirs), aux


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


def combine(dirs: Tensor, tangents: Sequence[Tensor]) -> list[Tensor]:
    """The mean estimate ``(1/K) Σ_k dirs[k] · tangents[k]`` for each tensor; shapes ``[K]``, ``[K, *s]``.

    With K = 1 the tangents are scaled in place and returned (they are consumed)."""
    k = dirs.shape[0]
    if k == 1:  # reuse the tangent's storage: no second model-sized allocation
        return [t[0].mul_(dirs[0].to(t.dtype)) for t in tangents]
    return [torch.tensordot(dirs.to(t.dtype), t, dims=1).div_(k) for t in tangents]


def forward_grad(
    fn: Callable[..., Any],
    primals: Any,
    *,
    num_directions: int = 1,
    tangents: str = "gaussian",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    r"""Forward-gradient estimate of ``∇fn(primals)``, without a backward pass.

    .. math:: \hat g = \frac1K \sum_{k=1}^{K} \langle \nabla f(\theta), v_k\rangle\, v_k,
              \qquad \mathbb{E}[\hat g] = \nabla f(\theta).

    Args:
        fn: maps a pytree of tensors (dict, tuple, list) with the structure of ``primals`` to a real scalar
            tensor; with ``has_aux``, to ``(scalar, aux)``.
        primals: the pytree ``θ`` at which to estimate the gradient.
        num_directions: K, the number of tangents averaged.
        tangents: sampler name (see :mod:`fwdgrad.tangents`).
        generator: source of randomness; the same state gives the same estimate bit for bit.
        chunk_size: at most this many directions are evaluated at once (bounds memory).
        has_aux: ``fn`` returns ``(scalar, aux)``; aux is returned as well.

    Returns:
        ``(value, grad_estimate)`` or ``(value, grad_estimate, aux)``; ``grad_estimate`` has the structure
        of ``primals``.

    Example:
        >>> import torch, fwdgrad
        >>> g = torch.Generator().manual_seed(0)
        >>> theta = {"w": torch.tensor([1.0, 2.0])}
        >>> value, est = fwdgrad.forward_grad(lambda p: (p["w"] ** 2).sum(), theta, generator=g)
        >>> float(value), tuple(est["w"].shape)
        (5.0, (2,))
    """
    where = "fwdgrad.forward_grad"
    check_positive_int(where, "num_directions", num_directions)
    check_positive_int(where, "chunk_size", chunk_size, allow_none=True)
    check_sampler_name(where, tangents)
    if not callable(fn):
        raise TypeError(f"{where}: fn must be callable, got {type(fn).__name__}")
    flat, spec = tree_flatten(primals)
    if not flat or not all(isinstance(p, Tensor) for p in flat):
        raise TypeError(f"{where}: primals must be a non-empty pytree of tensors, got {primals!r:.80}")
    if not all(p.dtype.is_floating_point for p in flat):
        raise TypeError(f"{where}: primals must be floating-point tensors, got {[p.dtype for p in flat]}")
    flat = [p.detach() for p in flat]
    tangent_list = SAMPLERS[tangents](flat, num_directions, generator)

    def f(xs: list[Tensor]) -> Any:
        return fn(tree_unflatten(xs, spec))

    with explain_forward_ad_errors(where):
        value, dirs, aux = directional_derivatives(
            f, flat, tangent_list, chunk_size=chunk_size, has_aux=has_aux, where=where
        )
    estimate = tree_unflatten(combine(dirs, tangent_list), spec)
    return (value, estimate, aux) if has_aux else (value, estimate)
