"""Every estimator in half precision: bfloat16 and float16 weights, and float32 weights under
``torch.autocast(bfloat16)``; correct, or refused with a one-line error.

What is proven here (docs/precision.md has the measurements behind the numbers):

* ``.grad``-path calls leave the weights **bit-identical** and the model's own ``nn.Parameter`` objects in
  place, in every dtype, for every registered recipe (``zo``'s ``restore="exact"``; the others never
  write the weights on that path), and after a loss that fails or returns NaN mid-perturbation.
* Accuracy: the mean of N estimates ``ĝ`` against the gradient ``g`` computed in float64 on the same
  (rounded) weights and inputs. With ``err(ĝ) = ‖ĝ − g‖² / ‖g‖²``, the Monte-Carlo noise alone gives
  ``E[err] = (n + 1)/N`` for exact Gaussian weight perturbation (``Cov[⟨g,z⟩z] = ‖g‖²I + ggᵀ``), and the
  same estimator in float64 with the same seed measures it for any estimator (``err64``). The test bound
  is ``err(ĝ) ≤ 3·err64 + 0.01``: half precision may add noise up to twice the Monte-Carlo noise and a
  bias of 10 % of ``‖g‖``. The two noise terms are sums over the ``n = 39`` entries and independent between
  the runs, so their ratio is about F(39, 39)-distributed, above 3 with probability 4.5·10⁻⁴ (simulated;
  the correct estimator's failure rate). The bound is ``cos(ĝ, g) ≥ 1/√(1 + 3·err64 + 0.01)`` in cosine
  terms (asserted too). Light: N = 300 (catches a zero or random-sign estimate: err ≥ 1); heavy (``montecarlo``):
  N = 6000 (catches a bias above about 0.15‖g‖).
* Sharper, per direction: ``zo``'s two-point differences against the exact float64 directional
  derivatives along the same directions (relative RMS error ≤ 0.1; measured 0.026 bfloat16, 0.004
  float16, 0.026 autocast), and ``fg-w``'s forward-mode derivatives likewise (≤ 0.05).
* Stochastic rounding is unbiased and reproducible, and a bfloat16 fine-tuning run with it reaches the
  float32 run's loss (``slow``).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import fwdgrad
from fwdgrad.derivatives.finite_difference import Perturbation, RoundingLedger, default_eps
from fwdgrad.estimators import recipe
from fwdgrad.estimators.rounding import stochastic_round_
from fwdgrad.models import build_model
from fwdgrad.models.localmixer import LocalMixer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread

#: label → (weights' dtype, autocast dtype or None)
PRECISIONS = {"bfloat16": (torch.bfloat16, None), "float16": (torch.float16, None),
              "autocast-bf16": (torch.float32, torch.bfloat16)}
ALL = {**PRECISIONS, "float32": (torch.float32, None), "float64": (torch.float64, None)}


def _context(autocast: torch.dtype | None):
    return torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)


def _mlp(dtype: torch.dtype, batch: int = 32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)
    return model.to(dtype), x.to(dtype), y


def _loss(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    return lambda m: F.cross_entropy(m(x).float(), y, reduction=reduction)  # the loss in float32


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def _grad64(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient in float64 on the same (rounded) weights and inputs."""
    m = copy.deepcopy(model).double()
    F.cross_entropy(m(x.double()), y).backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()])


# --- the weights, bit for bit, and the model's own Parameters -----------------------------------------


