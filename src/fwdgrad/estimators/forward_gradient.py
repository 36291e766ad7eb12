"""Weight perturbation: the forward gradient of Baydin et al. (2022), "Gradients without Backpropagation"."""

from __future__ import annotations

import math

import torch
from torch import nn

from fwdgrad import engine
from fwdgrad._validation import check_positive_int, check_real_scalar, make_generator
from fwdgrad.errors import NonFiniteError, explain_forward_ad_errors
from fwdgrad.estimators.base import (
    Estimator,
    LossFn,
    call_with_parameters,
    register_estimator,
    trainable_parameters,
)
from fwdgrad.functional import combine, directional_derivatives
from fwdgrad.tangents import SAMPLERS, check_sampler_name

Tensor = torch.Tensor


@register_estimator("fg-w")
class ForwardGradient(Estimator):
    r"""Forward gradient with weight perturbation (FG-W).

    For the trainable parameters ``θ`` (all of them, flattened, ``n`` entries) and K tangents ``v_k``:

    .. math:: \hat g = \frac1K \sum_k \langle \nabla_\theta L(\theta), v_k\rangle\, v_k

    Each ``⟨∇L, v_k⟩`` is a forward-mode JVP through ``loss_fn(model)``; no backward pass runs and no
    activation is kept for one. ``E[ĝ] = ∇L``; the variance grows with ``n`` (see
    :func:`fwdgrad.tangents.variance_factor`), so forward gradients want smaller learning rates than
    backprop.

    Args:
        num_directions: K, tangents averaged per call.
        tangents: sampler name, see :mod:`fwdgrad.tangents`.
        seed: seed of a private ``torch.Generator`` (exclusive with ``generator``).
        generator: the generator to draw from; ``None`` with no seed uses torch's global RNG.
        chunk_size: at most this many directions per forward pass (bounds memory).
        fast_paths: use the tangent engine's fast passes (:mod:`fwdgrad.engine`); ``False`` forces the
            reference path. Both draw the same tangents and give the same estimate up to rounding.

    Speed and memory: with one direction, or with ``rank1`` tangents, a step runs the fast path of
    :mod:`fwdgrad.engine`: each parameter is dual only inside its own module's forward, and
    ``nn.Linear`` / ``nn.Conv2d`` form their output tangent themselves (rank-1: ``(x·v)·uᵀ``, no ``u vᵀ``
    is formed); rank-1 directions run ``chunk_size`` at a time in one batched pass. Other settings batch
    ``chunk_size`` directions in one ``vmap(jvp)`` pass over ``functional_call``. :meth:`sgd_step` updates
    the parameters tensor by tensor without forming a gradient. See ``docs/performance.md``.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> est = fwdgrad.estimator("fg-w", num_directions=4, seed=0)
        >>> loss = est(model, lambda m: F.cross_entropy(m(x), y))
        >>> model.weight.grad.shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_directions: int = 1,
        tangents: str = "gaussian",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        fast_paths: bool = True,
    ) -> None:
        where = f"{type(self).__name__}"
        check_positive_int(where, "num_directions", num_directions)
        check_positive_int(where, "chunk_size", chunk_size, allow_none=True)
        check_sampler_name(where, tangents)
        if not isinstance(fast_paths, bool):
            raise TypeError(f"{where}: fast_paths must be a bool, got {fast_paths!r}")
        self.num_directions = num_directions
        self.tangents = tangents
        self.chunk_size = chunk_size
        self._fast_paths = fast_paths  # private: the repr shows the estimator's hyperparameters only
        self._generator = make_generator(where, seed, generator)

    @property
    def fast_paths(self) -> bool:
        """Whether the tangent engine's fast passes are used (``False``: the reference path)."""
        return self._fast_paths

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        names = list(params)
        primals = [p.detach() for p in params.values()]
        if self.fast_paths and engine.uses_fast_loop(self.tangents, self.num_directions):
            source = engine.TangentSource(self.tangents, primals, self.num_directions, self._generator)
            with explain_forward_ad_errors(where, model):
                loss, dirs = engine.step_directions(
                    model, loss_fn, params, source, chunk_size=self.chunk_size, where=where, fast=True
                )
            return loss, dict(zip(names, engine.estimate_from_directions(source, dirs)))
        tangents = SAMPLERS[self.tangents](primals, self.num_directions, self._generator)

        def f(xs: list[Tensor]) -> Tensor:
            return check_real_scalar(where, call_with_parameters(model, loss_fn, dict(zip(names, xs))))

        with explain_forward_ad_errors(where, model):
            value, dirs, _ = directional_derivatives(f, primals, tangents, chunk_size=self.chunk_size, where=where)
        return value, dict(zip(names, combine(dirs, tangents)))

    def sgd_step(self, model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float = 0.0) -> Tensor:
        r"""One fused SGD step, ``θ ← θ − lr·(ĝ + wd·θ)``, tensor by tensor, without forming ``ĝ``.

        The pass gives the loss and the K directional derivatives ``d_k``; then each parameter is updated
        in place, ``θ_i ← (1 − lr·wd)·θ_i − (lr/K) Σ_k d_k v_{ik}``, with its tangents drawn again from the
        generator state recorded before them (rank-1: the factors, one ``addmm_``). With ``gaussian`` or
        ``rademacher`` tangents and K = 1, or ``rank1`` and any K, no gradient and no model-sized tangent
        is ever allocated (the MeZO trick, applied to forward gradients); other settings materialise the
        tangents for the pass, as :meth:`__call__` does. ``.grad`` is not touched.

        For the same seed the result equals ``est(model, loss_fn)`` followed by
        ``torch.optim.SGD(params, lr, weight_decay=weight_decay).step()``, up to rounding.

        Args:
            model: the module to update in place.
            loss_fn: ``loss_fn(model)`` returns the real scalar loss.
            lr: learning rate, > 0.
            weight_decay: L2 coefficient, >= 0 (as in ``torch.optim.SGD``).

        Returns:
            The detached loss before the update. A non-finite loss or directional derivative raises
            :class:`fwdgrad.NonFiniteError` and leaves every parameter untouched.

        Example:
            >>> import torch, torch.nn.functional as F, fwdgrad
            >>> model = torch.nn.Linear(4, 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> est = fwdgrad.ForwardGradient(tangents="rank1", seed=0)
            >>> loss = est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.01)
            >>> model.weight.grad is None
            True
        """
        where = f"{type(self).__name__}.sgd_step"
        _check_rate(where, "lr", lr, strictly_positive=True)
        _check_rate(where, "weight_decay", weight_decay, strictly_positive=False)
        if not callable(loss_fn):
            raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
        params = trainable_parameters(where, model)
        lr, weight_decay = float(lr), float(weight_decay)
        if self.tangents not in engine.PER_TENSOR_SAMPLERS:
            loss, grads = self.estimate(model, loss_fn, params)
            _check_finite(where, loss, list(grads.values()))
            with torch.no_grad():
                for n, p in params.items():
                    p.mul_(1.0 - lr * weight_decay).sub_(grads[n], alpha=lr)
            return loss.detach()
        primals = [p.detach() for p in params.values()]
        source = engine.TangentSource(self.tangents, primals, self.num_directions, self._generator, lean=True)
        with explain_forward_ad_errors(where, model):
            loss, dirs = engine.step_directions(
                model, loss_fn, params, source, chunk_size=self.chunk_size, where=where, fast=self.fast_paths
            )
        _check_finite(where, loss, [dirs])
        engine.apply_sgd(source, list(params.values()), dirs, lr, weight_decay)
        return loss.detach()


def _check_rate(where: str, name: str, value: object, *, strictly_positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{where}: {name} must be {'> 0' if strictly_positive else '>= 0'}, got {value!r}")


def _check_finite(where: str, loss: Tensor, tensors: list[Tensor]) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(f"{where}: the loss is {loss.item()}; no parameter was updated")
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"{where}: the estimate is not finite; no parameter was updated")
