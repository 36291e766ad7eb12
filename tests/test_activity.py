"""FG-A (activity perturbation): exact pieces against autograd, Monte-Carlo unbiasedness and variance.

Monte-Carlo tests are probabilistic. Each compares a sample mean with its target entrywise in units of the
sample's own standard error (SE): with a z-threshold of 5 and a few hundred entries, a correct estimator
fails with probability below 1e-4 (normal tail 5.7e-7 per entry, union bound), while a bias of a few SE is
caught. Variance tests compare the empirical mean squared error with its exact value (ANCHORS: Gaussian
tangents, ``E‖(u uᵀ − I) a‖² = (n + 1)‖a‖²``) within a stated relative tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.estimators.activity import (
    ActivityForwardGradient,
    ActivityPerturbation,
    Site,
    local_param_grads,
    select_modules,
)
from fwdgrad.models.localmixer import ChannelLinear, GroupLinear, TokenLinear

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


class RaisingReLU(torch.autograd.Function):
    """ReLU with a forward-mode rule whose backward raises: any backward pass through it fails."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return t * (x > 0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a global backward pass ran")


class NoBackwardReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RaisingReLU.apply(x)


def mlp(seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3)).to(DT)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, 3)
    ).to(DT)


def data(batch: int = 5, shape: tuple[int, ...] = (5,), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g, dtype=DT), torch.randint(0, 3, (batch,), generator=g)


def true_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def mc_mean(est, model, loss_fn, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sample mean and standard error of ``n`` estimates per parameter."""
    s1 = [torch.zeros_like(p) for p in model.parameters()]
    s2 = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        for a, b, p in zip(s1, s2, model.parameters()):
            a += p.grad
            b += p.grad**2
    means = [a / n for a in s1]
    ses = [((b / n - m**2).clamp(min=0) / n).sqrt() for b, m in zip(s2, means)]
    return means, ses


def assert_unbiased(means, ses, truth, z: float = 5.0) -> None:
    for m, se, t in zip(means, ses, truth):
        bound = z * se + 1e-9
        assert ((m - t).abs() <= bound).all(), f"max |mean−true|/SE = {((m - t).abs() / (se + 1e-12)).max():.2f}"


# --- exact pieces -----------------------------------------------------------------------------------------


def test_directional_derivative_equals_autograd_per_example():
    """The per-example tangent d_b equals Σ_sites ⟨∂ℓ_b/∂z_b, u_b⟩ from autograd, to 1e-10 (float64)."""
    model, (x, y) = mlp(), data()
    chosen = select_modules("t", model)
    pert = ActivityPerturbation(model, chosen, "gaussian", torch.Generator().manual_seed(3))
    with fwAD.dual_level(), pert:
        loss = F.cross_entropy(model(x), y, reduction="none")
        d = fwAD.unpack_dual(loss).tangent
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o) or o) for _, m in chosen]
    total = F.cross_entropy(model(x), y, reduction="sum")
    grads = torch.autograd.grad(total, outs)
    for h in hooks:
        h.remove()
    expected = sum((g * s.tangent).flatten(1).sum(1) for g, s in zip(grads, pert.sites))
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(4, 3), (5, 4)),
        (nn.Linear(4, 3), (5, 2, 4)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 2, 7, 7)),
        (nn.Conv2d(2, 4, 3, groups=2, dilation=2), (5, 2, 8, 8)),
        (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), (5, 4)),  # generic rule: one-module backward
        (ChannelLinear(4, 6, groups=2), (5, 3, 4)),
        (GroupLinear(2, 3, 4), (5, 3, 2, 3)),
        (TokenLinear(3), (5, 3, 6)),
    ],
)
def test_local_rule_with_exact_activation_gradient_equals_autograd(module: nn.Module, shape):
    """Given the exact gradient of the module's output, the local rule gives autograd's parameter gradient."""
    torch.manual_seed(0)
    module = module.to(DT)
    x = torch.randn(shape, dtype=DT)
    out = module(x)
    g_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, list(module.parameters()), grad_outputs=g_out)
    site = Site("m", module, (x,), out.detach(), torch.zeros_like(out))
    got = local_param_grads(site, g_out)
    for (name, _), e in zip(module.named_parameters(), expected):
        torch.testing.assert_close(got[name], e, rtol=0, atol=1e-10)


def test_output_layer_gets_its_exact_gradient():
    """With exact_output, the read-out Linear's estimate is exactly its gradient (no noise)."""
    model, (x, y) = mlp(), data()
    truth = true_grads(model, x, y)
    est = ActivityForwardGradient(seed=0)
    est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    torch.testing.assert_close(model[4].weight.grad, truth[4], rtol=0, atol=1e-10)
    torch.testing.assert_close(model[4].bias.grad, truth[5], rtol=0, atol=1e-10)


def test_same_seed_same_estimate_and_skip_inactive_masks():
    model, (x, y) = mlp(), data()
    lf = lambda m: F.cross_entropy(m(x), y, reduction="none")
    a = ActivityForwardGradient(seed=7).estimate(model, lf, dict(model.named_parameters()))[1]
    b = ActivityForwardGradient(seed=7).estimate(model, lf, dict(model.named_parameters()))[1]
    assert all(torch.equal(a[n], b[n]) for n in a)
    # an inactive ReLU unit has exactly zero gradient: its row of the first layer's estimate is zero
    pre = model[0](x)
    dead = (pre <= 0).all(0)
    if dead.any():
        assert (a["0.weight"][dead] == 0).all()


def test_no_global_backward_runs_for_fg_a_but_bp_fails():
    model, (x, y) = mlp(act=NoBackwardReLU), data()
    loss = fwdgrad.estimator("fg-a", seed=0)(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    assert torch.isfinite(loss) and model[0].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="global backward"):
        fwdgrad.estimator("bp")(model, lambda m: F.cross_entropy(m(x), y))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="ActivityForwardGradient: num_directions"):
        ActivityForwardGradient(num_directions=0)
    with pytest.raises(ValueError, match="unknown tangents"):
        ActivityForwardGradient(tangents="nope")
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="not in the model"):
        ActivityForwardGradient(modules=["nope"])(model, lambda m: F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="shared_noise=True needs per-example"):
        ActivityForwardGradient(shared_noise=True)(model, lambda m: F.cross_entropy(m(x), y))


