"""The estimator contract and the registry of estimators by name.

Every estimator is called as ``loss = est(model, loss_fn)``: it evaluates ``loss_fn(model)``, forms an
estimate of the gradient of that loss with respect to every parameter with ``requires_grad``, and
*accumulates* it into ``p.grad`` exactly as ``loss.backward()`` would. So ``zero_grad``, gradient
accumulation, clipping, every ``torch.optim`` optimizer and every LR scheduler work unchanged.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from fwdgrad.errors import NonFiniteError

Tensor = torch.Tensor
LossFn = Callable[[nn.Module], Tensor]


def trainable_parameters(where: str, model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for every parameter with ``requires_grad`` (shared parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{where}: model {type(model).__name__} has no parameter with requires_grad=True")
    return params


def call_with_parameters(model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor]) -> Any:
    """``loss_fn(model)`` with the named parameters replaced by ``params`` (dual or batched tensors), via
    ``torch.func.functional_call``; the module's own parameters are restored afterwards."""
    return functional_call(_LossOf(model, loss_fn), {"model." + n: t for n, t in params.items()}, ())


class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> Any:
        return self.loss_fn(self.model)


class Estimator(abc.ABC):
    """Base class: subclasses implement :meth:`estimate`; :meth:`__call__` checks and writes ``.grad``.

    Attributes:
        name: the registry name (set by :func:`register_estimator`).
        per_example_loss: ``True`` for estimators whose ``loss_fn`` may return a vector of per-example
            losses (the loss is then its mean); training loops use it to choose ``reduction="none"``.

    A loss or estimate that is NaN or infinite raises :class:`fwdgrad.NonFiniteError` and leaves every
    ``.grad`` untouched.
    """

    name: ClassVar[str] = ""
    per_example_loss: ClassVar[bool] = False

    def __call__(self, model: nn.Module, loss_fn: LossFn) -> Tensor:
        where = f"{type(self).__name__}.__call__"
        if not callable(loss_fn):
            raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
        params = trainable_parameters(where, model)
        loss, grads = self.estimate(model, loss_fn, params)
        self._accumulate(where, loss, params, grads)
        return loss.detach()

    @abc.abstractmethod
    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, {name: gradient estimate})`` without touching ``.grad``."""

    @staticmethod
    def _accumulate(where: str, loss: Tensor, params: dict[str, nn.Parameter], grads: dict[str, Tensor]) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteError(f"{where}: the loss is {loss.item()}; no gradient was written")
        # A sum is NaN or infinite whenever one of its terms is, so one sum per tensor clears the common
        # case; only a tensor whose sum is not finite (a bad entry, or an overflow) gets the entry-wise test,
        # which costs about as much as drawing Gaussian tangents.
        suspects = [n for n, g in grads.items() if not torch.isfinite(g.sum())]
        bad = [n for n in suspects if not torch.isfinite(grads[n]).all()]
        if bad:
            raise NonFiniteError(f"{where}: the estimate for {bad[:3]} is not finite; no gradient was written")
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n]
                if p.grad is None:
                    p.grad = g.detach().to(p.dtype)
                else:
                    p.grad.add_(g)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


_REGISTRY: dict[str, type[Estimator]] = {}


def register_estimator(name: str, cls: type[Estimator] | None = None) -> Any:
    """Register ``cls`` under ``name`` (usable as a decorator). A taken name raises ``ValueError``."""

    def add(c: type[Estimator]) -> type[Estimator]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"fwdgrad.register_estimator: name must be a non-empty str, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(
                f"fwdgrad.register_estimator: name {name!r} is taken by {_REGISTRY[name].__name__}"
            )
        if not (isinstance(c, type) and issubclass(c, Estimator)):
            raise TypeError(f"fwdgrad.register_estimator: {c!r} is not a subclass of fwdgrad.Estimator")
        _REGISTRY[name] = c
        if not c.__dict__.get("name"):
            c.name = name
        return c

    return add if cls is None else add(cls)


def available_estimators() -> list[str]:
    """The registered estimator names, sorted."""
    return sorted(_REGISTRY)


def estimator_class(name: str) -> type[Estimator]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"fwdgrad.estimator: unknown estimator {name!r}; available: {available_estimators()}")
    return _REGISTRY[name]


def estimator(name: str, **kwargs: Any) -> Estimator:
    """Build the estimator registered as ``name`` with ``kwargs``.

    Example:
        >>> import fwdgrad
        >>> fwdgrad.estimator("fg-w", num_directions=4, tangents="rademacher", seed=0)
        ForwardGradient(num_directions=4, tangents='rademacher', chunk_size=None)
    """
    return estimator_class(name)(**kwargs)
