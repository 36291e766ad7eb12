"""Bad input gets a clear error that starts with the call it concerns and names the bad value, and
loses nothing: ``.grad`` is untouched when the loss or the estimate is not finite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fwdgrad

W = {"w": torch.ones(3)}
F_OK = lambda p: p["w"].sum()
LIN = nn.Linear(3, 2)
X = torch.ones(4, 3)
LOSS = lambda m: m(X).sum()

ERROR_TABLE = [
    # (id, call, exception, message pattern)
    ("fg-w num_directions=0", lambda: fwdgrad.estimator("fg-w", num_directions=0), ValueError,
     r"^ForwardGradient: num_directions must be >= 1, got 0"),
    ("fg-w num_directions=1.5", lambda: fwdgrad.estimator("fg-w", num_directions=1.5), TypeError,
     r"^ForwardGradient: num_directions must be an int >= 1, got 1\.5"),
    ("fg-w unknown tangents", lambda: fwdgrad.estimator("fg-w", tangents="cauchy"), ValueError,
     r"^ForwardGradient: unknown tangents 'cauchy'; choose one of \['gaussian'"),
    ("fg-w chunk_size=0", lambda: fwdgrad.estimator("fg-w", chunk_size=0), ValueError,
     r"^ForwardGradient: chunk_size must be >= 1, got 0"),
    ("fg-w seed and generator", lambda: fwdgrad.estimator("fg-w", seed=1, generator=torch.Generator()), ValueError,
     r"^ForwardGradient: give seed or generator, not both \(seed=1\)"),
    ("unknown estimator", lambda: fwdgrad.estimator("fg-x"), ValueError,
     r"^fwdgrad.estimator: unknown estimator 'fg-x'; available: \[.*'fg-w'"),
    ("register a taken name", lambda: fwdgrad.register_estimator("bp", fwdgrad.Backprop), ValueError,
     r"^fwdgrad.register_estimator: name 'bp' is taken by Backprop"),
    ("vector loss", lambda: fwdgrad.estimator("fg-w")(LIN, lambda m: m(X).sum(1)), ValueError,
     r"^ForwardGradient.__call__: loss_fn must return a real scalar tensor, got a tensor of shape \(4,\)"),
    ("non-tensor loss", lambda: fwdgrad.estimator("fg-w")(LIN, lambda m: 1.0), TypeError,
     r"^ForwardGradient.__call__: loss_fn must return a real scalar tensor, got float"),
    ("bp vector loss", lambda: fwdgrad.estimator("bp")(LIN, lambda m: m(X)), ValueError,
     r"^Backprop.__call__: loss_fn must return a real scalar tensor, got a tensor of shape \(4, 2\)"),
    ("no trainable parameter", lambda: fwdgrad.estimator("fg-w")(nn.ReLU(), LOSS), ValueError,
     r"^ForwardGradient.__call__: model ReLU has no parameter with requires_grad=True"),
    ("model not a module", lambda: fwdgrad.estimator("bp")(lambda x: x, LOSS), TypeError,
     r"^Backprop.__call__: model must be a torch.nn.Module, got function"),
    ("forward_grad num_directions=0", lambda: fwdgrad.forward_grad(F_OK, W, num_directions=0), ValueError,
     r"^fwdgrad.forward_grad: num_directions must be >= 1, got 0"),
    ("forward_grad tangents", lambda: fwdgrad.forward_grad(F_OK, W, tangents="normal"), ValueError,
     r"^fwdgrad.forward_grad: unknown tangents 'normal'"),
    ("forward_grad chunk_size=-1", lambda: fwdgrad.forward_grad(F_OK, W, chunk_size=-1), ValueError,
     r"^fwdgrad.forward_grad: chunk_size must be >= 1, got -1"),
    ("forward_grad complex loss", lambda: fwdgrad.forward_grad(lambda p: p["w"].sum() * 1j, W), TypeError,
     r"^fwdgrad.forward_grad: fn must return a real floating-point scalar, got dtype torch.complex64"),
    ("forward_grad integer primals", lambda: fwdgrad.forward_grad(F_OK, {"w": torch.ones(3, dtype=torch.long)}),
     TypeError, r"^fwdgrad.forward_grad: primals must be floating-point tensors"),
    ("orthogonal with K > n", lambda: fwdgrad.forward_grad(F_OK, W, num_directions=4, tangents="orthogonal"),
     ValueError, r"num_directions=4 exceeds the number of parameters n=3"),
]


@pytest.mark.parametrize("call, exc, pattern", [row[1:] for row in ERROR_TABLE], ids=[row[0] for row in ERROR_TABLE])
def test_error_table(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


class Distance(nn.Module):
    def forward(self, x):
        return torch.cdist(x, x)


@pytest.mark.parametrize("num_directions", [1, 3])
def test_an_op_without_forward_ad_is_named_with_its_module(num_directions: int) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), Distance()))
    est = fwdgrad.estimator("fg-w", num_directions=num_directions, seed=0)
    with pytest.raises(fwdgrad.ForwardADNotSupportedError) as info:
        est(model, lambda m: m(X).sum())
    msg = str(info.value)
    assert msg.startswith("ForwardGradient.__call__: operation '_cdist_forward' has no forward-mode AD rule")
    assert "in module '1.1' (Distance)" in msg
    assert "'bp' estimator" in msg
    assert all(p.grad is None for p in model.parameters())


def test_a_custom_function_without_jvp_is_explained() -> None:
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    with pytest.raises(fwdgrad.ForwardADNotSupportedError, match=r"custom torch\.autograd\.Function without a jvp"):
        fwdgrad.forward_grad(lambda p: NoJvp.apply(p["w"]).sum(), W)


@pytest.mark.parametrize("name", ["fg-w", "bp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_writes_nothing(name: str, bad: float) -> None:
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full_like(model.weight, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(fwdgrad.NonFiniteError, match=f"the loss is -?{bad}"):
        fwdgrad.estimator(name)(model, lambda m: m(X).sum() * bad)
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 0.5))
    assert model.bias.grad is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_non_finite_estimate_writes_nothing() -> None:
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.zero_()  # the loss sqrt(w) is finite at 0, its derivative is not
    with pytest.raises(fwdgrad.NonFiniteError, match=r"the estimate for \['weight', 'bias'\] is not finite"):
        fwdgrad.estimator("fg-w", seed=0)(model, lambda m: m.weight.sqrt().sum())
    assert model.weight.grad is None
