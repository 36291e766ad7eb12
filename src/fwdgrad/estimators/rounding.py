r"""Writing an update into half-precision weights: round to nearest, or stochastically.

An update ``θ ← θ − Δ`` stored in bfloat16 (8 significant bits) is lost entirely on every entry where
``|Δ| < ulp(θ)/2 ≈ 2⁻⁹·|θ|``: at ``|θ| = 0.1`` every update below ``2·10⁻⁴``. Zeroth-order steps are small
(MeZO's learning rates are 1e-6 to 1e-7), so with round-to-nearest most of them vanish (``docs/precision.md``
measures how many). *Stochastic rounding* (Gupta et al. 2015, "Deep Learning with Limited Numerical
Precision") rounds ``x`` to one of its two neighbours ``lo ≤ x ≤ hi`` in the dtype, up with probability
``(x − lo)/(hi − lo)``, so ``E[SR(x)] = x``: an update far below the resolution still moves ``θ`` on
average, by the right amount.

The value is formed in float32 and rounded entry by entry; the uniforms come from one seed per tensor
(``torch.Generator`` on the tensor's device), so the same seed gives the same weights.

Example:
    >>> import torch
    >>> w = torch.ones(10_000, dtype=torch.bfloat16)
    >>> stochastic_round_(w, torch.full((10_000,), 1.0 + 2.0**-9), seed=0)   # a quarter of an ulp above 1
    >>> round(float(w.float().mean() - 1.0) / 2.0**-9, 1)                  # the mean moved by the update
    1.0
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: How an update is written into bfloat16 / float16 weights.
ROUNDINGS = ("nearest", "stochastic")


def check_rounding(where: str, rounding: object) -> str:
    """``ValueError`` naming ``rounding`` unless it is one of :data:`ROUNDINGS`."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{where}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return str(rounding)


def stochastic_round_(target: Tensor, value: Tensor, seed: int) -> None:
    r"""``target ← SR(value)`` in ``target``'s dtype: each entry of ``value`` (float32) goes to the neighbour
    above or below in that dtype, up with probability ``(x − lo)/(hi − lo)`` (unbiased), the uniforms drawn
    from a generator seeded with ``seed`` on ``target``'s device. Entries that are exact in the dtype, and
    non-finite ones, are written as round-to-nearest gives them.

    Shapes: ``value`` has ``target``'s shape. Temporaries: a few of that size."""
    nearest = value.to(target.dtype)
    back = nearest.to(value.dtype)
    away = torch.where(back > value, -torch.inf, torch.inf).to(target.dtype)
    other = torch.nextafter(nearest, away)
    gap = (other.to(value.dtype) - back).abs()
    p_other = ((value - back).abs() / gap).nan_to_num_(0.0)  # 0 where exact or not finite
    generator = torch.Generator(device=target.device).manual_seed(seed)
    u = torch.rand(value.shape, generator=generator, device=target.device, dtype=value.dtype)
    target.copy_(torch.where(u < p_other, other, nearest))
