"""The generic estimator tests: every registered recipe gets the checks it claims, by registry name.

A new estimator registered with ``claims=(...)`` (see :mod:`fwdgrad.estimators.registry`) is picked up here
without a line of test code. Recipes that need a model with local heads (``needs="local-heads"``) run on a
tiny LocalMixer, the others on the shared problems of ``problems.py``.

Monte-Carlo (claim ``unbiased``): the mean of N estimates (300; 6,000 heavy) is compared with the true
gradient entrywise in units of its own standard error; with z = 5 and fewer than 100 entries a correct
estimator fails with probability below 1e-4 (normal tail 5.7e-7 per entry, union bound), while a bias of a
few standard errors is caught.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.estimators import ImplicitGradient, recipe
from fwdgrad.models import build_model
from fwdgrad.models.localmixer import LocalMixer
from problems import DEVICE, PROBLEMS, NoBackwardNet, autograd_gradient, directional

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _claiming(claim: str) -> list[str]:
    return [n for n in fwdgrad.available_estimators() if claim in recipe(n).claims]


def _seeded(name: str, **kw) -> fwdgrad.Estimator:
    options = recipe(name).options()
    if options is not None and "seed" in options:
        kw.setdefault("seed", 7)
    return fwdgrad.estimator(name, **kw)


def _task(name: str, seed: int = 0):
    """``(model, loss_fn)`` in float64 suited to recipe ``name``."""
    g = torch.Generator().manual_seed(seed)
    per_example = fwdgrad.estimator_class(name).per_example_loss
    reduction = "none" if per_example else "mean"
    if recipe(name).needs == "local-heads":
        torch.manual_seed(seed)
        model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=2, channels=8, groups=2).double()
        x = torch.randn(6, 1, 4, 4, generator=g, dtype=DT)
    elif recipe(name).needs in ("sequence-model", "diagonal-recurrence"):  # fwdgrad.derivatives.through_time
        torch.manual_seed(seed)
        kind = "gru" if recipe(name).needs == "sequence-model" else "lif"
        model = build_model(kind, (5, 3), 3, hidden=4).double()
        x = 3 * torch.randn(6, 5, 3, generator=g, dtype=DT)
    else:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        x = torch.randn(6, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    return model, lambda m: F.cross_entropy(m(x), y, reduction=reduction)


# --- exact ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
@pytest.mark.parametrize("name", _claiming("exact"))
def test_exact_against_autograd(name: str, problem) -> None:
    check_exact(name, problem)


def check_exact(name: str, problem=PROBLEMS[0]) -> None:
    """An implicit gradient's directional derivatives are ⟨∇L, v_k⟩ of autograd's gradient along its own
    tangents; an explicit one is autograd's gradient itself (float64, 1e-10)."""
    model = problem.model()
    true = autograd_gradient(model, problem.loss_fn)
    est = _seeded(name, **({"num_directions": 3} if "num_directions" in (recipe(name).options() or {}) else {}))
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    grad = est.step(model, problem.loss_fn, params)
    if isinstance(grad, ImplicitGradient):
        for k in range(grad.dirs.shape[0]):
            v = [grad.source.dense(i, k) for i in range(len(params))]
            torch.testing.assert_close(grad.dirs[k], directional(true, v), rtol=1e-10, atol=1e-12)
    else:
        for i, t in enumerate(true):
            torch.testing.assert_close(grad.tensor(i), t, rtol=1e-10, atol=1e-12)


# --- unbiased -------------------------------------------------------------------------------------------


def _unbiased(name: str, samples: int) -> None:
    model, loss_fn = _task(name)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model)
        true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss.mean(), params)])
    est = _seeded(name)
    draws = []
    for _ in range(samples):
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        draws.append(torch.cat([p.grad.reshape(-1) for p in params]))
    d = torch.stack(draws)
    se = d.std(0) / samples**0.5
    z = (d.mean(0) - true).abs() / se.clamp_min(1e-12)
    exact = se < 1e-12  # entries estimated exactly (a read-out's exact gradient): must equal the truth
    assert torch.allclose(d.mean(0)[exact], true[exact], atol=1e-10)
    assert z[~exact].max() < 5.0, f"{name}: max z {z[~exact].max():.2f}"


@pytest.mark.parametrize("name", _claiming("unbiased"))
def test_unbiased_light(name: str) -> None:
    _unbiased(name, 300)


@pytest.mark.montecarlo
@pytest.mark.parametrize("name", _claiming("unbiased"))
def test_unbiased_heavy(name: str) -> None:
    _unbiased(name, 6000)


