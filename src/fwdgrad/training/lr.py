"""Learning rates: the per-method defaults and the schedules of ``--schedule``.

Default learning rates (:func:`default_lr`) were chosen by validation accuracy on the default task
(MNIST-1D, ``mlp`` width 256 depth 2 = 78,858 parameters, batch 128, 50-60 epochs, SGD momentum 0.9 or
Adam); the sweeps and their figures are in ``docs/cli.md``. For SGD, a weight-perturbed forward gradient
(``fg-w`` and its local variants) gets that rate scaled by ``min(1, P_ref / P)``, ``P`` the number of
trainable parameters it perturbs: with one Gaussian direction ``E‖ĝ‖² = (P + 2)‖∇f‖²``, so the second-order
term ``lr² L E‖ĝ‖² / 2`` of a step grows with ``P`` and the largest stable step shrinks like ``1/P``
(Ren et al. 2023, Table 1: weight perturbation's variance grows like ``pq + 2`` with a layer's ``p × q``
weights). Adam divides each coordinate
by its running RMS, which absorbs that scale, so Adam's defaults are not scaled.

Schedules are per optimizer step (:class:`torch.optim.lr_scheduler.LambdaLR`), a function of the step index
only, so a checkpoint's ``scheduler.state_dict()`` (its step count) is all a resumed run needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fwdgrad.estimators import default_lr as recipe_default_lr
from fwdgrad.estimators import recipe
from fwdgrad.training.config import SCHEDULES

# The model the recipes' rates were tuned on: MNIST-1D (40 inputs), mlp 40-256-256-10.
REFERENCE_PARAMETERS = 78_858
__all__ = ["REFERENCE_PARAMETERS", "SCHEDULES", "default_lr", "lr_factor", "make_scheduler", "perturbs_weights"]


def perturbs_weights(name: str) -> bool:
    """Whether recipe ``name`` perturbs the weights (its estimate's variance grows with their number).

    >>> perturbs_weights("fg-w"), perturbs_weights("lg-fg-w"), perturbs_weights("fg-a"), perturbs_weights("bp")
    (True, True, False, False)
    """
    return recipe(name).lr_scales_with == "parameters"


def default_lr(name: str, optimizer: str, *, num_parameters: int | None = None) -> tuple[float, str]:
    """The default learning rate of method ``name`` with ``optimizer`` (``"sgd"`` or ``"adam"``) and a
    phrase saying where it comes from: the estimator recipe's rate (:func:`fwdgrad.estimators.default_lr`),
    tuned on the reference model.

    ``num_parameters``: the trainable parameters of the model it will train. With SGD, a weight-perturbed
    method's rate is multiplied by ``min(1, REFERENCE_PARAMETERS / num_parameters)`` (see the module doc);
    ``None`` gives the rate of the reference model.

    >>> default_lr("fg-w", "sgd")[0], default_lr("fg-w", "sgd", num_parameters=4 * 78_858)[0]
    (0.0001, 2.5e-05)
    """
    lr, source = recipe_default_lr(name, optimizer)
    if optimizer == "sgd" and num_parameters and num_parameters > REFERENCE_PARAMETERS and perturbs_weights(name):
        lr, source = lr * REFERENCE_PARAMETERS / num_parameters, (
            f"{source}, × {REFERENCE_PARAMETERS:,}/{num_parameters:,} perturbed parameters")
    return lr, source


def lr_factor(
    schedule: str, step: int, total_steps: int, warmup_steps: int = 0, step_every: int = 1, gamma: float = 0.1
) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    - ``constant``: 1 (after the warm-up, when there is one);
    - ``cosine``: ``½(1 + cos(π t / T))`` over the steps after the warm-up (``t`` of ``T``);
    - ``warmup-cosine``: the same (its warm-up defaults to one epoch);
    - ``step``: ``gamma ** ⌊(step - warmup) / step_every⌋``.
    A warm-up rises linearly, ``(step + 1) / warmup_steps``, to 1.

    >>> [round(lr_factor("warmup-cosine", s, 10, warmup_steps=2), 3) for s in range(10)]
    [0.5, 1.0, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t, span = step - warmup_steps, max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule in ("cosine", "warmup-cosine"):
        return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    if schedule == "step":
        return gamma ** (t // max(1, step_every))
    raise ValueError(f"fwdgrad.training.lr_factor: unknown schedule {schedule!r}; choose from {SCHEDULES}")


def warmup_epochs_of(schedule: str, warmup_epochs: float | None) -> float:
    """The warm-up length in epochs: as given, else 1 for ``warmup-cosine`` and 0 for the others."""
    if warmup_epochs is not None:
        return float(warmup_epochs)
    return 1.0 if schedule == "warmup-cosine" else 0.0


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float | None = None,
    step_epochs: int | None = None,
    step_gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` for ``schedule`` over ``epochs`` epochs of
    ``steps_per_epoch`` steps; ``step_epochs`` (``step`` schedule) defaults to a third of the epochs."""
    total = epochs * steps_per_epoch
    warmup = min(total, round(warmup_epochs_of(schedule, warmup_epochs) * steps_per_epoch))
    every = (step_epochs if step_epochs is not None else max(1, epochs // 3)) * steps_per_epoch
    factor: Callable[[int], float] = lambda s: lr_factor(schedule, s, total, warmup, every, step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
