"""Layer 1 — directions: where tangents come from.

Stateless samplers (:mod:`fwdgrad.directions.samplers`), the per-step :class:`TangentSource` that hands them
out tensor by tensor (kept, factored, or regenerated from per-tensor seeds), and stateful sources whose
directions depend on the past (:mod:`fwdgrad.directions.stateful`). Imports nothing from the layers above.
"""

from fwdgrad.directions import samplers as _samplers
from fwdgrad.directions.samplers import *  # noqa: F403
from fwdgrad.directions.source import PER_TENSOR_SAMPLERS, Direction, DirectionSource, TangentSource

__all__ = [*_samplers.__all__, "PER_TENSOR_SAMPLERS", "Direction", "DirectionSource", "TangentSource"]
