"""``fg-a`` with ``directions="momentum"`` (``fg-a-momentum``): the weight-space momentum guess added to the
activity estimate, ``ĝ = ⟨∇L,u⟩u + (I − uuᵀ)ĝ_A``. Exact pieces against autograd in float64, Monte-Carlo
unbiasedness for a fixed guess (z-test as in test_generic.py), checkpoints, bad options. The generic checks
(unbiased with the guess moving, no backward, .grad, fused) run on the registered name in test_generic.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.directions.stateful import MomentumState
from fwdgrad.models.localmixer import LocalMixer
from problems import DEVICE, RaisingBackward

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _task(kind: str = "mlp", seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mixer":
        model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=2, channels=8, groups=2)
        x = torch.randn(6, 1, 4, 4, generator=g, dtype=DT)
    else:
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
        x = torch.randn(6, 5, generator=g, dtype=DT)
    model = model.double().to(DEVICE)
    with torch.no_grad():  # the mixer's read-out starts at zero: move it so every gradient is non-trivial
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=DT).to(DEVICE))
    y = torch.randint(0, 3, (x.shape[0],), generator=g).to(DEVICE)
    return model, lambda m: F.cross_entropy(m(x.to(DEVICE)), y, reduction="none")


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _true(model, loss_fn) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_fn(model).mean(), list(model.parameters()), allow_unused=True))


def _guess(est, model) -> list[torch.Tensor]:
    """The step's guess ``u`` as the estimator forms it (noisy parameters only; zero on the read-out)."""
    state = est._momentum.bind(list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    noisy = [i for i, n in enumerate(names) if not n.startswith(_readout(model))]
    u = est._momentum.source.guess(MomentumState([state.average[i] for i in noisy], state.count))
    full = [torch.zeros_like(p) for p in model.parameters()]
    for i, t in zip(noisy, u):
        full[i] = t
    return full


def _readout(model) -> str:
    return "readout." if isinstance(model, LocalMixer) else "4."


@pytest.mark.parametrize("kind", ["mlp", "mixer"])
def test_estimate_is_exact_along_the_guess_and_on_the_readout(kind: str) -> None:
    """⟨ĝ, u⟩ = ⟨∇L, u⟩ (float64, 1e-10) with ``u`` the unit average of the past estimates over the noisy
    parameters; the read-out keeps its exact gradient; the guess is a unit vector that moved."""
    model, loss_fn = _task(kind)
    est = fwdgrad.estimator("fg-a-momentum", seed=0, num_directions=2)
    est(model, loss_fn)  # first step: no guess yet, the plain activity estimate starts the average
    first = [p.grad.clone() for p in model.parameters()]
    u = _guess(est, model)
    assert abs(float(_flat(u).norm()) - 1) < 1e-12
    model.zero_grad(set_to_none=True)
    est(model, loss_fn)
    ghat, true = [p.grad for p in model.parameters()], _true(model, loss_fn)
    true = [torch.zeros_like(p) if t is None else t for p, t in zip(model.parameters(), true)]
    torch.testing.assert_close(_flat(ghat) @ _flat(u), _flat(true) @ _flat(u), rtol=1e-10, atol=1e-14)
    for (n, _), g, t in zip(model.named_parameters(), ghat, true):
        if n.startswith(_readout(model)):
            torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12)
    # the state is the β-average of the two estimates
    avg = est.state_dict()["state"]["average"]
    for a, g1, g2 in zip(avg, first, ghat):
        torch.testing.assert_close(a, 0.9 * 0.1 * g1 + 0.1 * g2, rtol=1e-12, atol=1e-14)


def _unbiased_for_a_fixed_guess(samples: int, kind: str = "mlp") -> None:
    model, loss_fn = _task(kind, seed=1)
    true = _flat(t if t is not None else torch.zeros_like(p)
                 for p, t in zip(model.parameters(), _true(model, loss_fn)))
    est = fwdgrad.estimator("fg-a-momentum", seed=2)
    for _ in range(3):
        est(model, loss_fn)
    saved = est.state_dict()["state"]
    draws = []
    for _ in range(samples):  # the same guess for every draw, fresh noise (the generator runs on)
        est.load_state_dict({**est.state_dict(), "state": copy.deepcopy(saved)})
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        draws.append(_flat(p.grad for p in model.parameters()))
    d = torch.stack(draws)
    se = d.std(0) / samples**0.5
    exact = se < 1e-12  # the read-out: its exact gradient every time
    assert torch.allclose(d.mean(0)[exact], true[exact], atol=1e-10)
    z = (d.mean(0)[~exact] - true[~exact]).abs() / se[~exact]
    assert z.max() < 5.0, f"max z {z.max():.2f}"


def test_unbiased_for_a_fixed_guess() -> None:
    _unbiased_for_a_fixed_guess(300)


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind", ["mlp", "mixer"])
def test_unbiased_for_a_fixed_guess_heavy(kind: str) -> None:
    _unbiased_for_a_fixed_guess(6000, kind)


def test_state_round_trips_through_a_checkpoint() -> None:
    """A resumed estimator (state_dict + generator state) continues exactly like the uninterrupted one."""
    from fwdgrad.training.checkpoint import estimator_state, set_estimator_state

    model, loss_fn = _task()
    a = fwdgrad.estimator("fg-a", directions="momentum", seed=0)
    assert a.state_dict()["state"] is None
    for _ in range(2):
        a(model, loss_fn)
    saved = copy.deepcopy(estimator_state(a))
    assert saved["unsaved"] == [] and saved["state"]["count"] == 2
    b = fwdgrad.estimator("fg-a", directions="momentum", seed=99)
    set_estimator_state(b, saved)
    twin = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    a(model, loss_fn)
    b(twin, loss_fn)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert fwdgrad.estimator("fg-a").state_dict()["state"] is None


def test_no_backward_through_the_mixer() -> None:
    """A backward-raising op after the first block: ``bp`` raises on it, the momentum step runs (its extra
    pass is a forward-mode JVP)."""
    model, loss_fn = _task("mixer")
    model.blocks[0].register_forward_hook(lambda m, a, o: RaisingBackward.apply(o))
    with pytest.raises(RuntimeError, match="a backward pass happened"):
        fwdgrad.estimator("bp")(copy.deepcopy(model), lambda m: loss_fn(m).mean())
    est = fwdgrad.estimator("fg-a-momentum", seed=0)
    for _ in range(2):
        est(model, loss_fn)
    assert est.state_dict()["state"]["count"] == 2


def test_bad_options_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"^ActivityForwardGradient: directions must be one of .*got 'adam'"):
        fwdgrad.estimator("fg-a", directions="adam")
    with pytest.raises(ValueError, match=r"direction_beta must be a float in \[0, 1\), got 1.5"):
        fwdgrad.estimator("fg-a", directions="momentum", direction_beta=1.5)
    with pytest.raises(ValueError, match=r"got True"):
        fwdgrad.estimator("fg-a-momentum", direction_beta=True)
    with pytest.raises(ValueError, match="keeps no state"):
        fwdgrad.estimator("fg-a").load_state_dict({"state": {"average": [], "count": 0}})
