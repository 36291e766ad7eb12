r"""The functional core: forward gradients of a function of a pytree of tensors.

For ``f: R^n -> R`` and tangents ``v_1 … v_K`` with ``E[v vᵀ] = I``, the forward gradient is

.. math:: \hat g = \frac1K \sum_{k=1}^K \langle \nabla f(\theta), v_k\rangle\, v_k,

where each directional derivative ``⟨∇f, v_k⟩`` is one forward-mode Jacobian-vector product (JVP). No
backward pass runs and no activation is stored for one. This module works on any function of a pytree of
tensors; the estimators of :mod:`fwdgrad.estimators` do the same for an ``nn.Module`` and a loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fwdgrad._validation import check_positive_int
from fwdgrad.derivatives.reference import directional_derivatives
from fwdgrad.directions import SAMPLERS, check_sampler_name
from fwdgrad.errors import explain_forward_ad_errors

Tensor = torch.Tensor

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
        tangents: sampler name (see :mod:`fwdgrad.directions.samplers`).
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


__all__ = ["combine", "directional_derivatives", "forward_grad"]
