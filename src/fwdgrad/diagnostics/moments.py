r"""Exact second moments of the weight-perturbed forward gradient, per parameter tensor.

For the true gradient ``a`` (``n`` entries in all, ``a_l`` the block of tensor ``l`` with ``n_l`` entries)
and one direction ``v`` with ``E[vvᵀ] = I``, the block ``g_l = (aᵀv)·v_l`` of ``g = (aᵀv)·v`` has

==============  =====================================================
sampler         ``m_l = E‖g_l‖²``
==============  =====================================================
``gaussian``    ``n_l‖a‖² + 2‖a_l‖²``   (fourth moment of N(0,1) is 3)
``rademacher``  ``n_l‖a‖²``              (``‖v_l‖² = n_l`` always)
``rank1``       ``n_l‖a‖²``              (entries ±1, uncorrelated)
``sphere``      ``n·(n_l‖a‖² + 2‖a_l‖²)/(n + 2)``
==============  =====================================================

and the mean of K independent directions has ``E‖ĝ_l‖² = ‖a_l‖² + (m_l − ‖a_l‖²)/K``. The ``orthogonal``
sampler draws its K directions jointly: ``ĝ = (n/K)·P a`` with ``P`` the projector on a uniformly random
K-dimensional subspace, and ``E[P a aᵀ P] = x·a aᵀ + y·‖a‖² I`` with ``y = K(n−K)/(n(n+2)(n−1))`` and
``x = K(K+2)/(n(n+2)) − y`` (from ``E[P₁₁] = K/n``, ``E[P₁₁²] = K(K+2)/(n(n+2))`` and invariance), so
``E‖ĝ_l‖² = (n/K)²·(x‖a_l‖² + y·n_l‖a‖²)``. Summed over the blocks every formula gives
``(1 + variance_factor)·‖a‖²`` of :func:`fwdgrad.variance_factor`.

Example:
    >>> from fwdgrad.diagnostics.moments import second_moments
    >>> m = second_moments("rademacher", {"w": (3, 4.0), "b": (1, 0.0)}, num_directions=1)
    >>> m["w"], m["b"]
    (12.0, 4.0)
"""

from __future__ import annotations

from collections.abc import Mapping

from fwdgrad.directions import check_sampler_name


def second_moments(
    tangents: str, blocks: Mapping[str, tuple[int, float]], num_directions: int = 1
) -> dict[str, float]:
    """``E‖ĝ_l‖²`` for every block ``l``, given ``blocks[l] = (n_l, ‖a_l‖²)``; K = ``num_directions``."""
    check_sampler_name("fwdgrad.diagnostics.second_moments", tangents)
    n = sum(nl for nl, _ in blocks.values())
    a2 = sum(al for _, al in blocks.values())
    k = num_directions
    out = {}
    for name, (nl, al) in blocks.items():
        if tangents == "orthogonal":
            if n == 1:
                out[name] = al
                continue
            y = k * (n - k) / (n * (n + 2) * (n - 1))
            x = k * (k + 2) / (n * (n + 2)) - y
            out[name] = (n / k) ** 2 * (x * al + y * nl * a2)
            continue
        if tangents == "gaussian":
            m = nl * a2 + 2 * al
        elif tangents == "sphere":
            m = n * (nl * a2 + 2 * al) / (n + 2)
        else:  # rademacher, rank1
            m = nl * a2
        out[name] = al + (m - al) / k
    return out
