"""The tangent engine: every fast path gives the reference path's estimate for the same seed (float64,
1e-10), falls back for what it does not handle, and the fused SGD step equals ``.grad`` + ``torch.optim.SGD``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad import derivatives
from fwdgrad.derivatives.batched import batched_directions
from fwdgrad.directions import PER_TENSOR_SAMPLERS, SAMPLERS, TangentSource
from fwdgrad.estimators import gradient
from problems import PROBLEMS, Problem

TOL = 1e-10
PER_TENSOR = list(PER_TENSOR_SAMPLERS)


def _grads(model: nn.Module, loss_fn, *, fast: bool, tangents: str, k: int, seed: int = 11) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    est = fwdgrad.ForwardGradient(num_directions=k, tangents=tangents, seed=seed, fast_paths=fast)
    est(model, loss_fn)
    return [p.grad for p in model.parameters() if p.requires_grad]


def _assert_fast_equals_reference(make_model, loss_fn, tangents: str, k: int) -> None:
    fast_model, ref_model = make_model(), make_model()
    fast = _grads(fast_model, loss_fn, fast=True, tangents=tangents, k=k)
    ref = _grads(ref_model, loss_fn, fast=False, tangents=tangents, k=k)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    for a, b in zip(fast_model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tangents", PER_TENSOR)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_fast_path_equals_reference_path(problem: Problem, tangents: str, k: int) -> None:
    _assert_fast_equals_reference(problem.model, problem.loss_fn, tangents, k)


def _seeded(make):
    def build():
        torch.manual_seed(0)
        return make().double()

    return build


class TwiceAndTied(nn.Module):
    """One Linear applied twice, a tied decoder, a frozen weight with a trainable bias, a plain parameter
    used in the root's forward, and a grouped, strided, dilated convolution without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.square = nn.Linear(6, 6)
        self.enc = nn.Linear(6, 5)
        self.dec = nn.Linear(5, 6, bias=False)
        self.frozen = nn.Linear(6, 3)
        self.frozen.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.full((3,), 0.5))
        self.enc2 = nn.Linear(6, 5, bias=False)
        self.enc2.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        h = torch.tanh(self.square(torch.tanh(self.square(h))))
        h = self.dec(torch.tanh(self.enc(h))) + self.enc2(h).sum(-1, keepdim=True)
        return self.frozen(h) * self.scale


def _twice_and_tied_loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, 9, 9, generator=g, dtype=torch.float64)
    return model(x).pow(2).mean()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tangents", PER_TENSOR)
def test_fast_path_handles_reuse_ties_frozen_weights_and_grouped_convs(tangents: str, k: int) -> None:
    _assert_fast_equals_reference(_seeded(TwiceAndTied), _twice_and_tied_loss, tangents, k)


def test_the_mlp_and_cnn_problems_stay_on_the_fast_path() -> None:
    for problem in PROBLEMS:
        model = problem.model()
        params = dict(model.named_parameters())
        source = TangentSource("rank1", [p.detach() for p in params.values()], 2, torch.Generator())
        assert derivatives.fast_directions(model, problem.loss_fn, params, source, where="t") is not None, problem.id


def test_a_parameter_used_outside_its_module_falls_back_with_buffers_restored() -> None:
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")

    def penalised(model: nn.Module) -> torch.Tensor:
        return problem.loss_fn(model) + 0.1 * model[0].weight.pow(2).sum()

    model = problem.model()
    params = dict(model.named_parameters())
    source = TangentSource("gaussian", [p.detach() for p in params.values()], 1, torch.Generator())
    before = [b.clone() for b in model.buffers()]
    assert derivatives.fast_directions(model, penalised, params, source, where="t") is None
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    for tangents in PER_TENSOR:
        _assert_fast_equals_reference(problem.model, penalised, tangents, 1)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_an_unhandled_module_with_its_own_parameters_uses_forward_ad() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x @ self.a) * self.b

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(Bilinear(), nn.LayerNorm(4), nn.Linear(4, 2)).double()

    x = torch.randn(7, 6, dtype=torch.float64)
    for tangents in PER_TENSOR:
        _assert_fast_equals_reference(make, lambda m: F.mse_loss(m(x), torch.zeros(7, 2, dtype=x.dtype)), tangents, 1)


