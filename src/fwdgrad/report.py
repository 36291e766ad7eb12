"""Kept import path: the reports moved to :mod:`fwdgrad.training.report` (re-exported here); the atomic
writer is :func:`fwdgrad._io.write_atomic`."""

from fwdgrad._io import write_atomic  # noqa: F401
from fwdgrad.training.report import *  # noqa: F403