def _task(name: str, dtype: torch.dtype):
    """``(model, loss_fn)`` suited to recipe ``name`` (as tests/test_generic.py), in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
    torch.manual_seed(0)
    if recipe(name).needs == "local-heads":
        model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=2, channels=8, groups=2)
        x = torch.randn(6, 1, 4, 4, generator=g)
    elif recipe(name).needs in ("sequence-model", "diagonal-recurrence"):
        model = build_model("gru" if recipe(name).needs == "sequence-model" else "lif", (5, 3), 3, hidden=4)
        x = 3 * torch.randn(6, 5, 3, generator=g)
    else:
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(6, 5, generator=g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    model = model.to(dtype)
    x = x.to(dtype)
    return model, _loss(x, y, reduction)


def _estimator(name: str, **kw) -> fwdgrad.Estimator:
    options = recipe(name).options()
    if options is not None and "seed" in options:
        kw.setdefault("seed", 3)
    return fwdgrad.estimator(name, **kw)


@pytest.mark.parametrize("precision", list(ALL))
@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_a_grad_call_leaves_weights_bit_identical_and_the_parameters_in_place(name: str, precision: str) -> None:
    dtype, autocast = ALL[precision]
    model, loss_fn = _task(name, dtype)
    ids = [id(p) for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    with _context(autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loss = _estimator(name)(model, loss_fn)
        except fwdgrad.NonFiniteError as e:  # a refusal must be one line, name the reason, write nothing
            assert dtype == torch.float16 and "\n" not in str(e) and "float16" in str(e), str(e)
            assert all(p.grad is None for p in model.parameters())
            loss = None
    assert [id(p) for p in model.parameters()] == ids
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert p.dtype == b.dtype and torch.equal(p.detach().view(torch.uint8), b.view(torch.uint8))
    if loss is not None:
        assert torch.isfinite(loss)
        assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())


@pytest.mark.parametrize("precision", list(ALL))
@pytest.mark.parametrize("options", [{}, {"num_directions": 3}, {"one_sided": True}, {"tangents": "sphere"},
                                     {"tangents": "rademacher", "num_directions": 2}])
@pytest.mark.parametrize("name", ["zo", "zo-sign", "zo-cons"])
def test_zo_grad_calls_restore_bit_for_bit_over_many_seeds(name: str, options: dict, precision: str) -> None:
    """Large weights (|θ| up to 300, where bfloat16's ulp is 2) and tiny ones (|θ| ≪ ε): every entry kind
    rounding can lose; 20 seeds of directions."""
    dtype, autocast = ALL[precision]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-4, 3, 7).to(dtype))  # 1e-4 .. 1e3 times the init scale
    x, y = torch.randn(9, 7).to(dtype), torch.randint(0, 3, (9,))
    before = [p.detach().clone() for p in model.parameters()]
    for seed in range(20):
        with _context(autocast), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fwdgrad.estimator(name, seed=seed, **options)(model, _loss(x, y))
        assert all(torch.equal(p.view(torch.uint8), b.view(torch.uint8)) for p, b in zip(model.parameters(), before))


class _FailWhenPerturbed:
    """A loss that raises (or returns NaN) at its third evaluation: in the middle of a two-point pass."""

    def __init__(self, loss_fn, mode: str) -> None:
        self.loss_fn, self.mode, self.calls = loss_fn, mode, 0

    def __call__(self, m: nn.Module) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            if self.mode == "raise":
                raise RuntimeError("boom")
            return torch.tensor(float("nan"))
        return self.loss_fn(m)


@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_a_failing_loss_mid_perturbation_leaves_weights_bit_identical(precision: str, mode: str) -> None:
    model, x, y = _mlp(ALL[precision][0])
    before = _flat(model)
    est = fwdgrad.estimator("zo", num_directions=3, seed=0)
    with pytest.raises((RuntimeError, fwdgrad.NonFiniteError)):
        est(model, _FailWhenPerturbed(_loss(x, y), mode))
    assert torch.equal(_flat(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_the_ledger_restores_a_non_contiguous_parameter_and_keeps_about_a_byte_per_entry() -> None:
    w = nn.Parameter(torch.randn(40, 30).to(torch.bfloat16).t())  # a transposed view: not contiguous
    assert not w.is_contiguous()
    before = w.detach().clone()
    source = Perturbation("gaussian", [w], 1, torch.Generator().manual_seed(0))
    ledger = RoundingLedger([w])
    with torch.no_grad():
        ledger.perturb_(source, 0, 0.3, two_point=True)
        kept = ledger.saved_bytes
        source.add_(0, -0.6)
        source.add_(0, 0.3)
        assert not torch.equal(w, before)  # the chain alone does not come back ...
        ledger.patch_()
    assert torch.equal(w, before)  # ... the ledger does
    assert kept <= w.numel() / 2 + 0.05 * w.numel() * 10  # four bits per entry, few beyond them


def test_the_model_is_left_as_found_after_fused_half_precision_steps_with_lr_zero() -> None:
    """With ``lr = 0`` the exact restore leaves bfloat16 weights bit-identical over many fused steps (the
    float32 fused step folds the last +εz into the update and keeps float32's rounding drift instead)."""
    model, x, y = _mlp(torch.bfloat16)
    before = _flat(model)
    est = fwdgrad.estimator("zo", seed=0)
    for _ in range(30):
        est.sgd_step(model, _loss(x, y), lr=0.0)
    assert torch.equal(_flat(model), before)


# --- the step size, the warnings, autocast's cache ------------------------------------------------------


def test_the_default_eps_follows_the_compute_dtype() -> None:
    half, full = [torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)]
    assert default_eps(half) == 1e-2 and default_eps(full) == 1e-3
    assert default_eps([torch.zeros(2, dtype=torch.float16)]) == 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert default_eps(full) == 1e-2
    assert fwdgrad.estimator("zo", eps=1e-4).step_size(half) == 1e-4


def test_zo_under_autocast_sees_the_perturbed_weights() -> None:
    """autocast caches the cast weights for its whole region: without clearing the cache every difference
    is exactly zero (the forward sees the weights before the perturbation). Also: a fused step inside one
    autocast region, followed by a forward in the same region, sees the updated weights."""
    model, x, y = _mlp(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # fills the cache
        est = fwdgrad.estimator("zo", seed=0, num_directions=4)
        _, d, _ = est._differences("test", model, _loss(x, y), dict(model.named_parameters()))
        before = model(x).detach()
        fwdgrad.estimator("zo", seed=0).sgd_step(model, _loss(x, y), lr=0.5)
        after = model(x).detach()
    assert bool((d != 0).all())
    assert not torch.equal(before, after)


def test_half_precision_warns_once_for_a_lost_perturbation_and_for_a_half_precision_loss() -> None:
    model, x, y = _mlp(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.mul_(8)  # |θ| up to ~3: bfloat16's half ulp is above 1e-3 · |z| for most entries
    est = fwdgrad.estimator("zo", eps=1e-3, seed=0)
    with pytest.warns(UserWarning, match=r"of the perturbed entries round back to θ at eps=0.001") as seen:
        est(model, lambda m: F.cross_entropy(m(x), y))
        est(model, lambda m: F.cross_entropy(m(x), y))
    messages = [str(w.message) for w in seen]
    assert sum("round back" in m for m in messages) == 1
    assert sum("loss_fn returns a torch.bfloat16 loss" in m for m in messages) == 1
    assert all("\n" not in m for m in messages)
    model, x, y = _mlp(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default eps and a float32 loss: silent (10 % round back here)
        fwdgrad.estimator("zo", seed=0)(model, _loss(x, y))


# --- accuracy against float64 ---------------------------------------------------------------------------


def _mean_estimate(name: str, model: nn.Module, x, y, n: int, autocast, calls: int = 1) -> torch.Tensor:
    """The mean of ``n`` estimates: one call with ``n / calls`` directions, ``calls`` times."""
    for p in model.parameters():
        p.grad = None
    est = fwdgrad.estimator(name, num_directions=n // calls, seed=1)
    with _context(autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(calls):
            est(model, _loss(x, y))
    grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    assert all(p.grad.dtype == p.dtype for p in model.parameters())  # .grad in the parameters' dtype
    return grads / calls


def _err(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).pow(2).sum() / truth.pow(2).sum())


def _check_accuracy(name: str, precision: str, n: int, calls: int = 1) -> None:
    dtype, autocast = PRECISIONS[precision]
    model, x, y = _mlp(dtype)
    truth = _grad64(model, x, y)
    half = _mean_estimate(name, model, x, y, n, autocast, calls)
    reference = _mean_estimate(name, copy.deepcopy(model).double(), x.double(), y, n, None, calls)
    err, err64 = _err(half, truth), _err(reference, truth)
    cos = float(F.cosine_similarity(half, truth, 0))
    assert err <= 3 * err64 + 0.01, (err, err64, cos)
    assert cos >= 1 / math.sqrt(1 + 3 * err64 + 0.01)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", ["zo", "fg-w", "fg-a"])
def test_the_mean_estimate_matches_the_float64_gradient_light(name: str, precision: str) -> None:
    _check_accuracy(name, precision, 300)


@pytest.mark.parametrize("precision", ["bfloat16", "autocast-bf16"])
def test_fg_w_fast_path_one_direction_per_call_matches_the_float64_gradient(precision: str) -> None:
    """K = 1 per call: the windowed fast path (the one that failed under autocast), 200 calls."""
    _check_accuracy("fg-w", precision, 200, calls=200)


@pytest.mark.montecarlo
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", ["zo", "fg-w", "fg-a"])
def test_the_mean_estimate_matches_the_float64_gradient_heavy(name: str, precision: str) -> None:
    _check_accuracy(name, precision, 6000)


def _exact_derivatives(model: nn.Module, x, y, directions: list[torch.Tensor]) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    p64 = {n: p.detach() for n, p in m64.named_parameters()}
    names = list(p64)

    def f(ps: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(m64, ps, (x.double(),)), y)

    k_total = directions[0].shape[0]
    return torch.stack([jvp(f, (p64,), ({n: directions[i][k].double() for i, n in enumerate(names)},))[1]
                        for k in range(k_total)])


def _relative_rms(d: torch.Tensor, exact: torch.Tensor) -> float:
    return float((d.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_zo_differences_match_the_exact_float64_directional_derivatives(precision: str) -> None:
    dtype, autocast = PRECISIONS[precision]
    model, x, y = _mlp(dtype)
    est = fwdgrad.estimator("zo", num_directions=64, seed=2)
    with _context(autocast):
        _, d, source = est._differences("test", model, _loss(x, y), dict(model.named_parameters()))
    assert d.dtype == torch.float32  # formed in float32, whatever the loss's dtype
    assert _relative_rms(d, _exact_derivatives(model, x, y, source.materialise())) <= 0.1


@pytest.mark.parametrize("tangents", ["gaussian", "rank1"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_fg_w_derivatives_match_the_exact_float64_ones(precision: str, tangents: str) -> None:
    dtype, autocast = PRECISIONS[precision]
    model, x, y = _mlp(dtype)
    est = fwdgrad.estimator("fg-w", num_directions=16, tangents=tangents, seed=2)
    with _context(autocast):
        grad = est.step(model, _loss(x, y), dict(model.named_parameters()))
    directions = [grad.source.materialise_one(i) for i in range(len(grad.source.primals))]
    assert _relative_rms(grad.dirs, _exact_derivatives(model, x, y, directions)) <= 0.05


# --- the fused step: rounding an update into bfloat16 ---------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_reproducible() -> None:
    target = torch.full((20_000,), 0.3, dtype=torch.bfloat16)
    value = target.float() + 2.0**-13  # far below bfloat16's ulp at 0.3 (2^-9): nearest would lose it
    assert torch.equal(value.to(torch.bfloat16), target)
    a, b = target.clone(), target.clone()
    stochastic_round_(a, value, seed=5)
    stochastic_round_(b, value, seed=5)
    assert torch.equal(a, b)
    # mean of a Bernoulli(1/16) times an ulp: within 5 standard errors of the update
    ulp = 2.0**-10 * 2  # 0.3 lies in [0.25, 0.5): ulp 2^-2 · 2^-7
    p = 2.0**-13 / ulp
    mean = float(a.float().mean() - target.float().mean())
    assert abs(mean - 2.0**-13) <= 5 * ulp * math.sqrt(p * (1 - p) / a.numel())
    exact = torch.tensor([0.25, -1.0, float("inf")])
    out = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_(out, exact, seed=0)
    assert out.float().tolist() == exact.tolist()


def test_fused_stochastic_rounding_is_reproducible_and_refused_where_it_does_not_apply() -> None:
    runs = []
    for _ in range(2):
        model, x, y = _mlp(torch.bfloat16)
        est = fwdgrad.estimator("zo", seed=4, rounding="stochastic")
        for _ in range(5):
            est.sgd_step(model, _loss(x, y), lr=1e-3)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match=r"^ZerothOrderConservative: rounding='stochastic' is not available: its"):
        fwdgrad.estimator("zo-cons", rounding="stochastic")
    with pytest.raises(ValueError, match=r"rounding must be one of \('nearest', 'stochastic'\), got 'up'"):
        fwdgrad.estimator("zo", rounding="up")
    model, x, y = _mlp(torch.bfloat16)
    with pytest.raises(ValueError, match=r"rounding='stochastic' is for the plain fused step"):
        fwdgrad.estimator("zo", rounding="stochastic").sgd_step(model, _loss(x, y), lr=1e-3, momentum=0.9)


@pytest.mark.slow
def test_a_bfloat16_finetuning_run_reaches_the_float32_loss(monkeypatch) -> None:
    """MLP 16-32-4 on a fixed generated task (a random teacher's labels; ``benchmarks/zo_precision.py``'s
    ``train``), 1500 fused ``zo`` steps at lr 0.02, batch 64, the same seeds: bfloat16 with stochastic
    rounding ends within 0.05 of float32's loss (measured: see docs/precision.md), and well below the
    starting loss (1.569)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from zo_precision import train

    full = train(torch.float32, "nearest", 1500, 0.02)
    half = train(torch.bfloat16, "stochastic", 1500, 0.02)
    assert half <= full + 0.05, (half, full)
    assert full < 0.6


def test_zo_cons_keeps_theta_bit_for_bit_in_bfloat16_when_no_candidate_is_better() -> None:
    """A step so large that both candidates lose: ZO-SGD-Cons keeps θ, and in bfloat16 (where the moves
    there and back round by about their own size) it comes back bit for bit."""
    model, x, y = _mlp(torch.bfloat16)
    before = _flat(model)
    fwdgrad.estimator("zo-cons", seed=0).sgd_step(model, _loss(x, y), lr=1e3)
    assert torch.equal(_flat(model), before)
