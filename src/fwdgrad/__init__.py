"""fwdgrad: training neural networks without backpropagation, using forward gradients.

One estimator interface for the forward-gradient family on any ``torch.nn.Module``; estimates are
written to ``.grad`` so that every ``torch.optim`` optimizer and scheduler works.
"""

from fwdgrad.directions import sample_tangents, variance_factor
from fwdgrad.errors import ForwardADNotSupportedError, NonFiniteError
from fwdgrad.estimators import (
    ActivityForwardGradient,
    Backprop,
    Estimator,
    ForwardGradient,
    available_estimators,
    estimator,
    estimator_class,
    register_estimator,
)
from fwdgrad.functional import directional_derivatives, forward_grad

__version__ = "0.1.0"

__all__ = [
    "ActivityForwardGradient",
    "Backprop",
    "Estimator",
    "ForwardADNotSupportedError",
    "ForwardGradient",
    "NonFiniteError",
    "available_estimators",
    "directional_derivatives",
    "estimator",
    "estimator_class",
    "forward_grad",
    "register_estimator",
    "sample_tangents",
    "variance_factor",
]