# --- no backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _claiming("no-backward"))
def test_no_backward_pass_runs(name: str) -> None:
    check_no_backward(name)


def check_no_backward(name: str) -> None:
    if recipe(name).needs == "local-heads":
        model, loss_fn = _task(name)
        from problems import RaisingBackward

        inner = model.blocks[0]
        inner.register_forward_hook(lambda m, a, o: RaisingBackward.apply(o))
    else:
        torch.manual_seed(0)
        model = NoBackwardNet().double().to(DEVICE)
        x, y = torch.randn(8, 6, dtype=DT, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
        reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
        loss_fn = lambda m: F.cross_entropy(m(x), y, reduction=reduction)
    with pytest.raises(RuntimeError, match="a backward pass happened"):
        fwdgrad.estimator("bp")(copy.deepcopy(model), lambda m: loss_fn(m).mean())
    _seeded(name)(model, loss_fn)  # would raise if a backward pass ran
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- .grad interop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _claiming("grad"))
def test_two_calls_accumulate_like_two_backward_passes(name: str) -> None:
    check_grad(name)


def check_grad(name: str) -> None:
    model, loss_fn = _task(name)
    together, separate = copy.deepcopy(model), copy.deepcopy(model)
    est = _seeded(name)
    est(together, loss_fn)
    est(together, loss_fn)
    est2, parts = _seeded(name), []
    for _ in range(2):
        separate.zero_grad(set_to_none=True)
        est2(separate, loss_fn)
        parts.append([p.grad.clone() for p in separate.parameters()])
    for p, a, b in zip(together.parameters(), *parts):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-12, atol=1e-12)


# --- fused = .grad + SGD --------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", _claiming("fused"))
def test_fused_step_equals_grad_and_torch_sgd(name: str, momentum: float) -> None:
    check_fused(name, momentum)


def check_fused(name: str, momentum: float = 0.9) -> None:
    model, loss_fn = _task(name)
    fused, ref = copy.deepcopy(model), copy.deepcopy(model)
    est_fused, est_ref = _seeded(name), _seeded(name)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=0.01)
    for _ in range(3):
        loss_a = est_fused.sgd_step(fused, loss_fn, lr=0.05, weight_decay=0.01, momentum=momentum)
        opt.zero_grad()
        loss_b = est_ref(ref, loss_fn)
        opt.step()
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in fused.parameters())


def test_every_recipe_claims_something_and_unknown_claims_are_refused() -> None:
    assert all(recipe(n).claims for n in fwdgrad.available_estimators())
    with pytest.raises(ValueError, match="unknown claim 'fast'"):
        fwdgrad.register_estimator("test-bad-claim", fwdgrad.Backprop, claims=("fast",))
    assert "test-bad-claim" not in fwdgrad.available_estimators()


def test_options_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"^fwdgrad.estimator: estimator 'bp' has no option 'seed'"):
        fwdgrad.estimator("bp", seed=0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"):
        fwdgrad.estimator("fg-w", seed=2**63)


CHECKS = {
    "exact": check_exact,
    "unbiased": lambda name: _unbiased(name, 300),
    "no-backward": check_no_backward,
    "grad": check_grad,
    "fused": check_fused,
}


def test_the_worked_example_of_docs_architecture_gets_the_generic_checks() -> None:
    """Registering a recipe is all it takes: the recipes of docs/architecture.md pass every check they claim."""
    import re
    from pathlib import Path

    from fwdgrad.estimators import registry

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    names = ("fg-w-orthogonal-doc", "fg-sign-doc")
    try:
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            exec(compile(block, "docs/architecture.md", "exec"), {"__name__": "__doc__"})
        for name in names:
            assert recipe(name).claims
            for claim in sorted(recipe(name).claims):
                CHECKS[claim](name)
    finally:
        for name in names:
            registry._REGISTRY.pop(name, None)


# --- a module instance in two slots ---------------------------------------------------------------------


def _shared_layer_task(name: str):
    """``(model, loss_fn, shared)``: recipe ``name``'s task with one layer instance registered twice.

    Plain recipes get an MLP that *uses* one ``nn.Linear`` twice (``Sequential(a, tanh, s, tanh, s, b)``, the
    usual way to share a layer); recipes with a model protocol (local heads, sequences) keep their model
    and register its read-out a second time under another name, which is what ``functional_call``'s weight
    tying mishandles."""
    g = torch.Generator().manual_seed(3)
    if recipe(name).needs is None:
        torch.manual_seed(3)
        shared = nn.Linear(4, 4)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 3))
        model = model.double().to(DEVICE)
        x = torch.randn(6, 5, generator=g, dtype=DT, device=DEVICE)
        y = torch.randint(0, 3, (6,), generator=g).to(DEVICE)
        reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
        return model, lambda m: F.cross_entropy(m(x), y, reduction=reduction), shared
    model, loss_fn = _task(name)
    shared = model.readout if hasattr(model, "readout") and isinstance(model.readout, nn.Module) else model.fc
    model.alias = shared
    return model, loss_fn, shared