@pytest.mark.parametrize("tangents", PER_TENSOR)
@pytest.mark.parametrize("k", [1, 3])
def test_lean_source_draws_what_the_sampler_draws_and_advances_the_generator_alike(tangents: str, k: int) -> None:
    like = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, 3, 3)]
    gen, replay = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    source = TangentSource(tangents, like, k, gen, lean=True)
    expected = SAMPLERS[tangents](like, k, replay)
    for got, want in zip(source.materialise(), expected):
        assert torch.equal(got, want)
    for i in range(len(like)):
        for j in range(k):
            assert torch.equal(source.dense(i, j), expected[i][j])
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=replay))


def test_lean_source_on_the_global_rng_replays_it() -> None:
    like = [torch.zeros(5, 2)]
    torch.manual_seed(9)
    source = TangentSource("gaussian", like, 1, None, lean=True)
    after = torch.rand(2)
    torch.manual_seed(9)
    (expected,) = SAMPLERS["gaussian"](like, 1, None)
    assert torch.equal(source.dense(0, 0), expected[0])
    assert torch.equal(after, torch.rand(2))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tangents", [*PER_TENSOR, "sphere"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_sgd_step_equals_grad_path_and_torch_sgd(tangents: str, k: int, weight_decay: float, fast: bool) -> None:
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")
    fused_model, model = problem.model(), problem.model()
    fused = fwdgrad.ForwardGradient(num_directions=k, tangents=tangents, seed=3, fast_paths=fast)
    plain = fwdgrad.ForwardGradient(num_directions=k, tangents=tangents, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(3):
        loss_fused = fused.sgd_step(fused_model, problem.loss_fn, lr=0.05, weight_decay=weight_decay)
        opt.zero_grad()
        loss = plain(model, problem.loss_fn)
        opt.step()
        torch.testing.assert_close(loss_fused, loss, rtol=0, atol=TOL)
    for a, b in zip(fused_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    for a, b in zip(fused_model.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    assert all(p.grad is None for p in fused_model.parameters())


def test_sgd_step_leaves_frozen_and_tied_parameters_right() -> None:
    build = _seeded(TwiceAndTied)
    fused_model, model = build(), build()
    frozen = fused_model.frozen.weight.detach().clone()
    fwdgrad.ForwardGradient(tangents="gaussian", seed=0).sgd_step(fused_model, _twice_and_tied_loss, lr=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    fwdgrad.ForwardGradient(tangents="gaussian", seed=0)(model, _twice_and_tied_loss)
    opt.step()
    assert torch.equal(fused_model.frozen.weight, frozen)
    assert fused_model.enc2.weight is fused_model.enc.weight
    for a, b in zip(fused_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"lr": 0.0}, r"^ForwardGradient.sgd_step: lr must be > 0, got 0.0"),
        ({"lr": -1}, r"^ForwardGradient.sgd_step: lr must be > 0, got -1"),
        ({"lr": float("nan")}, r"^ForwardGradient.sgd_step: lr must be a finite number, got nan"),
        ({"lr": 0.1, "weight_decay": -0.5}, r"^ForwardGradient.sgd_step: weight_decay must be >= 0, got -0.5"),
    ],
)
def test_sgd_step_rejects_bad_rates(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        fwdgrad.ForwardGradient(seed=0).sgd_step(nn.Linear(2, 1), lambda m: m(torch.ones(1, 2)).sum(), **kwargs)


@pytest.mark.parametrize("tangents", ["gaussian", "rank1", "orthogonal"])
def test_a_non_finite_sgd_step_changes_nothing(tangents: str) -> None:
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(fwdgrad.NonFiniteError, match=r"^ForwardGradient.sgd_step: the loss is nan"):
        fwdgrad.ForwardGradient(tangents=tangents, seed=0).sgd_step(
            model, lambda m: m(torch.ones(4, 3)).sum() * float("nan"), lr=0.1
        )
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_sgd_step_trains_a_small_regression() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = x @ torch.randn(6, 3, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = lambda m: F.mse_loss(m(x), y)
    est = fwdgrad.ForwardGradient(num_directions=4, tangents="rank1", seed=0)
    first = loss_fn(model).item()
    for _ in range(100):
        est.sgd_step(model, loss_fn, lr=0.05)
    assert loss_fn(model).item() < 0.5 * first


def test_parameters_are_restored_after_an_error_in_the_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    params = dict(model.named_parameters())

    def broken(m: nn.Module) -> torch.Tensor:
        m(torch.ones(2, 3))
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fwdgrad.ForwardGradient(seed=0)(model, broken)
    assert dict(model.named_parameters()) == params
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_tangent_source_rejects_joint_samplers() -> None:
    with pytest.raises(ValueError, match=r"^fwdgrad.directions.TangentSource: tangents 'sphere' are drawn jointly"):
        TangentSource("sphere", [torch.zeros(2)], 1, None, lean=True)


def test_deep_copy_of_a_model_after_a_step_is_clean() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    fwdgrad.ForwardGradient(tangents="rank1", seed=0)(model, lambda m: m(torch.ones(2, 3)).sum())
    clone = copy.deepcopy(model)
    assert all(type(p) is nn.Parameter for p in clone.parameters())


@pytest.mark.parametrize("name", ["gaussian", "rademacher"])
def test_per_tensor_draws_do_not_depend_on_threads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fwdgrad.directions import samplers

    like = [torch.zeros(40, 30), torch.zeros(30), torch.zeros(7, 3, 3, 3, dtype=torch.float64)]
    monkeypatch.setattr(samplers, "PARALLEL_DRAW_MIN", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SAMPLERS[name](like, 2, torch.Generator().manual_seed(5))
        torch.set_num_threads(2)
        two = SAMPLERS[name](like, 2, torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert [t.dtype for t in two] == [p.dtype for p in like]
    seeds = samplers.tensor_seeds(3, torch.Generator().manual_seed(5))
    assert torch.equal(samplers.draw_tensor(name, like[1], 2, seeds[1], "cpu"), one[1])


def _sequence_model() -> tuple[nn.Module, object]:
    """Linear layers on [B, T, in] inputs (the wide product's reshape) and a frozen-weight layer."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[2].weight.requires_grad_(False)
    x = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, lambda m: m(x).pow(2).mean()


@pytest.mark.parametrize("tangents", PER_TENSOR)
@pytest.mark.parametrize("case", ["mlp", "cnn", "twice-and-tied", "sequence"])
def test_k_directions_are_batched_in_one_pass_and_equal_the_reference(case: str, tangents: str) -> None:
    if case == "twice-and-tied":
        model, loss_fn = _seeded(TwiceAndTied)(), _twice_and_tied_loss
    elif case == "sequence":
        model, loss_fn = _sequence_model()
    else:
        problem = next(p for p in PROBLEMS if p.id == case)
        model, loss_fn = problem.model(), problem.loss_fn
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    primals = [p.detach() for p in params.values()]
    for lean in (False, True) if tangents != "rank1" else (False,):
        source = TangentSource(tangents, primals, 5, torch.Generator().manual_seed(1), lean=lean)
        for chunk_size in (None, 2):
            got = batched_directions(model, loss_fn, params, source, where="t", chunk_size=chunk_size)
            assert got is not None
            loss, dirs = derivatives.reference_directions(model, loss_fn, params, source.materialise(),
                                                          chunk_size=None, where="t")
            torch.testing.assert_close(got[1], dirs, rtol=0, atol=TOL)
            torch.testing.assert_close(got[0], loss, rtol=0, atol=TOL)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_dense_k_directions_take_the_batched_pass_or_the_reference_never_k_windowed_passes() -> None:
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")  # training mode: the batched pass declines
    model = problem.model()
    params = dict(model.named_parameters())
    source = TangentSource("gaussian", [p.detach() for p in params.values()], 3, torch.Generator())
    before = [b.clone() for b in model.buffers()]
    assert derivatives.fast_directions(model, problem.loss_fn, params, source, where="t") is None
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    model.eval()
    assert derivatives.fast_directions(model, problem.loss_fn, params, source, where="t") is not None


def test_batched_pass_declines_batchnorm_in_training_and_restores_its_buffers() -> None:
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")
    model = problem.model()
    params = dict(model.named_parameters())
    source = TangentSource("rank1", [p.detach() for p in params.values()], 3, torch.Generator())
    before = [b.clone() for b in model.buffers()]
    assert batched_directions(model, problem.loss_fn, params, source, where="t") is None
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    model.eval()
    assert batched_directions(model, problem.loss_fn, params, source, where="t") is not None


def test_fused_update_on_threads_equals_the_serial_one(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = PROBLEMS[0]
    models = [problem.model(), problem.model()]
    threads = torch.get_num_threads()
    try:
        for model, (n_threads, limit) in zip(models, [(1, 1 << 40), (2, 1)]):
            monkeypatch.setattr(gradient, "PARALLEL_DRAW_MIN", limit)
            torch.set_num_threads(n_threads)
            fwdgrad.ForwardGradient(tangents="gaussian", seed=2).sgd_step(model, problem.loss_fn, lr=0.1,
                                                                         weight_decay=0.01)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
