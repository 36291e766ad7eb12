"""Estimators for recurrent models (the sequence protocol of :mod:`fwdgrad.derivatives.through_time`).

=================== ========================================================================================
name                what
=================== ========================================================================================
``online-fg``       online forward mode through time (Silver et al. 2022): one direction, the state's tangent
                    carried with the state; ``window=K`` keeps the derivative through the last ``K`` steps
                    (windows start at 0, K, 2K, ...; the state drops its tangent at each start). No backward.
``forward-exact``   the exact gradient propagated forward in time for models with diagonal recurrence
                    (``lif``; HYPR, Baronig et al. 2025); ``chunk=C`` for the subsequence-parallel variant.
``bp-tbptt``        the ``bp`` estimator under a sequence-model recipe: backprop through time; ``window=K``
                    (also ``bp:window=K``) gives truncated BPTT over the last ``K`` steps (steps before run
                    without autograd history: memory ∝ ``K``); ``window=None`` is full BPTT.
=================== ========================================================================================

The training loop's loss reads the model's output at the end (``F.cross_entropy(m(x), y)``), so each
estimator hands ``loss_fn`` a stand-in for the model that runs the sequence its way. With a loss at the end,
an update every ``K`` steps of online forward mode has a non-zero derivative in the last window only, so one
update per sequence with the last window's derivative is the same thing; per-step losses with updates after
every window are :func:`fwdgrad.derivatives.through_time.online_forward_gradient`'s job.

Example:
    >>> import torch, fwdgrad
    >>> import torch.nn.functional as F
    >>> from fwdgrad.models import build_model
    >>> model = build_model("gru", (6, 3), 4, hidden=5)
    >>> x, y = torch.randn(2, 6, 3), torch.tensor([0, 3])
    >>> est = fwdgrad.estimator("online-fg", window=3, seed=0)
    >>> loss = est(model, lambda m: F.cross_entropy(m(x), y))
    >>> model.cell.weight_ih.grad.shape
    torch.Size([15, 3])
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad._validation import check_real_scalar
from fwdgrad.derivatives.diagonal_recurrence import forward_exact_gradient
from fwdgrad.derivatives.rules import global_hooks_active, has_hidden_behaviour
from fwdgrad.derivatives.through_time import (
    WindowedSequence,
    check_diagonal_model,
    check_sequence_model,
    check_window,
)
from fwdgrad.directions import sample_tangents
from fwdgrad.estimators.backprop import BP_LR, Backprop
from fwdgrad.estimators.base import Estimator, LossFn, SampledEstimator, call_with_parameters
from fwdgrad.estimators.forward_gradient import FG_W_LR
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

__all__ = ["ForwardExactGradient", "OnlineForwardGradient"]


class OnlineForwardGradient(SampledEstimator):
    """Online forward mode through time: ``ĝ = (1/K) Σ_k ⟨∇L_window, v_k⟩ v_k`` with the tangents carried forward.

    Args:
        window: steps per window (int >= 1) or ``None`` (the whole sequence: ``⟨∇L, v⟩ v``, the forward
            gradient of the sequence loss).
        num_directions: ``K`` directions, one forward pass each.
        tangents: sampler name (``gaussian``, ``rademacher``, ...).
        seed, generator: the randomness of the directions (at most one).

    Memory: the state and its tangent, not the sequence (no autograd graph is recorded).
    """

    def __init__(
        self,
        window: int | None = None,
        num_directions: int = 1,
        tangents: str = "gaussian",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_directions, tangents, seed=seed, generator=generator)
        self.window = check_window("OnlineForwardGradient", window)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        check_sequence_model(where, model)
        primals = [p.detach() for p in params.values()]
        grads = {n: torch.zeros_like(p) for n, p in zip(params, primals)}
        loss_out: Tensor | None = None
        for _ in range(self.num_directions):
            vs = [t[0] for t in sample_tangents(self.tangents, primals, 1, self._generator)]
            with torch.no_grad(), fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, v) for n, p, v in zip(params, primals, vs)}
                loss = call_with_parameters(model, lambda m: loss_fn(WindowedSequence(m, self.window)), duals)
                check_real_scalar(where, loss)
                primal, tangent = fwAD.unpack_dual(loss)
                deriv = torch.zeros_like(primal) if tangent is None else tangent.clone()
                if loss_out is None:
                    loss_out = primal.clone()
            for n, v in zip(params, vs):
                grads[n].add_(deriv * v, alpha=1.0 / self.num_directions)
        assert loss_out is not None
        return loss_out, grads


class ForwardExactGradient(Estimator):
    """The exact gradient, propagated forward in time, for a model with diagonal recurrence (e.g. ``lif``).

    Args:
        chunk: ``None``: traces updated step by step; ``C``: the subsequence-parallel variant (HYPR) over
            subsequences of ``C`` steps. Both give the BPTT gradient (with the same surrogate) to rounding.

    See :func:`fwdgrad.derivatives.diagonal_recurrence.forward_exact_gradient`.
    """

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = check_window("ForwardExactGradient", chunk, "chunk")

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        check_diagonal_model(where, model)
        hooked = [n for n, m in model.cell.named_modules() if has_hidden_behaviour(m)]
        if hooked or global_hooks_active():
            seen = f"the hooks or instance forward of cell.{hooked[0]}".rstrip(".") if hooked else "global module hooks"
            raise ValueError(f"{where}: forward-exact computes the cell by its DiagonalCell rule, which cannot see "
                             f"{seen}; remove them or use bp-tbptt")
        return forward_exact_gradient(model, loss_fn, chunk=self.chunk)


# Default learning rates: online-fg borrows fg-w's (a forward gradient), the exact methods bp's; not swept on
# these models.
_FG_LR, _BP_LR = FG_W_LR, BP_LR
_NOTE = "not swept for recurrent models: the {} default"
# Claims checked by tests/test_generic.py on a tiny gru (needs="sequence-model") or lif ("diagonal-recurrence");
# exactness against BPTT and the absence of a backward pass are tested in tests/test_recurrent.py.
register_estimator(
    "online-fg", OnlineForwardGradient, default_lr=_FG_LR, lr_note=_NOTE.format("fg-w"),
    claims=("unbiased", "grad", "fused"), needs="sequence-model", lr_scales_with="parameters",
)  # fmt: skip
register_estimator(
    "forward-exact", ForwardExactGradient, default_lr=_BP_LR, lr_note=_NOTE.format("bp"),
    claims=("grad", "fused"), needs="diagonal-recurrence",
)  # fmt: skip
register_estimator(  # bp's own class: bp:window=K is the same estimator
    "bp-tbptt", Backprop, default_lr=_BP_LR, lr_note=_NOTE.format("bp"),
    claims=("grad", "fused"), needs="sequence-model",
)  # fmt: skip
