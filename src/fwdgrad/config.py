"""Kept import path: the run configuration moved to :mod:`fwdgrad.training.config` (re-exported here)."""

from fwdgrad.training.config import *  # noqa: F403
from fwdgrad.training.config import CONFIG_FIELDS, MethodSpec, RunConfig  # noqa: F401  (the names most used)
