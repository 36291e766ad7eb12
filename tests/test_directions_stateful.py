"""Momentum directions (Silver et al. 2022: the unbiased variant ``momentum`` and their own biased ``mixed``
form) and the projection aggregation (Flügel et al. 2025): exact pieces against autograd in float64,
Monte-Carlo unbiasedness or the documented mean (z-test, see test_generic.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.directions import TangentSource
from fwdgrad.directions.stateful import MomentumState
from problems import DEVICE

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _task(seed: int = 0, bn: bool = False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(3))
    model = nn.Sequential(*layers).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=DT).to(DEVICE)
    y = torch.randint(0, 2, (8,), generator=g).to(DEVICE)
    return model, lambda m: F.cross_entropy(m(x), y)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _true(model, loss_fn) -> torch.Tensor:
    return _flat(torch.autograd.grad(loss_fn(model), list(model.parameters())))


def _draws_for_one_guess(est, model, loss_fn, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, [samples, n] estimates)``: one step to start the average, then ``samples`` draws, each from that
    same state (the same guess ``u``)."""
    est(model, loss_fn)
    state = est._momentum.state_dict()
    draws = []
    for _ in range(samples):
        est._momentum.load_state_dict(copy.deepcopy(state))
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        draws.append(_flat(p.grad for p in model.parameters()))
    return _flat(est._momentum.source.guess(MomentumState(state["average"], state["count"]))), torch.stack(draws)


