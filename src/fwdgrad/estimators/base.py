"""The estimator contract.

Every estimator is called as ``loss = est(model, loss_fn)``: it evaluates ``loss_fn(model)``, forms an
estimate of the gradient of that loss with respect to every parameter with ``requires_grad``, and
*accumulates* it into ``p.grad`` exactly as ``loss.backward()`` would. So ``zero_grad``, gradient
accumulation, clipping, every ``torch.optim`` optimizer and every LR scheduler work unchanged. The same
step can instead update the parameters in place without forming a gradient: ``est.sgd_step(model,
loss_fn, lr, weight_decay, momentum)``.

A subclass implements either :meth:`Estimator.step` (returning a :class:`~fwdgrad.estimators.gradient.
Gradient`, e.g. an implicit one whose directions can be regenerated) or the simpler
:meth:`Estimator.estimate` (``(loss, {name: gradient})``). :class:`SampledEstimator` is the shared base of
the estimators that draw random tangents: it validates ``num_directions``, ``tangents``, ``seed`` /
``generator`` and ``chunk_size`` once for all of them.

A ``torch.compile``'d model is run as its original module (:func:`eager_module`): forward-mode AD needs
eager execution; the parameters are the same objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from fwdgrad._validation import check_number, check_positive_int, make_generator
from fwdgrad.derivatives import call_with_parameters
from fwdgrad.directions import check_sampler_name
from fwdgrad.errors import explain_float16_overflow
from fwdgrad.estimators.gradient import ExplicitGradient, Gradient
from fwdgrad.estimators.state import bind_fused_momentum, load_state, state_of

Tensor = torch.Tensor
LossFn = Callable[[nn.Module], Tensor]

__all__ = ["Estimator", "LossFn", "SampledEstimator", "call_with_parameters", "eager_module", "trainable_parameters"]


def trainable_parameters(where: str, model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for every parameter with ``requires_grad`` (shared parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{where}: model {type(model).__name__} has no parameter with requires_grad=True")
    meta = next((n for n, p in params.items() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"{where}: parameter {meta!r} is on the meta device (shapes only, no values); "
                         "materialise the model first, e.g. model.to_empty(device='cpu') and initialise it")
    return params


def eager_module(model: Any) -> Any:
    """The module an estimator runs: for a ``torch.compile``'d model (``torch._dynamo``'s ``OptimizedModule``)
    its original module ``_orig_mod``, else ``model`` itself.

    Forward-mode AD with dual tensors and fwdgrad's per-module passes (hooks and parameter swaps inside the
    forward) run eagerly; Dynamo cannot trace them. The original module holds the very same ``nn.Parameter``
    objects, so ``.grad`` and in-place updates reach the compiled model, which stays compiled for the
    user's own calls.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> eager_module(torch.compile(lin)) is lin
        True
    """
    while type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo"):
        model = model._orig_mod
    return model


def check_rate(where: str, name: str, value: object, *, strictly_positive: bool, below_one: bool = False) -> float:
    """A step's rate (lr, weight decay, momentum) checked by :func:`fwdgrad._validation.check_number`."""
    bound = "in [0, 1)" if below_one else ("> 0" if strictly_positive else ">= 0")
    return check_number(where, name, value, bound=bound)


