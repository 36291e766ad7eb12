"""Estimator diagnostics (:func:`diagnose`, ``fwdgrad diagnose``) and the exact second moments they are
held against (:mod:`fwdgrad.diagnostics.moments`)."""

from fwdgrad.diagnostics.diagnose import diagnose, parse_methods
from fwdgrad.diagnostics.moments import second_moments
from fwdgrad.diagnostics.report import write_report

__all__ = ["diagnose", "parse_methods", "second_moments", "write_report"]