def test_module_selection_by_type_name_and_outer_wins():
    model = nn.Sequential(ChannelLinear(4, 4, 1), nn.ReLU(), nn.Linear(4, 2))
    names = [n for n, _ in select_modules("t", model)]
    assert names == ["0", "2"]
    assert [n for n, _ in select_modules("t", model, [nn.Linear])] == ["2"]
    assert [n for n, _ in select_modules("t", model, ["0"])] == ["0"]


# --- Monte Carlo: unbiasedness -------------------------------------------------------------------------------


@pytest.mark.parametrize("shared, per_example", [(False, True), (True, True), (False, False)])
def test_fg_a_unbiased_light(shared: bool, per_example: bool):
    """Light MC (200 draws, z ≤ 5): per-example, shared-noise and scalar-loss variants are unbiased."""
    model, (x, y) = mlp(), data()
    truth = true_grads(model, x, y)
    lf = (lambda m: F.cross_entropy(m(x), y, reduction="none")) if per_example else (lambda m: F.cross_entropy(m(x), y))
    est = ActivityForwardGradient(seed=11, shared_noise=shared, exact_output=False)
    means, ses = mc_mean(est, model, lf, 200)
    assert_unbiased(means, ses, truth)


@pytest.mark.montecarlo
@pytest.mark.parametrize("tangents", ["gaussian", "rademacher"])
@pytest.mark.parametrize("make", [mlp, convnet])
def test_fg_a_unbiased_heavy(tangents: str, make):
    """Heavy MC (20 000 draws, z ≤ 5): unbiased for MLP and CNN, both samplers, every layer at once."""
    model = make()
    x, y = data(6, (5,)) if make is mlp else data(6, (2, 6, 6))
    truth = true_grads(model, x, y)
    est = ActivityForwardGradient(tangents=tangents, seed=5, exact_output=False)
    means, ses = mc_mean(est, model, lambda m: F.cross_entropy(m(x), y, reduction="none"), 20000)
    assert_unbiased(means, ses, truth)


# --- Monte Carlo: variance, the paper's Table 1 ---------------------------------------------------------------


def _mse(est, model, loss_fn, truth: torch.Tensor, n: int) -> float:
    total = 0.0
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        est(model, loss_fn)
        total += float((model.weight.grad - truth).pow(2).sum())
    return total / n


def _variance_case(p: int = 24, q: int = 4, batch: int = 8):
    torch.manual_seed(0)
    model = nn.Linear(p, q, bias=False).to(DT)
    x = torch.randn(batch, p, dtype=DT)
    y = torch.randint(0, q, (batch,))
    truth = torch.autograd.grad(F.cross_entropy(model(x), y), model.weight)[0]
    # independent noise: Σ_b (q+1)‖a_b‖²‖x_b‖² / B², with a_b = ∂ℓ_b/∂z_b
    with torch.no_grad():
        a = torch.softmax(model(x), 1) - F.one_hot(y, q).to(DT)
    indep = float(((q + 1) * a.pow(2).sum(1) * x.pow(2).sum(1)).sum() / batch**2)
    return model, x, y, truth, indep


def _run_variance(n: int, rel_tol: float) -> None:
    p, q = 24, 4
    model, x, y, truth, indep_exact = _variance_case(p, q)
    norm2 = float(truth.pow(2).sum())
    vec = lambda m: F.cross_entropy(m(x), y, reduction="none")
    fg_w = _mse(fwdgrad.estimator("fg-w", seed=1), model, lambda m: F.cross_entropy(m(x), y), truth, n)
    fg_a_shared = _mse(ActivityForwardGradient(seed=2, shared_noise=True, exact_output=False), model, vec, truth, n)
    fg_a_indep = _mse(ActivityForwardGradient(seed=3, exact_output=False), model, vec, truth, n)
    # exact values (Gaussian tangents): weight perturbation (pq+1)‖g‖², activity with shared noise (q+1)‖g‖²
    assert fg_w == pytest.approx((p * q + 1) * norm2, rel=rel_tol)
    assert fg_a_shared == pytest.approx((q + 1) * norm2, rel=rel_tol)
    assert fg_a_indep == pytest.approx(indep_exact, rel=rel_tol)
    # the fan-in factor: (pq+1)/(q+1) = 19.4 here
    assert fg_w / fg_a_shared == pytest.approx((p * q + 1) / (q + 1), rel=rel_tol)