def _slots(model: nn.Module) -> list[tuple[int, str, int, type, bool]]:
    """Every parameter slot of ``model`` (modules registered twice included) by identity, with the type and
    ``requires_grad`` of what it holds."""
    return [(id(m), k, id(p), type(p), p.requires_grad)
            for m in model.modules(remove_duplicate=False) for k, p in m._parameters.items()]


GENERAL_PATHS = {  # the configurations that take fg-w's reference path (torch.func.functional_call)
    "fg-w": [{"num_directions": 4}, {"fast_paths": False}, {"tangents": "orthogonal", "num_directions": 3},
             {"aggregation": "projection", "num_directions": 3}],
}


@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_a_layer_in_two_slots_keeps_its_parameters_and_trains(name: str) -> None:
    """After every call each module still holds its own ``nn.Parameter`` objects (those the optimizer
    holds), ``.grad`` is written for every trainable parameter, and the shared layer's weights move."""
    for options in GENERAL_PATHS.get(name, [{}]):
        model, loss_fn, shared = _shared_layer_task(name)
        slots = _slots(model)
        assert all(t is nn.Parameter and r for *_, t, r in slots)
        weight = shared.weight.detach().clone()
        est = _seeded(name, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            est(model, loss_fn)
            assert _slots(model) == slots, options
            assert all(p.grad is not None for p in opt.param_groups[0]["params"]), options
            opt.step()
        assert not torch.equal(shared.weight.detach(), weight), options
        if "fused" in recipe(name).claims:
            est.sgd_step(model, loss_fn, lr=0.1, momentum=0.9)
            assert _slots(model) == slots


# --- hooks run once per step ----------------------------------------------------------------------------

#: Forwards per step that a recipe documents, as (first step, later steps), where it is not one: zo's
#: two-point differences evaluate the loss twice; the momentum recipes add one pass along their guess once
#: the average has a direction (K + 1 passes); feedback alignment checks on its first call of a model that
#: the model is the chain of its layers (two more forwards); fg-guess runs one recording forward and one
#: JVP per block (2 blocks here), plus one forward to find the blocks on its first call of a model.
FORWARDS = {"zo": (2, 2), "zo-sign": (2, 2), "zo-cons": (2, 2), "fg-w-momentum": (1, 2), "fg-a-momentum": (1, 2),
            "fa": (3, 1), "dfa": (3, 1), "fdfa": (3, 1), "fg-guess": (4, 3)}


@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_hooks_run_once_per_step(name: str) -> None:
    """Forward hooks and pre-hooks of every module that owns parameters run as often per step as in the
    forwards the recipe documents (``FORWARDS``; one for most), counted against one plain ``loss_fn(model)``.
    fg-guess's read-out runs once more: its exact gradient is a VJP through the read-out alone (documented)."""
    model, loss_fn = _task(name)
    pre: dict[str, int] = {}
    post: dict[str, int] = {}
    for n, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda m, a, n=n: pre.__setitem__(n, pre.get(n, 0) + 1))
            m.register_forward_hook(lambda m, a, o, n=n: post.__setitem__(n, post.get(n, 0) + 1))
    with torch.no_grad():
        loss_fn(model)
    plain = dict(pre)
    est = _seeded(name)
    if name == "forward-exact":  # its DiagonalCell rule cannot see hooks of the cell: refused, not ignored
        with pytest.raises(ValueError, match=r"forward-exact computes the cell by its DiagonalCell rule"):
            est(model, loss_fn)
        return
    first, later = FORWARDS.get(name, (1, 1))
    for step in range(3):
        pre.clear()
        post.clear()
        est(model, loss_fn)
        passes = first if step == 0 else later
        expected = {n: c * passes + (1 if name == "fg-guess" and n == "readout" else 0) for n, c in plain.items()}
        assert {n: pre.get(n, 0) for n in plain} == expected, (step, pre)
        assert {n: post.get(n, 0) for n in plain} == expected, (step, post)


