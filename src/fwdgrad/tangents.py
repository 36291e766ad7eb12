"""Tangent samplers (kept import path): everything lives in :mod:`fwdgrad.directions.samplers`.

Example:
    >>> from fwdgrad.tangents import sample_tangents
    >>> from fwdgrad.directions import sample_tangents as same
    >>> sample_tangents is same
    True
"""

from fwdgrad.directions.samplers import *  # noqa: F403
from fwdgrad.directions.samplers import __all__  # noqa: F401
