"""The lean paths of issue 9: tangents drawn per direction, K directions in chunks, ``.grad`` written in place.

Exactness only (float64, 1e-10): every lean path gives the reference estimate for the same seed. No timing.
"""

from __future__ import annotations

import pytest
import torch

import fwdgrad
from fwdgrad.derivatives import uses_fast_loop
from fwdgrad.directions import (
    SAMPLERS,
    TangentSource,
    direction_seed,
    draw_direction,
    draw_tensor,
    scratch_size,
)
from fwdgrad.directions import source as source_module
from fwdgrad.estimators.gradient import ImplicitGradient
from problems import PROBLEMS, Problem

TOL = 1e-10
DENSE = ["gaussian", "rademacher"]


@pytest.mark.parametrize("name", DENSE)
def test_a_block_is_its_directions_drawn_alone_and_one_direction_is_the_old_draw(name: str) -> None:
    like = torch.zeros(5, 3, dtype=torch.float64)
    block = draw_tensor(name, like, 4, seed=123)
    for k in range(4):
        assert torch.equal(block[k], draw_direction(name, like, 123, k))
    # K = 1 is what a generator seeded with the tensor's seed draws (the numbers from before issue 9)
    if name == "gaussian":
        old = torch.randn((1, 5, 3), generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        assert torch.equal(draw_tensor(name, like, 1, seed=123), old)
    assert direction_seed(123, 0) == 123
    # the CPU generator keys on the low 32 bits of a seed: successive directions differ there
    assert len({direction_seed(123, k) % 2**32 for k in range(1000)}) == 1000


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_draw_into_a_scratch_buffer_is_the_same_draw(name: str, dtype: torch.dtype) -> None:
    buf = torch.full((40,), 7.0, dtype=dtype)
    for shape in [(5, 3), (8,), (2, 2, 2), (1,)]:  # sizes that are and are not multiples of 8
        like = torch.zeros(shape, dtype=dtype)
        assert scratch_size(like) % 8 == 0 and scratch_size(like) >= like.numel()
        for k in (0, 2):
            got = draw_direction(name, like, 99, k, out=buf)
            assert got.data_ptr() == buf.data_ptr() and got.shape == like.shape
            assert torch.equal(got, draw_direction(name, like, 99, k))


def test_a_bad_scratch_buffer_raises_naming_it() -> None:
    like = torch.zeros(5, 3)
    for name, out in [("rademacher", torch.zeros(15)), ("gaussian", torch.zeros(14)),
                      ("gaussian", torch.zeros(16, dtype=torch.float64)), ("gaussian", torch.zeros(4, 4))]:
        with pytest.raises(ValueError, match=r"^fwdgrad.directions.draw_direction: out must be a flat"):
            draw_direction(name, like, 1, 0, out=out)
    exact = torch.zeros(15)  # a Gaussian draw needs only numel entries (a lent .grad's storage)
    assert draw_direction("gaussian", like, 1, 0, out=exact).data_ptr() == exact.data_ptr()


@pytest.mark.parametrize("name", DENSE)
def test_a_lean_source_draws_chunks_equal_to_the_sampler(name: str) -> None:
    like = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    want = SAMPLERS[name](like, 5, torch.Generator().manual_seed(2))
    lean = TangentSource(name, like, 5, torch.Generator().manual_seed(2), lean=True)
    for i in range(2):
        assert torch.equal(lean.chunk(i, 1, 4), want[i][1:4])
        assert torch.equal(lean.direction(i, 4), want[i][4])
    assert all(torch.equal(a, b) for a, b in zip(lean.materialise(), want))


@pytest.mark.parametrize("name", ["gaussian", "rademacher", "rank1"])
@pytest.mark.parametrize("k", [1, 3])
def test_accumulate_into_an_existing_grad_adds_the_estimate_in_place(name: str, k: int) -> None:
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    dirs = torch.tensor([0.5, -2.0, 1.5][:k], dtype=torch.float64)

    def estimate(lean: bool) -> torch.Tensor:
        src = TangentSource(name, [w.detach()], k, torch.Generator().manual_seed(4), lean=lean)
        return sum(dirs[j] * src.dense(0, j) for j in range(k)) / k

    for lean in (False, True) if name != "rank1" else (False,):
        w.grad = torch.ones_like(w)
        storage = w.grad.data_ptr()
        src = TangentSource(name, [w.detach()], k, torch.Generator().manual_seed(4), lean=lean)
        ImplicitGradient(torch.tensor(1.0), dirs, src).accumulate("t", [w])
        assert w.grad.data_ptr() == storage  # added in place, no new .grad
        torch.testing.assert_close(w.grad, 1 + estimate(lean), rtol=0, atol=TOL)
        w.grad = None
        src = TangentSource(name, [w.detach()], k, torch.Generator().manual_seed(4), lean=lean)
        ImplicitGradient(torch.tensor(1.0), dirs, src).accumulate("t", [w])
        torch.testing.assert_close(w.grad, estimate(lean), rtol=0, atol=TOL)


@pytest.mark.parametrize("bad", ["loss", "dirs"])
def test_nothing_is_written_into_an_existing_grad_when_not_finite(bad: str) -> None:
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    w.grad = torch.full_like(w, 7.0)
    loss = torch.tensor(float("nan") if bad == "loss" else 1.0)
    dirs = torch.tensor([1.0, float("inf") if bad == "dirs" else 1.0])
    src = TangentSource("gaussian", [w.detach()], 2, torch.Generator().manual_seed(0), lean=True)
    with pytest.raises(fwdgrad.NonFiniteError, match="nothing was written"):
        ImplicitGradient(loss, dirs, src).accumulate("t", [w])
    assert torch.equal(w.grad, torch.full_like(w, 7.0))


def test_keeping_tangents_only_where_it_is_cheaper() -> None:
    cpu = [torch.zeros(1 << 22)]  # 16 MiB: above KEEP_SMALL_BYTES
    keep = TangentSource.worth_keeping
    assert keep("rademacher", 4, [torch.zeros(2)], grads_unset=False, chunk_size=1)  # small: always kept
    assert keep("gaussian", 1, cpu, grads_unset=True)  # the spent tangent becomes .grad
    assert not keep("gaussian", 1, cpu, grads_unset=False)  # .grad kept: drawn again, memory bounded
    assert not keep("rademacher", 1, cpu, grads_unset=False)
    assert keep("gaussian", 4, cpu, grads_unset=False)  # one chunk holds them all anyway
    assert not keep("gaussian", 4, cpu, grads_unset=False, chunk_size=1)  # chunked: memory bounded by the chunk
    assert keep("sphere", 4, cpu, grads_unset=False, chunk_size=1)  # joint: cannot be drawn again
    assert uses_fast_loop("gaussian", 4, chunk_size=1) and uses_fast_loop("gaussian", 4)  # batched pass
    assert not uses_fast_loop("sphere", 4) and not uses_fast_loop("given", 4)


def _estimate(problem: Problem, *, fast: bool, tangents: str, k: int, chunk_size: int | None, grad_set: bool):
    model = problem.model()
    if grad_set:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    est = fwdgrad.ForwardGradient(k, tangents, seed=5, chunk_size=chunk_size, fast_paths=fast)
    est(model, problem.loss_fn)
    return [p.grad for p in model.parameters()], list(model.buffers())


@pytest.mark.parametrize("keep_small", [True, False], ids=["small-kept", "lean"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("tangents", [*DENSE, "rank1"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_k_directions_in_chunks_equal_the_reference_for_the_same_seed(
    problem: Problem, tangents: str, chunk_size, keep_small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not keep_small:  # the test models are small: make them draw their tangents again, as large ones do
        monkeypatch.setattr(source_module, "KEEP_SMALL_BYTES", 0)
    ref, ref_buffers = _estimate(problem, fast=False, tangents=tangents, k=3, chunk_size=None, grad_set=False)
    for fast in (True, False):
        got, buffers = _estimate(problem, fast=fast, tangents=tangents, k=3, chunk_size=chunk_size, grad_set=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        for a, b in zip(buffers, ref_buffers):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def _zeroed_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tangents", DENSE)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_a_zero_grad_holds_the_tangent_and_ends_as_the_estimate(
    problem: Problem, tangents: str, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero_grad(set_to_none=False): each tangent is drawn into its .grad and scaled there; the same .grad
    tensors end holding the estimate a None .grad gets (float64, 1e-10)."""
    monkeypatch.setattr(source_module, "KEEP_SMALL_BYTES", 0)  # the test models are small: lend as large ones do
    want_model = problem.model()
    fwdgrad.ForwardGradient(1, tangents, seed=8, fast_paths=False)(want_model, problem.loss_fn)
    model = problem.model()
    grads = _zeroed_grads(model)
    storage = [g.data_ptr() for g in grads]
    est = fwdgrad.ForwardGradient(1, tangents, seed=8, fast_paths=fast)
    assert est._zero_grads(dict(model.named_parameters())) is not None
    est(model, problem.loss_fn)
    assert [p.grad for p in model.parameters()] == grads and [g.data_ptr() for g in grads] == storage
    for p, q in zip(model.parameters(), want_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=TOL)
    est(model, problem.loss_fn)  # .grad no longer zero: the next estimate is added, drawn again
    assert est._zero_grads(dict(model.named_parameters())) is None


@pytest.mark.parametrize("fail", ["nan", "raises"])
def test_a_lent_zero_grad_is_zero_again_when_the_step_fails(fail: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "KEEP_SMALL_BYTES", 0)
    problem = PROBLEMS[0]
    model = problem.model()
    grads = _zeroed_grads(model)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        loss = problem.loss_fn(m)
        if fail == "raises":
            raise RuntimeError("user error after the forward")
        return loss * float("nan")

    with pytest.raises(fwdgrad.NonFiniteError if fail == "nan" else RuntimeError):
        fwdgrad.ForwardGradient(1, "gaussian", seed=1)(model, loss_fn)
    assert [p.grad for p in model.parameters()] == grads
    assert all(not g.any() for g in grads)


def test_a_grad_is_lent_only_when_every_grad_is_zero_and_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = PROBLEMS[0].model()
    _zeroed_grads(model)
    assert fwdgrad.ForwardGradient(1, "gaussian", seed=1)._zero_grads(dict(model.named_parameters())) is None  # small
    monkeypatch.setattr(source_module, "KEEP_SMALL_BYTES", 0)
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    est = fwdgrad.ForwardGradient(1, "gaussian", seed=1)
    assert est._zero_grads(params) is None  # None .grads: the spent tangent becomes .grad anyway
    grads = _zeroed_grads(model)
    assert est._zero_grads(params) == grads
    grads[-1][0] = 1e-30
    assert est._zero_grads(params) is None
    grads[-1].zero_()
    first = next(iter(params.values()))
    first.grad = torch.zeros(first.shape[::-1], dtype=first.dtype).T  # not contiguous
    assert est._zero_grads(params) is None
    first.grad = torch.zeros_like(first)
    for other in (fwdgrad.ForwardGradient(2, "gaussian", seed=1), fwdgrad.ForwardGradient(1, "rank1", seed=1),
                  fwdgrad.ForwardGradient(1, "gaussian", seed=1, directions="momentum")):
        assert other._zero_grads(params) is None


def test_a_lent_zero_grad_survives_the_fall_back_to_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "KEEP_SMALL_BYTES", 0)
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")

    def penalised(model: torch.nn.Module) -> torch.Tensor:  # a weight used outside its module: reference path
        return problem.loss_fn(model) + 0.1 * model[0].weight.pow(2).sum()

    want_model, model = problem.model(), problem.model()
    fwdgrad.ForwardGradient(1, "rademacher", seed=2, fast_paths=False)(want_model, penalised)
    _zeroed_grads(model)
    fwdgrad.ForwardGradient(1, "rademacher", seed=2)(model, penalised)
    for p, q in zip(model.parameters(), want_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=TOL)
    for a, b in zip(model.buffers(), want_model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_an_error_of_the_users_forward_reaches_the_caller_and_the_forward_is_not_run_again() -> None:
    """The batched fast path gives way to another path only when vmap cannot batch an operation; a
    RuntimeError of the user's own code is raised, not swallowed with the forward then run a second time."""
    calls = []

    class Failing(torch.nn.Sequential):
        def forward(self, x):
            calls.append(1)
            raise RuntimeError("the user's forward failed")

    model = Failing(torch.nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for options in ({"num_directions": 2}, {"num_directions": 3, "tangents": "rank1"}):
        calls.clear()
        with pytest.raises(RuntimeError, match="the user's forward failed"):
            fwdgrad.estimator("fg-w", seed=0, **options)(model, lambda m: m(x).sum())
        assert len(calls) == 1, options