def test_fg_a_variance_lower_than_fg_w_by_fan_in_light():
    """Light (300 draws each). A squared error has a relative standard deviation of about 1.5 here, so each
    MSE has a relative SE near 9 % and the ratio near 12 %; the 50 % tolerance is about 4 SE of the ratio
    and still separates the fan-in factor (19.4) from 1 by far."""
    _run_variance(300, 0.50)


@pytest.mark.montecarlo
def test_fg_a_variance_lower_than_fg_w_by_fan_in_heavy():
    """Heavy (20 000 draws each; relative SE near 1.1 % per MSE, 1.5 % for the ratio; tolerance 7 %)."""
    _run_variance(20000, 0.07)


@pytest.mark.parametrize("name", ["fg-a", "lg-fg-a", "lg-fg-w"])
def test_num_directions_averages_consecutive_single_direction_estimates(name: str):
    """K directions = the mean of K one-direction estimates drawn in sequence from the same generator."""
    from test_local import batch, tiny

    model, (x, y) = tiny(), batch()
    lf = lambda m: F.cross_entropy(m(x), y, reduction="none")
    params = dict(model.named_parameters())
    both = fwdgrad.estimator(name, num_directions=2, seed=5).estimate(model, lf, params)[1]
    single = fwdgrad.estimator(name, seed=5)
    first = single.estimate(model, lf, params)[1]
    second = single.estimate(model, lf, params)[1]
    for n in both:
        torch.testing.assert_close(both[n], (first[n] + second[n]) / 2, rtol=0, atol=1e-12, msg=n)


def test_fg_a_unbiased_light_convnet():
    """Light MC (200 draws, z ≤ 5) through Conv2d layers (stride, padding) and a read-out."""
    model, (x, y) = convnet(), data(6, (2, 6, 6))
    truth = true_grads(model, x, y)
    est = ActivityForwardGradient(seed=12, exact_output=False)
    means, ses = mc_mean(est, model, lambda m: F.cross_entropy(m(x), y, reduction="none"), 200)
    assert_unbiased(means, ses, truth)


# --- BatchNorm: refused in training mode, exact pieces in eval mode ----------------------------------------


def bn_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():  # statistics that differ from a fresh layer's, so eval mode is not the identity
        model[1].running_mean.normal_(generator=torch.Generator().manual_seed(4))
        model[1].running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("name", ["fg-a", "fg-a-momentum"])
def test_batchnorm_in_training_mode_is_refused_and_nothing_moves(name: str):
    """Batch statistics couple the examples: ``d_b`` carries the other examples' tangents and the estimate
    is biased (0.23 from the gradient however many directions were averaged, issue 23). Refused up front:
    no statistic moves, no ``.grad`` is written."""
    model, (x, y) = bn_mlp(), data(batch=8)
    buffers = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' normalises with batch statistics \(training mode\)"):
        est = fwdgrad.estimator(name, seed=0, modules=[nn.Linear, nn.BatchNorm1d])
        est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_in_eval_mode_keeps_the_exact_pieces_and_is_unbiased():
    """Eval-mode BatchNorm is a per-channel affine map: the per-example tangents equal autograd's, the
    read-out's gradient is exact, and the estimate is unbiased (300 draws, z = 5; see the module docstring)."""
    model, (x, y) = bn_mlp(), data(batch=8)
    model.eval()
    picked = [nn.Linear, nn.BatchNorm1d]  # BatchNorm's affine parameters: the generic local rule (a re-run)
    chosen = select_modules("t", model, picked)
    pert = ActivityPerturbation(model, chosen, "gaussian", torch.Generator().manual_seed(3), skip_inactive=False)
    with fwAD.dual_level(), pert:
        d = fwAD.unpack_dual(F.cross_entropy(model(x), y, reduction="none")).tangent
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o) or o) for _, m in chosen]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), outs)
    for h in hooks:
        h.remove()
    expected = sum((g * s.tangent).flatten(1).sum(1) for g, s in zip(grads, pert.sites))
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-10)
    truth = true_grads(model, x, y)
    loss_fn = lambda m: F.cross_entropy(m(x), y, reduction="none")
    est = fwdgrad.estimator("fg-a", seed=0, modules=picked)
    means, ses = mc_mean(est, model, loss_fn, 300)
    torch.testing.assert_close(model[3].weight.grad, truth[-2], rtol=0, atol=1e-10)
    assert_unbiased(means, ses, truth)
