"""Silver et al.'s mixed momentum directions (``fg-w:directions=mixed``): v_k = β√n·u + √(1−β²)·ε_k. Exact
against autograd in float64 for the very tangents of a step, the conditional mean (1−β²)∇L + β²n⟨∇L,u⟩u by
Monte Carlo (z-test, as in test_generic.py), bad options, and a checkpoint round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.directions import TangentSource
from problems import DEVICE

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _task(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=DT).to(DEVICE)
    y = torch.randint(0, 2, (8,), generator=g).to(DEVICE)
    return model, lambda m: F.cross_entropy(m(x), y)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _true(model, loss_fn) -> torch.Tensor:
    return _flat(torch.autograd.grad(loss_fn(model), list(model.parameters())))


@pytest.mark.parametrize("k", [1, 3])
def test_mixed_estimate_equals_autograd_along_the_mixed_tangents(k: int) -> None:
    """ĝ = (1/K)Σ⟨∇L, v_k⟩v_k with v_k = β√n·u + √(1−β²)·ε_k rebuilt from the guess and the generator."""
    model, loss_fn = _task()
    est = fwdgrad.estimator("fg-w", directions="mixed", guess_weight=0.4, num_directions=k, seed=0)
    est(model, loss_fn)  # first step: plain directions, which start the average
    u = est._momentum.guess(est._momentum_state[1])
    generator = copy.deepcopy(est._generator)
    model.zero_grad()
    est(model, loss_fn)
    params = [p.detach() for p in model.parameters()]
    n = sum(p.numel() for p in params)
    noise = TangentSource("gaussian", params, k, generator)
    v = torch.stack([_flat(0.4 * math.sqrt(n) * t + math.sqrt(1 - 0.4**2) * noise.materialise_one(i)[j]
                           for i, t in enumerate(u)) for j in range(k)])
    true = _true(model, loss_fn)
    expected = (v @ true) @ v / k
    torch.testing.assert_close(_flat(p.grad for p in model.parameters()), expected, rtol=1e-10, atol=1e-13)


def test_mixed_estimate_has_the_documented_mean() -> None:
    """E[ĝ | u] = (1−β²)∇L + β²n⟨∇L,u⟩u (Gaussian ε): biased towards the guess, a descent direction."""
    model, loss_fn = _task(1)
    true = _true(model, loss_fn)
    est = fwdgrad.estimator("fg-w", directions="mixed", guess_weight=0.5, seed=2)
    est(model, loss_fn)
    state = copy.deepcopy(est._momentum_state)
    u = _flat(est._momentum.guess(state[1]))
    n, samples = true.numel(), 2000
    draws = []
    for _ in range(samples):
        est._momentum_state = copy.deepcopy(state)  # the same guess for every draw
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        draws.append(_flat(p.grad for p in model.parameters()))
    d = torch.stack(draws)
    mean = (1 - 0.25) * true + 0.25 * n * (true @ u) * u
    z = (d.mean(0) - mean).abs() / (d.std(0) / samples**0.5).clamp_min(1e-12)
    assert z.max() < 5.0
    assert float(mean @ true) > 0


def test_mixed_fused_step_equals_grad_and_sgd() -> None:
    a, lf = _task()
    b = copy.deepcopy(a)
    ea = fwdgrad.estimator("fg-w-mixed", seed=4)
    eb = fwdgrad.estimator("fg-w", directions="mixed", seed=4)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        ea.sgd_step(a, lf, lr=0.1)
        opt.zero_grad()
        eb(b, lf)
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_mixed_state_round_trips_through_a_checkpoint() -> None:
    from fwdgrad.training.checkpoint import estimator_state, set_estimator_state

    model, loss_fn = _task()
    a = fwdgrad.estimator("fg-w", directions="mixed", seed=0)
    for _ in range(2):
        a(model, loss_fn)
    saved = copy.deepcopy(estimator_state(a))
    b = fwdgrad.estimator("fg-w", directions="mixed", seed=99)
    set_estimator_state(b, saved)
    twin = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    a(model, loss_fn)
    b(twin, loss_fn)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("options, message", [
    ({"directions": "mixed", "guess_weight": 1.0}, "guess_weight must be in (0, 1), got 1.0"),
    ({"directions": "mixed", "guess_weight": 0}, "guess_weight must be in (0, 1), got 0"),
    ({"guess_weight": 0.3}, "guess_weight is an option of directions='mixed'"),
    ({"directions": "mixed", "aggregation": "projection"}, "goes with readout='perturb'"),
])
def test_bad_mixed_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fwdgrad.estimator("fg-w", **options)
