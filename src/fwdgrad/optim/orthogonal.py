r"""ODICE's orthogonal-gradient update (Mao, Xu, Zhang & Zhan, ICLR 2024).

In a Bellman residual such as ``(r + γV(s′) − V(s))²`` the gradient with respect to the value network has two
parts: the *forward* gradient ``g_f``, taken through ``V(s)`` (the current state), and the *backward*
gradient ``g_b``, taken through ``V(s′)`` (the next state). The true gradient is ``g_f + g_b``; when the two
point in conflicting directions, ``g_b`` cancels ``g_f``'s effect. ODICE keeps ``g_f`` and adds only the part
of ``g_b`` orthogonal to it:

.. math::

    g_b^{\perp} = g_b - \frac{\langle g_f, g_b\rangle}{\|g_f\|^2}\, g_f, \qquad
    g = g_f + \eta\, g_b^{\perp}

so ``⟨g_b^⊥, g_f⟩ = 0`` and the update never undoes the forward part. This "forward gradient" is a name for
a term of a semi-gradient; it has nothing to do with forward-mode automatic differentiation or with the
forward-gradient estimators of the rest of fwdgrad. See ``docs/odice.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fwdgrad._validation import check_number

Tensor = torch.Tensor


def orthogonal_gradient(
    g_forward: Tensor | Sequence[Tensor],
    g_backward: Tensor | Sequence[Tensor],
    eta: float = 1.0,
    eps: float = 1e-12,
) -> Tensor | list[Tensor]:
    """``g_f + η·(g_b − ⟨g_f, g_b⟩/‖g_f‖²·g_f)``, over one tensor or a list of tensors (one vector).

    Args:
        g_forward: the gradient through the current state's value, a tensor or a list of tensors.
        g_backward: the gradient through the next state's value, the same structure and shapes.
        eta: weight of the orthogonal part (the paper's η), a finite number >= 0.
        eps: when ``‖g_f‖² <= eps`` nothing is projected out (``g_b^⊥ = g_b``).

    Returns:
        The update, with the structure of ``g_forward``.

    Example:
        >>> import torch
        >>> from fwdgrad.optim import orthogonal_gradient
        >>> orthogonal_gradient(torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 2.0]))
        tensor([1., 2.])
    """
    where = "fwdgrad.optim.orthogonal_gradient"
    check_number(where, "eta", eta, bound=">= 0", say_finite=True)
    single = isinstance(g_forward, Tensor)
    if single != isinstance(g_backward, Tensor):
        raise TypeError(f"{where}: g_forward and g_backward must both be tensors or both be lists of tensors")
    gf = [g_forward] if single else list(g_forward)
    gb = [g_backward] if single else list(g_backward)
    if len(gf) != len(gb) or any(a.shape != b.shape for a, b in zip(gf, gb)):
        raise ValueError(f"{where}: shapes differ: {[tuple(a.shape) for a in gf]} vs {[tuple(b.shape) for b in gb]}")
    dot = sum((a * b).sum() for a, b in zip(gf, gb))
    sq = sum((a * a).sum() for a in gf)
    coef = torch.where(sq > eps, dot / torch.clamp(sq, min=eps), torch.zeros_like(sq))
    out = [a + eta * (b - coef * a) for a, b in zip(gf, gb)]
    return out[0] if single else out
