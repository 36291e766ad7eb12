"""Monte-Carlo checks of unbiasedness and of the known second moments of every tangent sampler.

These tests are probabilistic by nature but deterministic in practice: each uses a fixed seed, so it
either always passes or always fails. The tolerances are stated in units of the Monte-Carlo standard
error (se), computed from the same samples, so they do not drift when the sample count changes:

* unbiasedness: every coordinate of the sample mean lies within ``Z_MAX = 5`` standard errors of the
  autograd gradient. Over ~30 coordinates a correct estimator fails this with probability < 1e-5 for a
  random seed; a relative bias of b in a coordinate is caught once b·|a_i| > 5·se.
* second moments: the sample mean of ‖g‖² lies within 5 se of the exact value in ANCHORS.md.

The light versions (always run) draw 4,000 directions and catch gross errors (a factor 2, a second
moment 30 % off); the heavy ones (``-m montecarlo``) draw 200,000, which shrinks se by √50 ≈ 7 and
catches a 10 % bias and Gaussian's (n+2)‖a‖² against Rademacher's n‖a‖² (n = 26). Both claims are
themselves tested (``test_the_*_checks_have_power``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fwdgrad.derivatives import call_with_parameters
from fwdgrad.directions import SAMPLERS, variance_factor
from fwdgrad.functional import combine, directional_derivatives

Z_MAX = 5.0
LIGHT, HEAVY = 4_000, 200_000


def _problem():
    """A small float64 MLP with n = 26 parameters (two weight matrices, two bias vectors) and its gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    loss_fn = lambda m: m(x).pow(2).mean()
    names = [n for n, _ in model.named_parameters()]
    primals = [p.detach() for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    a = torch.cat([g.flatten() for g in grads])

    def f(xs):
        return call_with_parameters(model, loss_fn, dict(zip(names, xs)))

    return f, primals, a


def _samples(name: str, count: int, k: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` independent estimates (each the mean over ``k`` directions), flattened: ``[count, n]``."""
    f, primals, a = _problem()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count // 1000 if k == 1 else count):
        t = SAMPLERS[name](primals, 1000 if k == 1 else k, gen)
        _, dirs, _ = directional_derivatives(f, primals, t)
        if k == 1:  # each direction is its own estimate: g_i = d_i v_i
            out.append(torch.cat([(dirs.view(-1, *[1] * (x.dim() - 1)) * x).flatten(1) for x in t], 1))
        else:
            out.append(torch.cat([g.flatten() for g in combine(dirs, t)]).unsqueeze(0))
    return torch.cat(out), a


def _assert_unbiased(g: torch.Tensor, a: torch.Tensor) -> None:
    mean, se = g.mean(0), g.std(0) / g.shape[0] ** 0.5
    z = ((mean - a) / se).abs().max().item()
    assert z < Z_MAX, f"max |z| = {z:.2f} over {a.numel()} coordinates"


def _assert_second_moment(g: torch.Tensor, expected: float) -> None:
    sq = g.pow(2).sum(1)
    se = sq.std() / sq.numel() ** 0.5
    z = ((sq.mean() - expected) / se).abs().item()
    assert z < Z_MAX, f"E‖g‖² ≈ {sq.mean().item():.5g} ± {se.item():.2g}, expected {expected:.5g} (|z| = {z:.2f})"


SECOND_MOMENT = {"gaussian": lambda n: n + 2, "rademacher": lambda n: n, "sphere": lambda n: n, "rank1": lambda n: n}


@pytest.mark.parametrize("name", sorted(SECOND_MOMENT))
def test_unbiased_and_second_moment_light(name: str) -> None:
    g, a = _samples(name, LIGHT)
    _assert_unbiased(g, a)
    _assert_second_moment(g, SECOND_MOMENT[name](a.numel()) * a.pow(2).sum().item())


def test_orthogonal_unbiased_and_moment_light() -> None:
    k = 4
    g, a = _samples("orthogonal", 1500, k=k)
    n = a.numel()
    _assert_unbiased(g, a)
    _assert_second_moment(g, n / k * a.pow(2).sum().item())  # E‖ĝ‖² = (n/K)‖a‖²


def test_orthogonal_is_exact_with_n_directions() -> None:
    """With K = n the directions span the whole space and the estimate is the gradient itself."""
    _, a = _samples("gaussian", 1000)
    g, _ = _samples("orthogonal", 2, k=a.numel())
    torch.testing.assert_close(g, a.expand_as(g), rtol=0, atol=1e-10)


def test_the_light_checks_have_power() -> None:
    """The light checks catch gross errors: a factor-2 scale (a forgotten 1/K with K = 2) and a second
    moment 30 % off. Finer errors need the heavy sample size (see the heavy power test)."""
    g, a = _samples("rademacher", LIGHT)
    with pytest.raises(AssertionError):
        _assert_unbiased(2.0 * g, a)
    with pytest.raises(AssertionError):
        _assert_second_moment(g, 1.3 * a.numel() * a.pow(2).sum().item())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_averaging_k_directions_divides_the_variance(name: str) -> None:
    k = 4
    g, a = _samples(name, 2000, k=k, seed=1)
    err = (g - a).pow(2).sum(1)
    expected = variance_factor(name, a.numel(), k) * a.pow(2).sum().item()
    z = ((err.mean() - expected) / (err.std() / err.numel() ** 0.5)).abs().item()
    assert z < Z_MAX, f"E‖ĝ−a‖² ≈ {err.mean().item():.4g}, expected {expected:.4g} (|z| = {z:.2f})"


def test_entries_are_unit_variance_and_signs_are_pm1() -> None:
    like = [torch.zeros(30, 20, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)]
    gen = torch.Generator().manual_seed(0)
    for name in ("rademacher", "rank1"):
        t = SAMPLERS[name](like, 50, gen)
        assert all(((x == 1) | (x == -1)).all() for x in t)
    for name in ("sphere", "orthogonal"):
        t = SAMPLERS[name](like, 5, gen)
        norms = sum(x.flatten(1).pow(2).sum(1) for x in t)
        torch.testing.assert_close(norms, torch.full((5,), 607.0, dtype=torch.float64))
    q = torch.cat([x.flatten(1) for x in SAMPLERS["orthogonal"](like, 5, gen)], 1)
    torch.testing.assert_close(q @ q.T, 607.0 * torch.eye(5, dtype=torch.float64))


@pytest.mark.montecarlo
@pytest.mark.parametrize("name", sorted(SECOND_MOMENT))
def test_unbiased_and_second_moment_heavy(name: str) -> None:
    g, a = _samples(name, HEAVY, seed=11)
    _assert_unbiased(g, a)
    _assert_second_moment(g, SECOND_MOMENT[name](a.numel()) * a.pow(2).sum().item())


@pytest.mark.montecarlo
def test_the_heavy_checks_have_power() -> None:
    """At 200,000 samples a 10 % scale bias and Gaussian's (n+2) versus Rademacher's n are told apart."""
    g, a = _samples("rademacher", HEAVY, seed=11)
    with pytest.raises(AssertionError):
        _assert_unbiased(1.1 * g, a)
    with pytest.raises(AssertionError):
        _assert_second_moment(g, (a.numel() + 2) * a.pow(2).sum().item())


@pytest.mark.montecarlo
def test_orthogonal_unbiased_heavy() -> None:
    g, a = _samples("orthogonal", 40_000, k=4, seed=11)
    _assert_unbiased(g, a)
    _assert_second_moment(g, a.numel() / 4 * a.pow(2).sum().item())
