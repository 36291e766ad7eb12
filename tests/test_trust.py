"""No silent wrong gradient (issue 15, group 1): whatever a fast path cannot see sends the module down the
general path, activity perturbation never hands a parameter a silent zero, K > 1 errors are the documented
ones, and BatchNorm's statistics move once per step whatever K is.

The sharp check used throughout: for Rademacher tangents and K = 1, ``ĝ = d·v`` with ``d = ⟨∇f, v⟩`` and
``‖v‖² = n``, so ``⟨ĝ, ∇f⟩ = d² = ‖ĝ‖²/n`` exactly. A wrong directional derivative ``d' ≠ d`` gives
``⟨ĝ, ∇f⟩ = d'd ≠ d'² = ‖ĝ‖²/n`` (unless ``d' = 0``, which the second assertion rules out). In float64 the
two sides agree to rounding (1e-10 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fwdgrad
from problems import DEVICE, autograd_gradient

DT = torch.float64
REL = 1e-10


def _data(seed: int = 0, shape: tuple[int, ...] = (8, 6), classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(shape, generator=g, dtype=DT), torch.randint(0, classes, (shape[0],), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _assert_rademacher_identity(model: nn.Module, loss_fn, *, fast_paths: bool = True, fused: bool = False) -> None:
    """``⟨ĝ, ∇f⟩ = ‖ĝ‖²/n`` for one Rademacher direction, through ``.grad`` or through ``sgd_step``."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    true = _flat(autograd_gradient(model, loss_fn))
    est = fwdgrad.ForwardGradient(tangents="rademacher", seed=3, fast_paths=fast_paths)
    if fused:
        before = [p.detach().clone() for p in params]
        est.sgd_step(model, loss_fn, lr=1.0)
        ghat = _flat([b - p.detach() for b, p in zip(before, params)])
    else:
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        ghat = _flat([p.grad for p in params])
    lhs, rhs = torch.dot(ghat, true), ghat.pow(2).sum() / n
    assert rhs > 1e-12, "the estimate is zero: the check has no power"
    assert abs(lhs - rhs) <= REL * max(abs(lhs), abs(rhs)), f"⟨ĝ,∇f⟩={lhs.item()} but ‖ĝ‖²/n={rhs.item()}"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(DEVICE)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    return model.double().to(DEVICE)


HOOKS = {
    "times2": lambda m, a, o: o * 2,
    "sin": lambda m, a, o: torch.sin(o),
    "relu-half": lambda m, a, o: torch.relu(o) * 0.5,
}


@pytest.mark.parametrize("fused", [False, True], ids=["grad", "sgd_step"])
@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_forward_hooks_that_change_the_output_are_seen(arch: str, hook: str, fused: bool) -> None:
    model = _mlp() if arch == "mlp" else _cnn()
    model[0].register_forward_hook(HOOKS[hook])
    x, y = _data(shape=(8, 6) if arch == "mlp" else (4, 1, 5, 5))
    _assert_rademacher_identity(model, lambda m: F.cross_entropy(m(x), y), fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["grad", "sgd_step"])
def test_forward_pre_hooks_that_change_the_input_are_seen(fused: bool) -> None:
    model = _mlp()
    model[2].register_forward_pre_hook(lambda m, a: (torch.cos(a[0]),))
    x, y = _data()
    _assert_rademacher_identity(model, lambda m: F.cross_entropy(m(x), y), fused=fused)


@pytest.mark.parametrize("k", [1, 4])
def test_global_module_hooks_are_seen(k: int) -> None:
    model = _mlp()
    x, y = _data()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: o * 3 if isinstance(m, nn.Linear) else None
    )
    try:
        if k == 1:
            _assert_rademacher_identity(model, lambda m: F.cross_entropy(m(x), y))
        else:
            _assert_fast_equals_reference(model, lambda m: F.cross_entropy(m(x), y), k)
    finally:
        handle.remove()


class _Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.T) / 2


def test_parametrized_weights_are_seen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(DEVICE)
    parametrize.register_parametrization(model[0], "weight", _Symmetric())
    x, y = _data(shape=(8, 5))
    _assert_rademacher_identity(model, lambda m: F.cross_entropy(m(x), y))


