"""Backprop behind the estimator interface, so that every comparison switches method by name."""

from __future__ import annotations

import torch
from torch import nn

from fwdgrad._validation import check_real_scalar
from fwdgrad.estimators.base import Estimator, LossFn
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

#: Default learning rates of bp, by optimizer (MNIST-1D mlp sweeps, docs/cli.md).
BP_LR = {"sgd": 0.1, "adam": 3e-3}


class Backprop(Estimator):
    """The exact gradient by reverse-mode autograd (one backward pass): the baseline of every benchmark.

    Example:
        >>> import torch, fwdgrad
        >>> model = torch.nn.Linear(3, 1)
        >>> loss = fwdgrad.estimator("bp")(model, lambda m: m(torch.ones(2, 3)).pow(2).mean())
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.enable_grad():
            loss = check_real_scalar(f"{type(self).__name__}.__call__", loss_fn(model))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
        return loss.detach(), out


register_estimator("bp", Backprop, default_lr=BP_LR, claims=("exact", "grad", "fused"))