class Estimator:
    """Base class of every estimator; see the module docstring.

    Attributes:
        name: the registry name it was built under (``""`` when built directly from its class).
        per_example_loss: ``True`` for estimators whose ``loss_fn`` may return a vector of per-example
            losses (the loss is then its mean); training loops use it to choose ``reduction="none"``.

    A loss or estimate that is NaN or infinite raises :class:`fwdgrad.NonFiniteError` and leaves every
    ``.grad`` (and, for :meth:`sgd_step`, every parameter) untouched.
    """

    per_example_loss: ClassVar[bool] = False
    _name: str = ""
    #: attributes that :meth:`_extra_state` carries or that the next step rebuilds (not reported as unsaved)
    _state_attributes: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return self._name

    def __call__(self, model: nn.Module, loss_fn: LossFn) -> Tensor:
        where = f"{type(self).__name__}.__call__"
        model = eager_module(model)
        params = self._checked(where, model, loss_fn)
        with explain_float16_overflow(params.values()):
            return self._step_into_grad(where, model, loss_fn, params)

    def _step_into_grad(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> Tensor:
        """One step added into ``.grad``; returns the detached loss (a subclass may form the step in place)."""
        grad = self.step(model, loss_fn, params)
        grad.accumulate(where, list(params.values()), list(params))
        return grad.loss.detach()

    def step(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], *, lean: bool = False
    ) -> Gradient:
        """One step's estimate, not yet written anywhere. ``lean``: the consumer is a fused update, so an
        implicit gradient need not keep its tangents. The default wraps :meth:`estimate`."""
        loss, grads = self.estimate(model, loss_fn, params)
        return ExplicitGradient(loss, [grads[n] for n in params])

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, {name: gradient estimate})`` without touching ``.grad``; subclasses implement this or
        :meth:`step`."""
        if type(self).step is Estimator.step:
            raise NotImplementedError(f"{type(self).__name__} implements neither step nor estimate")
        grad = self.step(model, loss_fn, params)
        return grad.loss, {n: grad.tensor(i) for i, n in enumerate(params)}

    def sgd_step(
        self, model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
    ) -> Tensor:
        r"""One fused SGD step, ``b ← μ·b + ĝ + wd·θ``, ``θ ← θ − lr·b`` (``b = ĝ + wd·θ`` when ``μ = 0``),
        tensor by tensor; ``.grad`` is not touched.

        For the same seed the result equals ``est(model, loss_fn)`` followed by ``torch.optim.SGD(params, lr,
        momentum=momentum, weight_decay=weight_decay).step()``, up to rounding. For an estimator whose
        directions can be regenerated (``fg-w`` with ``gaussian``/``rademacher``/``rank1`` tangents) and
        ``momentum=0``, no gradient and no model-sized tangent is ever allocated: each tensor's tangent is
        drawn again from its seed as it is updated (the MeZO trick). The momentum buffers live in the
        estimator (one per parameter, like the optimizer's).

        Returns:
            The detached loss before the update. A non-finite loss or estimate raises
            :class:`fwdgrad.NonFiniteError` and leaves every parameter untouched.

        Example:
            >>> import torch, torch.nn.functional as F, fwdgrad
            >>> model = torch.nn.Linear(4, 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> est = fwdgrad.estimator("fg-w", tangents="rank1", seed=0)
            >>> loss = est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.01, momentum=0.9)
            >>> model.weight.grad is None
            True
        """
        where = f"{type(self).__name__}.sgd_step"
        lr = check_rate(where, "lr", lr, strictly_positive=True)
        weight_decay = check_rate(where, "weight_decay", weight_decay, strictly_positive=False)
        momentum = check_rate(where, "momentum", momentum, strictly_positive=False, below_one=True)
        model = eager_module(model)
        params = self._checked(where, model, loss_fn)
        with explain_float16_overflow(params.values()):
            grad = self.step(model, loss_fn, params, lean=True)
            buffers = bind_fused_momentum(self, list(params.values())) if momentum else None
            grad.sgd_(where, list(params.values()), lr, weight_decay, momentum, buffers)
        torch.clear_autocast_cache()  # a forward later in this autocast region must see the new weights
        return grad.loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state between steps as a plain dict of tensors, ints, strings and lists: its
        private generator, :meth:`sgd_step`'s momentum buffers and the recipe's own state (momentum
        directions, feedback matrices, fixed guesses); safe for ``torch.save`` and ``torch.load(...,
        weights_only=True)``. The format: :mod:`fwdgrad.estimators.state`.

        Restored into a fresh estimator of the same recipe (:meth:`load_state_dict`) together with the model
        and the optimizer, the next steps are the ones the uninterrupted run takes, bit for bit."""
        return state_of(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state of another format raises ``ValueError``); state bound to
        parameters binds again at the next step, in the parameters' dtype and on their device."""
        load_state(self, state)

    def _extra_state(self) -> dict[str, Any] | None:
        """The recipe's own state for :meth:`state_dict` (``None``: it keeps none); subclasses extend it."""
        return None

    def _load_extra_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: this estimator keeps no state of its own, "
                             "got one")

    @staticmethod
    def _checked(where: str, model: nn.Module, loss_fn: Any) -> dict[str, nn.Parameter]:
        if not callable(loss_fn):
            raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
        return trainable_parameters(where, model)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class SampledEstimator(Estimator):
    """The shared base of estimators that average K random directions.

    Args:
        num_directions: K, directions averaged per call (``int >= 1``).
        tangents: sampler name of :mod:`fwdgrad.directions`.
        seed: seed of a private ``torch.Generator`` (exclusive with ``generator``), ``0 <= seed < 2**63``.
        generator: the generator to draw from; ``None`` with no seed uses torch's global RNG.
        chunk_size: at most this many directions per pass, for the estimators that batch them (keyword
            ``batches_directions = True``); others do not take it.
    """

    batches_directions: ClassVar[bool] = False

    def __init__(
        self, num_directions: int = 1, tangents: str = "gaussian", *, seed: int | None = None,
        generator: torch.Generator | None = None, chunk_size: int | None = None,
    ) -> None:
        where = type(self).__name__
        check_positive_int(where, "num_directions", num_directions)
        check_sampler_name(where, tangents)
        self.num_directions = num_directions
        self.tangents = tangents
        if self.batches_directions:
            check_positive_int(where, "chunk_size", chunk_size, allow_none=True)
            self.chunk_size = chunk_size
        self._generator = make_generator(where, seed, generator)

    def average(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Divide sums over the K directions by K, in place."""
        if self.num_directions > 1:
            for g in grads.values():
                g.div_(self.num_directions)
        return grads