class ScaledLinear(nn.Linear):
    """A subclass that overrides forward: the fast rule of nn.Linear does not describe it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) * 1.5


@pytest.mark.parametrize("tangents", ["rank1", "gaussian"])
@pytest.mark.parametrize("k", [1, 3])
def test_subclasses_and_instance_forwards_are_seen(k: int, tangents: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(6, 5), nn.Linear(5, 3)).double().to(DEVICE)
    model[1].forward = lambda x, _m=model[1]: F.linear(x, _m.weight, _m.bias).sin()
    x, y = _data()
    if k == 1:
        _assert_rademacher_identity(model, lambda m: F.cross_entropy(m(x), y))
    _assert_fast_equals_reference(model, lambda m: F.cross_entropy(m(x), y), k, tangents=tangents)


def _assert_fast_equals_reference(model: nn.Module, loss_fn, k: int, tangents: str = "rademacher") -> None:
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m, fast in ((a, True), (b, False)):
        fwdgrad.ForwardGradient(num_directions=k, tangents=tangents, seed=5, fast_paths=fast)(m, loss_fn)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-10)


# --- fg-a: no silent zero --------------------------------------------------------------------------------


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class UsedOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)) * self.scale)


class TiedOutside(nn.Module):
    """The read-out reuses the first layer's weight through F.linear, outside that module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        return self.out(torch.tanh(F.linear(h, self.fc.weight)))


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.dec = nn.Linear(4, 7, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.emb(tokens).mean(1)))


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


FG_A_CASES = {
    "lstm": (WithLSTM, (4, 3, 4), ["lstm.weight_ih_l0"]),
    "attention": (WithAttention, (4, 3, 4), ["attn.in_proj_weight"]),
    "used-outside": (UsedOutside, (8, 6), ["scale"]),
    "tied-outside": (TiedOutside, (8, 6), ["fc.weight"]),
    "tied-embedding": (TiedEmbedding, None, ["emb.weight"]),
}


@pytest.mark.parametrize("case", list(FG_A_CASES))
def test_fg_a_never_gives_a_silent_zero(case: str) -> None:
    make, shape, named = FG_A_CASES[case]
    torch.manual_seed(0)
    model = make().double().to(DEVICE)
    if shape is None:
        x = torch.randint(0, 7, (8, 3))
    else:
        x = torch.randn(shape, dtype=DT)
    y = torch.randint(0, 3, (x.shape[0],))
    loss_fn = lambda m: F.cross_entropy(m(x), y, reduction="none")
    with pytest.raises(ValueError, match="cannot estimate") as info:
        fwdgrad.estimator("fg-a", seed=0)(model, loss_fn)
    for n in named:
        assert n in str(info.value)
    assert all(p.grad is None for p in model.parameters()), "an error must leave .grad untouched"


def test_fg_a_still_runs_where_every_parameter_is_covered() -> None:
    model = _mlp()
    x, y = _data()
    fwdgrad.estimator("fg-a", seed=0)(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- K > 1: the documented error ------------------------------------------------------------------------


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * 2


@pytest.mark.parametrize("tangents", ["gaussian", "rank1", "sphere"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_function_without_jvp_raises_the_documented_error_for_any_k(k: int, tangents: str) -> None:
    model = _mlp()
    x, _ = _data()
    with pytest.raises(fwdgrad.ForwardADNotSupportedError, match="without a jvp"):
        fwdgrad.estimator("fg-w", num_directions=k, tangents=tangents, seed=0)(model, lambda m: NoJvp.apply(m(x)).sum())


@pytest.mark.parametrize("k", [1, 3])
def test_forward_grad_raises_the_documented_error_for_any_k(k: int) -> None:
    with pytest.raises(fwdgrad.ForwardADNotSupportedError, match="without a jvp"):
        fwdgrad.forward_grad(lambda p: NoJvp.apply(p["w"]).sum(), {"w": torch.randn(3)}, num_directions=k)


# --- BatchNorm: statistics move once per step -----------------------------------------------------------


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double().to(DEVICE)


@pytest.mark.parametrize(
    "name,options",
    [
        ("fg-w", {"tangents": "gaussian"}),
        ("fg-w", {"tangents": "rank1"}),
        ("fg-w", {"tangents": "sphere"}),
        ("fg-w", {"tangents": "gaussian", "fast_paths": False}),
        ("fg-w", {"tangents": "rademacher", "chunk_size": 2}),
    ],  # fg-a refuses BatchNorm in training mode (tests/test_activity.py)
)
def test_batchnorm_statistics_update_once_per_step_for_any_k(name: str, options: dict) -> None:
    x, y = _data()
    reference = _bn_model()
    reference(x)  # one forward in training mode: what one step must do to the buffers
    model = _bn_model()
    reduction = "none" if name == "fg-a" else "mean"
    est = fwdgrad.estimator(name, num_directions=4, seed=0, **options)
    est(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))
    for (n, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"buffer {n}")


def test_batchnorm_statistics_update_once_in_the_fused_step() -> None:
    x, y = _data()
    reference = _bn_model()
    reference(x)
    model = _bn_model()
    fwdgrad.ForwardGradient(num_directions=3, seed=0).sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.1)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