def _z(draws: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-entry z-scores of the draws' mean against ``mean`` (standard error from the draws)."""
    return (draws.mean(0) - mean).abs() / (draws.std(0) / draws.shape[0] ** 0.5).clamp_min(1e-12)


def test_momentum_estimate_is_exact_along_the_guess() -> None:
    """⟨ĝ, u⟩ = ⟨∇L, u⟩ exactly: the random part is projected off the guess u."""
    model, loss_fn = _task()
    est = fwdgrad.estimator("fg-w", directions="momentum", num_directions=2, seed=0)
    est(model, loss_fn)  # first step: no guess yet, a plain forward gradient that starts the average
    u = _flat(est._momentum.source.guess(est._momentum._state))
    model.zero_grad()
    est(model, loss_fn)
    ghat, true = _flat(p.grad for p in model.parameters()), _true(model, loss_fn)
    torch.testing.assert_close(ghat @ u, true @ u, rtol=1e-10, atol=1e-14)
    assert abs(float(u.norm()) - 1) < 1e-12


@pytest.mark.parametrize("samples", [400])
def test_momentum_estimate_is_unbiased_for_a_fixed_guess(samples: int) -> None:
    model, loss_fn = _task(1)
    true = _true(model, loss_fn)
    est = fwdgrad.estimator("fg-w", directions="momentum", seed=2)
    _, d = _draws_for_one_guess(est, model, loss_fn, samples)
    assert _z(d, true).max() < 5.0


@pytest.mark.parametrize("directions", ["momentum", "mixed"])
def test_momentum_statistics_and_fused_step(directions: str) -> None:
    model, loss_fn = _task(bn=True)
    reference = copy.deepcopy(model)
    loss_fn(reference)  # one forward: what one step does to BatchNorm's statistics
    est = fwdgrad.estimator("fg-w", directions=directions, num_directions=3, seed=0)
    for _ in range(2):  # the second step has a guess
        est(model, loss_fn)
        for a, b in zip(model.buffers(), reference.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        loss_fn(reference)
    a, b = _task()[0], _task()[0]
    _, lf = _task()
    ea = fwdgrad.estimator(f"fg-w-{directions}", seed=4)
    eb = fwdgrad.estimator("fg-w", directions=directions, seed=4)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        ea.sgd_step(a, lf, lr=0.1)
        opt.zero_grad()
        eb(b, lf)
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_projection_equals_the_scaled_orthogonal_projection() -> None:
    """ĝ = (n/K)·B(BᵀB)⁻¹Bᵀ∇L with the step's own tangents (float64, against autograd)."""
    model, loss_fn = _task()
    true = _true(model, loss_fn)
    est = fwdgrad.estimator("fg-w", aggregation="projection", num_directions=3, seed=5)
    params = dict(model.named_parameters())
    grad = est.step(model, loss_fn, params)
    basis = torch.stack([_flat(grad.source.dense(i, k) for i in range(len(params))) for k in range(3)], 1)
    n = basis.shape[0]
    want = (n / 3) * basis @ torch.linalg.solve(basis.T @ basis, basis.T @ true)
    got = _flat(grad.tensor(i) for i in range(len(params)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_projection_is_unbiased() -> None:
    model, loss_fn = _task(3)
    true = _true(model, loss_fn)
    est = fwdgrad.estimator("fg-w", aggregation="projection", num_directions=4, seed=6)
    draws = []
    for _ in range(600):
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        draws.append(_flat(p.grad for p in model.parameters()))
    d = torch.stack(draws)
    z = (d.mean(0) - true).abs() / (d.std(0) / 600**0.5)
    assert z.max() < 5.0


def test_bad_direction_options() -> None:
    with pytest.raises(ValueError, match="directions must be one of"):
        fwdgrad.estimator("fg-w", directions="adam")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        fwdgrad.estimator("fg-w", aggregation="median")
    with pytest.raises(ValueError, match="use tangents='gaussian' or 'sphere', got 'rademacher'"):
        fwdgrad.estimator("fg-w", aggregation="projection", tangents="rademacher")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got 1.5"):
        fwdgrad.estimator("fg-w", directions="momentum", direction_beta=1.5)


def test_given_source_hands_out_its_blocks() -> None:
    blocks = [torch.randn(1, 3, 2), torch.randn(1, 2)]
    src = TangentSource.given([b[0] * 0 for b in blocks], blocks)
    assert src.name == "given" and not src.regenerable
    assert torch.equal(src.dense(0, 0), blocks[0][0])
    torch.testing.assert_close(src.gram(), sum(b.reshape(1, -1).double() @ b.reshape(1, -1).double().T for b in blocks))


@pytest.mark.parametrize("directions", ["momentum", "mixed"])
def test_momentum_state_round_trips_through_a_checkpoint(directions: str) -> None:
    """A resumed estimator (state_dict + generator state) continues exactly like the uninterrupted one."""
    from fwdgrad.training.checkpoint import estimator_state, set_estimator_state

    model, loss_fn = _task()
    a = fwdgrad.estimator("fg-w", directions=directions, seed=0)
    for _ in range(2):
        a(model, loss_fn)
    saved = copy.deepcopy(estimator_state(a))
    assert saved["unsaved"] == []
    b = fwdgrad.estimator("fg-w", directions=directions, seed=99)
    set_estimator_state(b, saved)
    twin = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    a(model, loss_fn)
    b(twin, loss_fn)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("k", [1, 3])
def test_mixed_estimate_equals_autograd_along_the_mixed_tangents(k: int) -> None:
    """ĝ = (1/K)Σ⟨∇L, v_k⟩v_k with v_k = β√n·u + √(1−β²)·ε_k rebuilt from the guess and the generator."""
    model, loss_fn = _task()
    est = fwdgrad.estimator("fg-w", directions="mixed", guess_weight=0.4, num_directions=k, seed=0)
    est(model, loss_fn)  # first step: plain directions, which start the average
    u = est._momentum.source.guess(est._momentum._state)
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
    u, d = _draws_for_one_guess(est, model, loss_fn, 2000)
    mean = (1 - 0.25) * true + 0.25 * true.numel() * (true @ u) * u
    assert _z(d, mean).max() < 5.0
    assert float(mean @ true) > 0


@pytest.mark.parametrize("options, message", [
    ({"directions": "mixed", "guess_weight": 1.0}, "guess_weight must be in (0, 1), got 1.0"),
    ({"directions": "mixed", "guess_weight": 0}, "guess_weight must be in (0, 1), got 0"),
    ({"guess_weight": 0.3}, "guess_weight is an option of directions='mixed'"),
    ({"directions": "mixed", "aggregation": "projection"}, "goes with readout='perturb'"),
])
def test_bad_mixed_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fwdgrad.estimator("fg-w", **options)
