"""Layer 1 — directions: where tangents come from.

Stateless samplers (:mod:`fwdgrad.directions.samplers`), the per-step :class:`TangentSource` that hands them
out tensor by tensor (kept, factored, or regenerated from per-tensor seeds), and stateful sources whose
directions depend on the past (:mod:`fwdgrad.directions.stateful`). Imports nothing from the layers above.
"""

from fwdgrad.directions.samplers import (
    PARALLEL_DRAW_MIN,
    SAMPLERS,
    check_sampler_name,
    draw_tensor,
    gaussian,
    orthogonal,
    rademacher,
    rank1,
    rank1_factors,
    sample_tangents,
    scratch_generator,
    sphere,
    tensor_seeds,
    variance_factor,
)
from fwdgrad.directions.source import PER_TENSOR_SAMPLERS, Direction, TangentSource

__all__ = [
    "PARALLEL_DRAW_MIN",
    "PER_TENSOR_SAMPLERS",
    "SAMPLERS",
    "Direction",
    "TangentSource",
    "check_sampler_name",
    "draw_tensor",
    "gaussian",
    "orthogonal",
    "rademacher",
    "rank1",
    "rank1_factors",
    "sample_tangents",
    "scratch_generator",
    "sphere",
    "tensor_seeds",
    "variance_factor",
]
