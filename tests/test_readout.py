"""fg-w with ``readout="exact"`` (Ren et al.'s official FG-W): the read-out gets its exact gradient, the
hidden layers a forward gradient of their own parameters only; no backward through the network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from problems import DEVICE, NoBackwardNet

DT = torch.float64


def _task(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g, dtype=DT).to(DEVICE)
    y = torch.randint(0, 3, (8,), generator=g).to(DEVICE)
    return model, lambda m: F.cross_entropy(m(x), y)


@pytest.mark.parametrize("tangents,k", [("rademacher", 1), ("gaussian", 3), ("rank1", 4)])
def test_the_readout_gets_its_exact_gradient_and_the_rest_a_forward_gradient(tangents: str, k: int) -> None:
    model, loss_fn = _task()
    true = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    fwdgrad.estimator("fg-w", readout="exact", tangents=tangents, num_directions=k, seed=1)(model, loss_fn)
    grads = [p.grad for p in model.parameters()]
    for got, want in zip(grads[-2:], true[-2:]):  # model[4]: the last Linear
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if tangents == "rademacher":  # the sharp identity, over the perturbed (hidden) parameters only
        ghat = torch.cat([g.reshape(-1) for g in grads[:-2]])
        gt = torch.cat([g.reshape(-1) for g in true[:-2]])
        lhs, rhs = ghat @ gt, ghat.pow(2).sum() / ghat.numel()
        assert abs(lhs - rhs) <= 1e-10 * abs(rhs) and rhs > 0


def test_fused_step_equals_grad_and_sgd_with_an_exact_readout() -> None:
    model, loss_fn = _task()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fwdgrad.estimator("fg-w", readout="exact", seed=3).sgd_step(a, loss_fn, lr=0.1, momentum=0.9)
    fwdgrad.estimator("fg-w", readout="exact", seed=3)(b, loss_fn)
    torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9).step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_no_backward_runs_with_an_exact_readout() -> None:
    torch.manual_seed(0)
    model = NoBackwardNet().double().to(DEVICE)
    x, y = torch.randn(8, 6, dtype=DT, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
    fwdgrad.estimator("fg-w", readout="exact", seed=0)(model, lambda m: F.cross_entropy(m(x), y))
    assert model.fc1.weight.grad.abs().sum() > 0 and model.fc2.weight.grad.abs().sum() > 0


class SoftmaxAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.out(torch.tanh(self.fc(x))), -1)


def test_bad_readouts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"readout must be one of \('perturb', 'exact'\), got 'last'"):
        fwdgrad.estimator("fg-w", readout="last")
    model = SoftmaxAfter()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="to produce the model's output"):
        fwdgrad.estimator("fg-w", readout="exact", seed=0)(model, lambda m: F.nll_loss(m(x), y))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="leaves no parameter to perturb"):
        fwdgrad.estimator("fg-w", readout="exact", seed=0)(nn.Linear(4, 3), lambda m: m(x).pow(2).mean())


def test_a_model_can_name_its_readout() -> None:
    model = SoftmaxAfter().double()
    model.fwdgrad_readout = "fc"  # nonsense on purpose: fc's output is not the model's output
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"read-out layer \(Linear\)"):
        fwdgrad.estimator("fg-w", readout="exact", seed=0)(model, lambda m: F.nll_loss(m(x), y))
