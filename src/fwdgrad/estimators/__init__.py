"""Gradient estimators behind one contract, ``loss = est(model, loss_fn)``, and their registry."""

from fwdgrad.estimators.backprop import Backprop
from fwdgrad.estimators.base import (
    Estimator,
    available_estimators,
    estimator,
    estimator_class,
    register_estimator,
)
from fwdgrad.estimators.forward_gradient import ForwardGradient

__all__ = [
    "Backprop",
    "Estimator",
    "ForwardGradient",
    "available_estimators",
    "estimator",
    "estimator_class",
    "register_estimator",
]
