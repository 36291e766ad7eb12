"""The estimator contract: no backward pass, torch.optim interop, accumulation, seeds, buffers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from problems import PROBLEMS, NoBackwardNet


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = x @ w
    return x, y


@pytest.mark.parametrize("num_directions", [1, 4])
def test_fg_w_never_runs_a_backward_pass(num_directions: int) -> None:
    x, y = _regression()
    torch.manual_seed(0)
    model = NoBackwardNet()
    loss_fn = lambda m: F.mse_loss(m(x), y)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    est = fwdgrad.estimator("fg-w", num_directions=num_directions, tangents="rademacher", seed=0)
    first = loss_fn(model).item()
    for _ in range(150):
        opt.zero_grad()
        est(model, loss_fn)
        opt.step()
    assert loss_fn(model).item() < 0.7 * first


def test_the_no_backward_model_does_fail_with_backprop() -> None:
    x, y = _regression()
    with pytest.raises(RuntimeError, match="a backward pass happened"):
        fwdgrad.estimator("bp")(NoBackwardNet(), lambda m: F.mse_loss(m(x), y))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: (torch.optim.SGD(p, lr=0.01, momentum=0.9), None),
        lambda p: (torch.optim.Adam(p, lr=0.01), None),
        lambda p: (opt := torch.optim.Adam(p, lr=0.02), torch.optim.lr_scheduler.StepLR(opt, 100, 0.5)),
    ],
    ids=["sgd-momentum", "adam", "adam+steplr"],
)
def test_torch_optimizers_and_schedulers_reduce_the_loss(make_opt) -> None:
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = lambda m: F.mse_loss(m(x), y)
    opt, sched = make_opt(model.parameters())
    est = fwdgrad.estimator("fg-w", num_directions=4, seed=0)
    first = loss_fn(model).item()
    for _ in range(300):
        opt.zero_grad()
        est(model, loss_fn)
        opt.step()
        if sched is not None:
            sched.step()
    assert loss_fn(model).item() < 0.5 * first
    if sched is not None:
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**3)


@pytest.mark.parametrize("name", ["fg-w", "bp"])
def test_two_calls_without_zero_grad_sum_like_two_backward_passes(name: str) -> None:
    problem = PROBLEMS[0]
    separate = []
    model = problem.model()
    est = fwdgrad.estimator(name, **({"seed": 5} if name == "fg-w" else {}))
    for _ in range(2):
        model.zero_grad()
        est(model, problem.loss_fn)
        separate.append([p.grad.clone() for p in model.parameters()])

    model = problem.model()
    est = fwdgrad.estimator(name, **({"seed": 5} if name == "fg-w" else {}))
    est(model, problem.loss_fn)
    est(model, problem.loss_fn)
    for p, a, b in zip(model.parameters(), *separate):
        torch.testing.assert_close(p.grad, a + b, rtol=0, atol=1e-12)


def test_a_fixed_seed_reproduces_a_training_run_bit_for_bit() -> None:
    x, y = _regression()

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        est = fwdgrad.estimator("fg-w", num_directions=2, tangents="gaussian", seed=seed)
        for _ in range(20):
            opt.zero_grad()
            est(model, lambda m: F.mse_loss(m(x), y))
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_global_rng_is_used_without_seed_and_respects_manual_seed() -> None:
    problem = PROBLEMS[0]
    grads = []
    for _ in range(2):
        model = problem.model()
        torch.manual_seed(123)
        fwdgrad.estimator("fg-w")(model, problem.loss_fn)
        grads.append(model[0].weight.grad)
    assert torch.equal(*grads)


def test_buffers_update_as_in_one_normal_forward() -> None:
    problem = next(p for p in PROBLEMS if p.id == "batchnorm")
    model = problem.model()
    reference = copy.deepcopy(model)
    fwdgrad.estimator("fg-w", seed=0)(model, problem.loss_fn)
    with torch.no_grad():
        reference(problem.x)
    for (name, buf), ref in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buf, ref, rtol=0, atol=1e-12, msg=name)


def test_loss_is_returned_detached_and_parameters_are_restored() -> None:
    problem = PROBLEMS[1]
    model = problem.model()
    before = {n: p for n, p in model.named_parameters()}
    loss = fwdgrad.estimator("fg-w", num_directions=3, seed=0)(model, problem.loss_fn)
    torch.testing.assert_close(loss, problem.loss_fn(model).detach())
    assert not loss.requires_grad
    assert all(p is before[n] and isinstance(p, nn.Parameter) for n, p in model.named_parameters())


def test_frozen_parameters_are_left_alone() -> None:
    problem = PROBLEMS[0]
    model = problem.model()
    model[0].weight.requires_grad_(False)
    fwdgrad.estimator("fg-w", seed=0)(model, problem.loss_fn)
    assert model[0].weight.grad is None
    assert model[0].bias.grad is not None


def test_registry_lists_and_builds_estimators() -> None:
    assert {"bp", "fg-w"} <= set(fwdgrad.available_estimators())
    est = fwdgrad.estimator("fg-w", num_directions=2, tangents="rank1", seed=1)
    assert isinstance(est, fwdgrad.ForwardGradient) and est.num_directions == 2
    assert fwdgrad.estimator_class("bp") is fwdgrad.Backprop

    @fwdgrad.register_estimator("test-scaled-bp")
    class ScaledBackprop(fwdgrad.Backprop):
        pass

    try:
        assert isinstance(fwdgrad.estimator("test-scaled-bp"), ScaledBackprop)
    finally:
        from fwdgrad.estimators import registry

        del registry._REGISTRY["test-scaled-bp"]
