"""Tangent samplers (kept import path): everything lives in :mod:`fwdgrad.directions.samplers`.

Example:
    >>> from fwdgrad.tangents import sample_tangents
    >>> from fwdgrad.directions import sample_tangents as same
    >>> sample_tangents is same
    True
"""

from fwdgrad.directions.samplers import (  # noqa: F401
    PARALLEL_DRAW_MIN,
    SAMPLERS,
    Sampler,
    check_sampler_name,
    draw_tensor,
    gaussian,
    orthogonal,
    rademacher,
    rank1,
    rank1_factors,
    sample_tangents,
    sphere,
    tensor_seeds,
    variance_factor,
)
