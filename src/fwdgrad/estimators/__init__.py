"""Gradient estimators behind one contract, ``loss = est(model, loss_fn)``, and their registry."""

from fwdgrad.estimators.activity import ActivityForwardGradient
from fwdgrad.estimators.backprop import Backprop
from fwdgrad.estimators.base import (
    Estimator,
    available_estimators,
    estimator,
    estimator_class,
    register_estimator,
)
from fwdgrad.estimators.forward_gradient import ForwardGradient
from fwdgrad.estimators.local import (
    LocalActivityForwardGradient,
    LocalBackprop,
    LocalWeightForwardGradient,
)

__all__ = [
    "ActivityForwardGradient",
    "Backprop",
    "Estimator",
    "ForwardGradient",
    "LocalActivityForwardGradient",
    "LocalBackprop",
    "LocalWeightForwardGradient",
    "available_estimators",
    "estimator",
    "estimator_class",
    "register_estimator",
]
