"""Layer 3 — estimators: recipes behind one contract, ``loss = est(model, loss_fn)``, and their registry.

A recipe is a direction source × a derivative backend × an aggregation, registered under a name with
preset options and default learning rates (:mod:`fwdgrad.estimators.registry`). A step yields a
:class:`~fwdgrad.estimators.gradient.Gradient` (implicit when its directions can be regenerated) with two
consumers: accumulate into ``.grad``, or a fused in-place ``sgd_step``.
"""

from fwdgrad.estimators import recurrent as _recurrent  # noqa: F401  (registers online-fg, forward-exact, bp-tbptt)
from fwdgrad.estimators.activity import ActivityForwardGradient
from fwdgrad.estimators.backprop import Backprop
from fwdgrad.estimators.base import Estimator, SampledEstimator
from fwdgrad.estimators.feedback import FeedbackAlignment  # noqa: F401
from fwdgrad.estimators.forward_gradient import ForwardGradient
from fwdgrad.estimators.gradient import ExplicitGradient, Gradient, ImplicitGradient
from fwdgrad.estimators.guess import GuessForwardGradient  # noqa: F401
from fwdgrad.estimators.local import (
    LocalActivityForwardGradient,
    LocalBackprop,
    LocalWeightForwardGradient,
)
from fwdgrad.estimators.registry import (
    Recipe,
    available_estimators,
    default_lr,
    estimator,
    estimator_class,
    estimator_options,
    recipe,
    register_estimator,
)
from fwdgrad.estimators.zeroth_order import ZerothOrder  # noqa: F401  (registers zo, zo-sign, zo-cons)

__all__ = [
    "ActivityForwardGradient",
    "Backprop",
    "Estimator",
    "ExplicitGradient",
    "ForwardGradient",
    "Gradient",
    "ImplicitGradient",
    "LocalActivityForwardGradient",
    "LocalBackprop",
    "LocalWeightForwardGradient",
    "Recipe",
    "SampledEstimator",
    "available_estimators",
    "default_lr",
    "estimator",
    "estimator_class",
    "estimator_options",
    "recipe",
    "register_estimator",
]