# --- torch.compile'd models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_a_compiled_model_gets_the_estimate_of_its_original(name: str) -> None:
    """``est(torch.compile(model), loss_fn)`` runs the original module (forward-mode AD runs eagerly): the
    same ``.grad`` as on the uncompiled twin for the same seed. The compiled forward itself never runs here,
    so nothing is compiled (fast on CPU)."""
    model, loss_fn = _task(name)
    twin = copy.deepcopy(model)
    _seeded(name)(model, loss_fn)
    _seeded(name)(torch.compile(twin), loss_fn)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


# --- state_dict / load_state_dict -------------------------------------------------------------------------


def _through_torch_save(state: dict) -> dict:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("fused", [False, True], ids=["grad+SGD", "sgd_step"])
@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_state_dict_resumes_bit_for_bit(name: str, fused: bool) -> None:
    """2 steps, then the model, optimizer and estimator states are taken (the estimator's through
    ``torch.save`` / ``torch.load(weights_only=True)``); 3 more steps give W. A fresh model, optimizer and
    estimator (another seed) restored from those states give W bit for bit over the same 3 steps. With
    ``sgd_step`` the momentum buffers live in the estimator's state."""
    if fused and "fused" not in recipe(name).claims:
        pytest.skip(f"{name} claims no fused step")
    model, loss_fn = _task(name)
    est = _seeded(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def steps(n: int, model: nn.Module, est: fwdgrad.Estimator, opt: torch.optim.Optimizer) -> None:
        for _ in range(n):
            if fused:
                est.sgd_step(model, loss_fn, lr=0.05, momentum=0.9)
            else:
                opt.zero_grad(set_to_none=True)
                est(model, loss_fn)
                opt.step()

    steps(2, model, est, opt)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), _through_torch_save(est.state_dict()))
    assert saved[2]["unsaved"] == []
    steps(3, model, est, opt)
    fresh, _ = _task(name, seed=1)  # other initial weights, overwritten by the restored ones
    fresh.load_state_dict(saved[0])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    fresh_opt.load_state_dict(saved[1])
    options = recipe(name).options()
    fresh_est = fwdgrad.estimator(name, **({"seed": 1234} if options is not None and "seed" in options else {}))
    fresh_est.load_state_dict(saved[2])
    steps(3, fresh, fresh_est, fresh_opt)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_load_state_dict_refuses_what_is_not_a_state() -> None:
    est = fwdgrad.estimator("fg-w", seed=0)
    with pytest.raises(ValueError, match=r"ForwardGradient.load_state_dict: not a fwdgrad-estimator-state/1 state"):
        est.load_state_dict({"weights": torch.zeros(2)})
    with pytest.raises(ValueError, match="keeps no direction state"):
        est.load_state_dict({"state": {"average": [], "count": 0}})
    with pytest.raises(ValueError, match="has none; build it with seed"):
        fwdgrad.estimator("fg-w").load_state_dict(est.state_dict())


# --- state follows the parameters; meta models ------------------------------------------------------------


@pytest.mark.parametrize("name", _claiming("fused"))
def test_state_follows_the_parameters_dtype(name: str) -> None:
    """Two float32 steps (fused, with momentum, so every kind of state exists), then ``model.double()``: the
    next steps run, write float64 ``.grad``, and every tensor of the estimator's state is float64."""
    model, loss_fn = _task(name)
    model.float()
    est = _seeded(name)
    cast = {"dtype": torch.float32}

    def loss32(m: nn.Module) -> torch.Tensor:  # the data follows the model's dtype, as a user's loop would
        with _inputs_as(**cast):
            return loss_fn(m)

    for _ in range(2):
        est.sgd_step(model, loss32, lr=0.01, momentum=0.9)
        est(model, loss32)
    model.double()
    cast["dtype"] = torch.float64
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        est.sgd_step(model, loss32, lr=0.01, momentum=0.9)
        est(model, loss32)
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)
    floats = [t for t in _tensors(est.state_dict()) if t.dtype.is_floating_point]
    assert floats and all(t.dtype == torch.float64 for t in floats), {t.dtype for t in floats}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _tensors(v)


class _inputs_as(torch.overrides.TorchFunctionMode):
    """Casts floating-point tensors created in float64 by the task's closure to ``dtype`` as they are used."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def cast(a):
            if isinstance(a, torch.Tensor) and a.dtype == torch.float64 and not isinstance(a, nn.Parameter):
                return a.to(self.dtype)
            return a

        args = tuple(cast(a) for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", fwdgrad.available_estimators())
def test_a_model_on_the_meta_device_gets_one_clear_line(name: str) -> None:
    model, loss_fn = _task(name)
    model.to("meta")
    with pytest.raises(ValueError, match=r"is on the meta device \(shapes only, no values\); materialise"):
        _seeded(name)(model, loss_fn)
