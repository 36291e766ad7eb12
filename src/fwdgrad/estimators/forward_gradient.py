"""Weight perturbation: the forward gradient of Baydin et al. (2022), "Gradients without Backpropagation"."""

from __future__ import annotations

import torch
from torch import nn

from fwdgrad._validation import check_positive_int, check_real_scalar, make_generator
from fwdgrad.errors import explain_forward_ad_errors
from fwdgrad.estimators.base import Estimator, LossFn, call_with_parameters, register_estimator
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
    ) -> None:
        where = f"{type(self).__name__}"
        check_positive_int(where, "num_directions", num_directions)
        check_positive_int(where, "chunk_size", chunk_size, allow_none=True)
        check_sampler_name(where, tangents)
        self.num_directions = num_directions
        self.tangents = tangents
        self.chunk_size = chunk_size
        self._generator = make_generator(where, seed, generator)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        names = list(params)
        primals = [p.detach() for p in params.values()]
        tangents = SAMPLERS[self.tangents](primals, self.num_directions, self._generator)

        def f(xs: list[Tensor]) -> Tensor:
            return check_real_scalar(where, call_with_parameters(model, loss_fn, dict(zip(names, xs))))

        with explain_forward_ad_errors(where, model):
            value, dirs, _ = directional_derivatives(f, primals, tangents, chunk_size=self.chunk_size, where=where)
        return value, dict(zip(names, combine(dirs, tangents)))
