"""Backprop behind the estimator interface, so that every comparison switches method by name."""

from __future__ import annotations

import torch
from torch import nn

from fwdgrad._validation import check_real_scalar
from fwdgrad.derivatives.through_time import WindowedSequence, check_sequence_model, check_window
from fwdgrad.estimators.base import Estimator, LossFn
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

#: Default learning rates of bp, by optimizer (MNIST-1D mlp sweeps, docs/cli.md).
BP_LR = {"sgd": 0.1, "adam": 3e-3}


class Backprop(Estimator):
    """The exact gradient by reverse-mode autograd (one backward pass): the baseline of every benchmark.

    On a sequence model (:class:`fwdgrad.derivatives.through_time.SequenceModel`) it is full backprop through
    time; ``window=K`` truncates it to the last ``K`` steps (the steps before run without autograd history,
    so memory grows with ``K``, not with the sequence length).

    Args:
        window: ``None`` (the whole sequence, or any non-sequence model) or ``K >= 1``: truncated BPTT over
            the last ``K`` steps of a sequence model.

    Example:
        >>> import torch, fwdgrad
        >>> model = torch.nn.Linear(3, 1)
        >>> loss = fwdgrad.estimator("bp")(model, lambda m: m(torch.ones(2, 3)).pow(2).mean())
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = check_window("Backprop", window)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        if self.window is not None:  # truncated BPTT: steps before the last window carry no history
            check_sequence_model(where, model)
            model = WindowedSequence(model, self.window, truncate=True)
        with torch.enable_grad():
            loss = check_real_scalar(where, loss_fn(model))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
        return loss.detach(), out


register_estimator("bp", Backprop, default_lr=BP_LR, claims=("exact", "grad", "fused"))
