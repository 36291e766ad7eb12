"""Exact checks in float64: every JVP fwdgrad forms equals torch.autograd's ∇f·v to 1e-10."""

from __future__ import annotations

import pytest
import torch

import fwdgrad
from fwdgrad.derivatives import call_with_parameters
from fwdgrad.directions import SAMPLERS
from fwdgrad.functional import directional_derivatives
from problems import PROBLEMS, Problem, autograd_gradient, directional

TOL = 1e-10
SAMPLER_NAMES = sorted(SAMPLERS)


def _setup(problem: Problem):
    model = problem.model()
    params = {n: p for n, p in model.named_parameters()}
    return model, params


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
@pytest.mark.parametrize("chunk_size", [1, 2, None], ids=["one-by-one", "chunks-of-2", "all-at-once"])
def test_directional_derivatives_equal_autograd(problem: Problem, chunk_size: int | None) -> None:
    model, params = _setup(problem)
    names, primals = list(params), [p.detach() for p in params.values()]
    grads = autograd_gradient(model, problem.loss_fn)
    g = torch.Generator().manual_seed(1)
    tangents = SAMPLERS["gaussian"](primals, 5, g)

    def f(xs):
        return call_with_parameters(model, problem.loss_fn, dict(zip(names, xs)))

    value, dirs, _ = directional_derivatives(f, primals, tangents, chunk_size=chunk_size)
    expected = torch.stack([directional(grads, [t[k] for t in tangents]) for k in range(5)])
    assert dirs.shape == (5,)
    torch.testing.assert_close(dirs, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(value, problem.loss_fn(model).detach(), rtol=0, atol=TOL)


@pytest.mark.parametrize("tangents", SAMPLER_NAMES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_estimator_writes_mean_of_jvp_times_tangent(problem: Problem, tangents: str) -> None:
    """``ForwardGradient`` draws ``SAMPLERS[tangents](params, K, generator)`` and writes
    ``(1/K) Σ (∇f·v_k) v_k`` into ``.grad``; replaying the generator reproduces the tangents."""
    model, params = _setup(problem)
    grads = autograd_gradient(model, problem.loss_fn)
    gen = torch.Generator().manual_seed(7)
    replay = torch.Generator().set_state(gen.get_state())
    est = fwdgrad.ForwardGradient(num_directions=3, tangents=tangents, generator=gen)
    loss = est(model, problem.loss_fn)

    tangent_list = SAMPLERS[tangents]([p.detach() for p in params.values()], 3, replay)
    dirs = [directional(grads, [t[k] for t in tangent_list]) for k in range(3)]
    for p, t in zip(params.values(), tangent_list):
        expected = sum(d * t[k] for k, d in enumerate(dirs)) / 3
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=TOL)
    assert loss.requires_grad is False


@pytest.mark.parametrize("structure", ["dict", "tuple", "list"])
def test_forward_grad_on_pytrees(structure: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)

    def loss(w, b):
        return torch.tanh(x @ w + b).pow(2).sum()

    wrap = {"dict": lambda a, b: {"w": a, "b": b}, "tuple": lambda a, b: (a, b), "list": lambda a, b: [a, b]}[structure]
    unwrap = {"dict": lambda p: (p["w"], p["b"]), "tuple": tuple, "list": tuple}[structure]

    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator().set_state(gen.get_state())
    value, est, aux = fwdgrad.forward_grad(
        lambda p: (loss(*unwrap(p)), "aux"), wrap(w, b), num_directions=4, tangents="rademacher",
        generator=gen, has_aux=True, chunk_size=3,
    )
    wg, bg = torch.func.grad(loss, argnums=(0, 1))(w, b)
    tw, tb = SAMPLERS["rademacher"]([w, b], 4, replay)
    d = torch.stack([(wg * tw[k]).sum() + (bg * tb[k]).sum() for k in range(4)])
    assert type(est) is type(wrap(w, b)) and aux == "aux"
    ew, eb = unwrap(est)
    torch.testing.assert_close(ew, torch.einsum("k,kij->ij", d, tw) / 4, rtol=0, atol=TOL)
    torch.testing.assert_close(eb, torch.einsum("k,ki->i", d, tb) / 4, rtol=0, atol=TOL)
    torch.testing.assert_close(value, loss(w, b), rtol=0, atol=TOL)


def test_backprop_estimator_equals_autograd() -> None:
    problem = PROBLEMS[0]
    model = problem.model()
    grads = autograd_gradient(model, problem.loss_fn)
    fwdgrad.estimator("bp")(model, problem.loss_fn)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=TOL)


def test_tied_weights_get_one_gradient() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Linear(4, 4, bias=False)
            self.dec = torch.nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    loss_fn = lambda m: m(x).pow(2).mean()
    (grad,) = autograd_gradient(model, loss_fn)
    gen = torch.Generator().manual_seed(0)
    replay = torch.Generator().set_state(gen.get_state())
    fwdgrad.ForwardGradient(generator=gen)(model, loss_fn)
    (t,) = SAMPLERS["gaussian"]([model.enc.weight.detach()], 1, replay)
    torch.testing.assert_close(model.enc.weight.grad, (grad * t[0]).sum() * t[0], rtol=0, atol=TOL)
