"""A module re-run on its stored input must not see its forward pre-hooks twice (issue 23).

fg-a's local weight rules and the exact read-out of ``fg-a`` / ``fg-w:readout="exact"`` use the input a
module received. That input is stored *after* the module's pre-hooks ran, so a rule that re-ran the module
with its hooks applied them a second time: a pre-hook scaling the input by 3 gave 3× the read-out's exact
gradient. The check here is sharp: a model whose pre-hooks scale by 3 must give, for the same seed, the
same estimate as the model with the scaling built in as a module (float64, 1e-12), and the read-out's
exact gradient must equal autograd's.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from problems import DEVICE, autograd_gradient

DT = torch.float64


class _Times3(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


def _model(hooked: bool) -> nn.Sequential:
    """``a → tanh → ×3 → b → tanh → ×3 → readout``, the ×3 as pre-hooks of ``b`` and the read-out, or as
    modules."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
    if hooked:
        for m in (b, c):
            m.register_forward_pre_hook(lambda m, args: (3 * args[0],))
        model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), c)
    else:
        model = nn.Sequential(a, nn.Tanh(), _Times3(), b, nn.Tanh(), _Times3(), c)
    return model.double().to(DEVICE)


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


CASES = {
    "fg-a": ("fg-a", {}),
    "fg-a-perturbed-readout": ("fg-a", {"exact_output": False}),
    "fg-a-momentum": ("fg-a-momentum", {}),
    "fg-w-exact-readout": ("fg-w", {"readout": "exact"}),
    "fg-w-exact-readout-k3": ("fg-w", {"readout": "exact", "num_directions": 3, "tangents": "rank1"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_scaling_pre_hook_counts_once(case: str) -> None:
    name, options = CASES[case]
    x, y = _data()
    reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
    loss_fn = lambda m: F.cross_entropy(m(x), y, reduction=reduction)
    grads = []
    for hooked in (True, False):
        model, est = _model(hooked), fwdgrad.estimator(name, seed=5, **options)
        steps = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            est(model, loss_fn)
            steps.append([p.grad.clone() for p in model.parameters()])
        grads.append(steps)
        if options.get("exact_output", True):  # the read-out's gradient is exact: equal to autograd's
            model.zero_grad(set_to_none=True)
            true = autograd_gradient(model, lambda m: loss_fn(m).mean())
            est(model, loss_fn)
            for p, t in zip(model[-1].parameters(), true[-2:]):
                torch.testing.assert_close(p.grad, t, rtol=1e-12, atol=1e-14)
    for a, b in zip(*grads):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_side_effect_hooks_run_once_per_forward(case: str) -> None:
    """A pre-hook and a hook that only count: once per step (``fg-a-momentum``: twice from its second step,
    its documented K + 1 passes)."""
    name, options = CASES[case]
    x, y = _data()
    model = _model(False)
    calls: collections.Counter[str] = collections.Counter()
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda m, a, i=i: calls.update([f"pre{i}"]))
            m.register_forward_hook(lambda m, a, o, i=i: calls.update([f"post{i}"]))
    reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
    est = fwdgrad.estimator(name, seed=5, **options)
    for step in range(3):
        calls.clear()
        est(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))
        passes = 2 if name == "fg-a-momentum" and step > 0 else 1
        assert set(calls.values()) == {passes} and len(calls) == 6, (step, calls)
