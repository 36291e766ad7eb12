"""fwdgrad.diagnostics: the second-moment formulas against exact enumeration / large Monte Carlo, and
diagnose() on a linear model with a squared loss, where the true gradient and the moments are exact."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import fwdgrad
from fwdgrad.diagnostics import diagnose, parse_methods, second_moments
from fwdgrad.directions import SAMPLERS

D = torch.float64
SIZES = {"w": (2, 3), "b": (2,)}  # n = 8


def _blocks(a: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    return {k: (v.numel(), float(v.pow(2).sum())) for k, v in a.items()}


def _grad_of_direction(a: dict[str, torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    """(aᵀv)·v for tangents v of shape [S, *p.shape]."""
    dot = sum((vi * a[k]).flatten(1).sum(1) for vi, k in zip(v, a))
    return [dot.view(-1, *[1] * (vi.dim() - 1)) * vi for vi in v]


def _a() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=D) for k, s in SIZES.items()}


def test_rademacher_moments_match_exact_enumeration() -> None:
    a = _a()
    flat = torch.cat([t.reshape(-1) for t in a.values()])
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=flat.numel())), dtype=D)  # all 256 directions
    v = [signs[:, :6].reshape(-1, 2, 3), signs[:, 6:]]
    g = _grad_of_direction(a, v)
    exact = {k: float(gi.flatten(1).pow(2).sum(1).mean()) for k, gi in zip(a, g)}
    theory = second_moments("rademacher", _blocks(a))
    for k in a:
        assert theory[k] == pytest.approx(exact[k], rel=1e-12)


@pytest.mark.parametrize("tangents", ["gaussian", "sphere", "orthogonal", "rank1", "rademacher"])
@pytest.mark.parametrize("k", [1, 3])
def test_moment_formulas_match_monte_carlo(tangents: str, k: int) -> None:
    """Per-block E‖ĝ_l‖² of the K-direction mean from S draws in float64; tolerance 5 standard errors (a
    false alarm has probability ~1e-6 per block)."""
    a = _a()
    like = list(a.values())
    gen = torch.Generator().manual_seed(1)
    if tangents == "orthogonal":  # K directions drawn jointly: one draw per estimate
        s = 800
        draws = [SAMPLERS[tangents](like, k, gen) for _ in range(s)]
        v = [torch.stack([d[i] for d in draws]) for i in range(len(like))]  # [S, K, ...]
    else:  # independent directions: S·K in one call
        s = 20000
        v = [t.reshape(s, k, *t.shape[1:]) for t in SAMPLERS[tangents](like, s * k, gen)]
    flat_v = [t.reshape(s * k, *t.shape[2:]) for t in v]
    g = [gi.reshape(s, k, *gi.shape[1:]).mean(1) for gi in _grad_of_direction(a, flat_v)]
    theory = second_moments(tangents, _blocks(a), k)
    for n, gi in zip(a, g):
        x = gi.flatten(1).pow(2).sum(1)
        se = float(x.std()) / math.sqrt(s)
        assert abs(float(x.mean()) - theory[n]) < 5 * se + 1e-12, (n, float(x.mean()), theory[n], se)
    total = sum(theory.values())
    a2 = sum(float(t.pow(2).sum()) for t in a.values())
    assert total == pytest.approx((1 + fwdgrad.variance_factor(tangents, 8, k)) * a2, rel=1e-12)


class _Squared:
    """Per-example squared error ½‖out − y‖²; its gradient for a linear model is exact and closed-form."""

    def __call__(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per = 0.5 * (out - y).pow(2).sum(1)
        return per.mean() if reduction == "mean" else per


def _linear_problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=gen, dtype=D))
        model.bias.copy_(torch.randn(2, generator=gen, dtype=D))
    x = torch.randn(16, 3, generator=gen, dtype=D)
    y = torch.randn(16, 2, generator=gen, dtype=D)
    return model, x, y


def test_diagnose_on_a_linear_model() -> None:
    model, x, y = _linear_problem()
    rep = diagnose(model, x, y, "bp;fg-w:tangents=rademacher;fg-w:num_directions=2", samples=600, seed=0,
                   criterion=_Squared())
    # closed-form true gradient: r = Wx + b − y, ∂/∂W = mean r xᵀ, ∂/∂b = mean r
    r = model(x).detach() - y
    gw, gb = r.T @ x / 16, r.mean(0)
    a2 = float(gw.pow(2).sum() + gb.pow(2).sum())
    bp, rad, gau = rep["methods"]
    assert bp["overall"]["true_grad_norm"] == pytest.approx(math.sqrt(a2), rel=1e-12)
    assert bp["overall"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert bp["overall"]["rel_bias"] < 1e-12 and bp["overall"]["variance"] < 1e-12 * a2
    assert bp["overall"]["second_moment_ratio"] == pytest.approx(1.0, abs=1e-12)
    n = 8
    assert rad["overall"]["second_moment_theory"] == pytest.approx(n * a2, rel=1e-12)
    assert gau["overall"]["second_moment_theory"] == pytest.approx((1 + (n + 1) / 2) * a2, rel=1e-12)
    for m in (rad, gau):
        o = m["overall"]
        assert o["second_moment_theory"] == pytest.approx(o["second_moment_theory_variance_factor"], rel=1e-12)
        # Monte-Carlo checks at 5 standard errors: unbiased, E‖ĝ‖² as in theory, variance = E‖ĝ‖² − ‖a‖²
        assert o["rel_bias"] < 5 * o["rel_bias_noise"]
        assert abs(o["second_moment"] - o["second_moment_theory"]) < 5 * o["second_moment_se"]
        assert o["variance"] == pytest.approx(o["second_moment_theory"] - a2, rel=0.1)
        assert o["snr"] == pytest.approx(a2 / (o["second_moment_theory"] - a2), rel=0.1)
        for name, s in m["layers"].items():
            assert abs(s["second_moment"] - s["second_moment_theory"]) < 5 * s["second_moment_se"], name
        assert m["time_ms"] > 0


def test_diagnose_skips_what_cannot_run_and_rejects_bad_options(tmp_path) -> None:
    model, x, y = _linear_problem()
    rep = diagnose(model, x, y, "bp;l-bp", samples=2, criterion=_Squared())
    assert [m["method"] for m in rep["methods"]] == ["bp"]
    assert rep["skipped"][0]["method"] == "l-bp" and rep["skipped"][0]["reason"]
    with pytest.raises(ValueError, match=r"samples.*1"):
        diagnose(model, x, y, "bp", samples=1)
    with pytest.raises(ValueError, match="'nope'"):
        parse_methods("nope")
    with pytest.raises(ValueError, match="'tangents'"):
        parse_methods("fg-w:tangents")
    from fwdgrad.diagnostics import write_report

    paths = write_report(rep, tmp_path, plots=False)
    assert json.loads((tmp_path / "diagnose.json").read_text())["methods"][0]["method"] == "bp"
    assert "| bp |" in (tmp_path / "diagnose.md").read_text() and len(paths) == 2


def test_all_expands_to_every_estimator_and_sampler() -> None:
    labels = [m[0] for m in parse_methods("all")]
    assert set(fwdgrad.available_estimators()) <= set(labels)
    assert {f"fg-w:tangents={t}" for t in SAMPLERS if t != "gaussian"} <= set(labels)


def test_a_parameter_the_loss_does_not_use_has_a_zero_true_gradient() -> None:
    model, x, y = _linear_problem()
    model.unused = torch.nn.Parameter(torch.zeros(3, dtype=D))
    rep = diagnose(model, x, y, "fg-w:tangents=rademacher", samples=3, criterion=_Squared())
    layer = rep["methods"][0]["layers"]["unused"]
    assert layer["true_grad_norm"] == 0.0 and layer["second_moment"] > 0
