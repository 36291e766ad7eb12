"""Weight perturbation: the forward gradient of Baydin et al. (2022), "Gradients without Backpropagation"."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fwdgrad.derivatives import module_directions
from fwdgrad.directions import TangentSource
from fwdgrad.estimators.base import LossFn, SampledEstimator
from fwdgrad.estimators.gradient import ImplicitGradient
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

#: Default learning rates of fg-w, by optimizer: chosen by validation accuracy on the default task (MNIST-1D,
#: mlp width 256 depth 2, batch 128, 50-60 epochs, SGD momentum 0.9 or Adam); sweeps in docs/cli.md.
FG_W_LR = {"sgd": 1e-4, "adam": 1e-3}


class ForwardGradient(SampledEstimator):
    r"""Forward gradient with weight perturbation (FG-W).

    For the trainable parameters ``θ`` (all of them, flattened, ``n`` entries) and K tangents ``v_k``:

    .. math:: \hat g = \frac1K \sum_k \langle \nabla_\theta L(\theta), v_k\rangle\, v_k

    Each ``⟨∇L, v_k⟩`` is a forward-mode JVP through ``loss_fn(model)``; no backward pass runs and no
    activation is kept for one. ``E[ĝ] = ∇L``; the variance grows with ``n`` (see
    :func:`fwdgrad.variance_factor`), so forward gradients want smaller learning rates than backprop.

    Args:
        num_directions: K, tangents averaged per call.
        tangents: sampler name, see :mod:`fwdgrad.directions`.
        seed: seed of a private ``torch.Generator`` (exclusive with ``generator``).
        generator: the generator to draw from; ``None`` with no seed uses torch's global RNG.
        chunk_size: at most this many directions per forward pass (bounds memory).
        fast_paths: use the per-module passes of :mod:`fwdgrad.derivatives`; ``False`` forces the reference
            path. Both draw the same tangents and give the same estimate up to rounding.

    A step yields an implicit gradient (the loss, the K directional derivatives and the tangent source), so
    :meth:`sgd_step` updates the parameters tensor by tensor from regenerated tangents without forming
    ``ĝ``. Speed and memory: ``docs/performance.md``.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> est = fwdgrad.estimator("fg-w", num_directions=4, seed=0)
        >>> loss = est(model, lambda m: F.cross_entropy(m(x), y))
        >>> model.weight.grad.shape
        torch.Size([2, 4])
    """

    batches_directions: ClassVar[bool] = True

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
        super().__init__(num_directions, tangents, seed=seed, generator=generator, chunk_size=chunk_size)
        if not isinstance(fast_paths, bool):
            raise TypeError(f"{type(self).__name__}: fast_paths must be a bool, got {fast_paths!r}")
        self._fast_paths = fast_paths  # private: the repr shows the estimator's hyperparameters only

    @property
    def fast_paths(self) -> bool:
        """Whether the per-module passes are used (``False``: the reference path)."""
        return self._fast_paths

    def step(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], *, lean: bool = False
    ) -> ImplicitGradient:
        where = f"{type(self).__name__}.{'sgd_step' if lean else '__call__'}"
        primals = [p.detach() for p in params.values()]
        source = TangentSource(self.tangents, primals, self.num_directions, self._generator,
                               lean=lean and TangentSource.lean_possible(self.tangents))
        loss, dirs = module_directions(
            model, loss_fn, params, source, where=where, chunk_size=self.chunk_size, fast=self.fast_paths
        )
        return ImplicitGradient(loss, dirs, source)


register_estimator(
    "fg-w", ForwardGradient, default_lr=FG_W_LR, claims=("exact", "unbiased", "no-backward", "grad", "fused")
)
