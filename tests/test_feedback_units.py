"""``dfa`` on models built from ActivityLayer units (the LocalMixer): every hidden unit gets the output error
through its own fixed random matrix and its own local weight gradient; no sequential chain, no backward
through the network. The update is checked against a reference written out by hand (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fwdgrad
from fwdgrad.models.localmixer import LocalMixer
from problems import DEVICE, RaisingBackward

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _ln(t: Tensor) -> Tensor:
    return F.layer_norm(t, t.shape[-1:], eps=1e-5)


def _mixer(seed: int = 0, blocks: int = 2) -> tuple[LocalMixer, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = LocalMixer((1, 4, 4), 3, num_blocks=blocks, num_patches=2, channels=8, groups=2).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero read-out, so the output error reaches every unit with some structure
        model.readout.weight.normal_(0, 0.5, generator=g)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=DT).to(DEVICE)
    y = torch.randint(0, 3, (6,), generator=g).to(DEVICE)
    return model, x, y


def _reference(model: LocalMixer, x: Tensor, y: Tensor, feedback: dict[str, Tensor]) -> dict[str, Tensor]:
    """DFA by hand: the mixer's forward written out, ``e = (softmax − onehot)/B``, ``δ_l = 1[pre_l > 0] ⊙
    (e B_l)`` at every unit's output (``pre_l``: the ReLU's input, the unit's output plus the residual for a
    later block's group unit; ``e B_l`` the same at every patch for the channel and group units, whose
    weights are the same at every patch, one per patch and channel for token units), each unit's weights
    from ``⟨δ_l, unit(x_l; θ)⟩`` with its input held fixed."""
    units = []  # (name, function of its parameters, its input, output, the ReLU's input)
    b, p = x.shape[0], model.num_patches**2
    h = model.patchify(x)
    for k, blk in enumerate(model.blocks):
        inp = h
        t = _ln(inp)
        if k > 0:
            fn = lambda w, c, t=t: _ln(torch.einsum("bpd,qp->bqd", t, w) + c[:, None])
            z = fn(blk.token.weight, blk.token.bias)
            units.append((f"blocks.{k}.token", blk.token, fn, z, z))
            t = _ln(torch.relu(z))
        fn = lambda w, c, t=t: _ln(t @ w.T + c)
        z = fn(blk.channel.weight, blk.channel.bias)
        units.append((f"blocks.{k}.channel", blk.channel, fn, z, z))
        t = _ln(torch.relu(z).reshape(b, p, model.groups, -1))
        fn = lambda w, c, t=t: _ln(torch.einsum("bpgc,gcd->bpgd", t, w) + c)
        z = fn(blk.group.weight, blk.group.bias)
        pre = z if k == 0 else z + inp.reshape(z.shape)
        units.append((f"blocks.{k}.group", blk.group, fn, z, pre))
        h = torch.relu(pre).reshape(b, p, -1)
    r = _ln(h.mean(1))
    logits = r @ model.readout.weight.T + model.readout.bias
    e = (torch.softmax(logits, 1) - F.one_hot(y, 3).to(DT)) / b
    out = {"readout.weight": e.T @ r, "readout.bias": e.sum(0)}
    for name, mod, fn, z, pre in units:
        fb = e @ feedback[name]
        fb = fb.reshape(z.shape) if name.endswith("token") else fb.reshape(b, 1, *z.shape[2:]).expand(z.shape)
        delta = (pre > 0).to(DT) * fb
        with torch.enable_grad():  # a reference may use autograd: through this unit alone, input held fixed
            w, c = mod.weight.detach().requires_grad_(), mod.bias.detach().requires_grad_()
            gw, gc = torch.autograd.grad((fn(w, c) * delta).sum(), (w, c))
        out[f"{name}.weight"], out[f"{name}.bias"] = gw, gc
    return out


@pytest.mark.parametrize("blocks", [1, 2])
def test_dfa_on_the_mixer_equals_the_hand_reference(blocks: int) -> None:
    model, x, y = _mixer(blocks=blocks)
    est = fwdgrad.estimator("dfa", seed=3)
    loss = est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=1e-12)
    want = ["channel", "group"] + (["token", "channel", "group"] if blocks == 2 else [])
    assert sorted(est.feedback) == sorted(f"blocks.{i}.{u}" for i, u in zip([0, 0, 1, 1, 1], want))
    for name, b in est.feedback.items():  # [C, P·D] for token units, [C, D] shared over the patches otherwise
        assert b.shape == ((3, 32) if name.endswith("token") else (3, 8)), name
    with torch.no_grad():
        ref = _reference(model, x, y, est.feedback)
    for n, prm in model.named_parameters():
        if n.startswith("heads."):  # not in the end-to-end forward: no signal, like backprop's zero
            assert not prm.grad.any(), n
            continue
        torch.testing.assert_close(prm.grad, ref[n], rtol=1e-10, atol=1e-12, msg=n)
        assert prm.grad.abs().sum() > 0 or n.endswith("token.bias"), n  # token bias: LN over D removes it


def test_dfa_on_the_mixer_runs_no_backward_through_the_network() -> None:
    model, x, y = _mixer()
    model.blocks[0].register_forward_hook(lambda m, a, o: RaisingBackward.apply(o))
    loss_fn = lambda m: F.cross_entropy(m(x), y)
    with pytest.raises(RuntimeError, match="a backward pass happened"):
        fwdgrad.estimator("bp")(copy.deepcopy(model), loss_fn)
    fwdgrad.estimator("dfa", seed=0)(model, loss_fn)
    assert model.blocks[0].channel.weight.grad.abs().sum() > 0


def _fit(frozen_hidden: bool, steps: int = 200, method: str = "dfa") -> tuple[float, float]:
    torch.manual_seed(0)
    model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=1, channels=16, groups=2).double().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 4, 4, generator=g, dtype=DT)
    y = (torch.tanh(x.reshape(96, -1) @ torch.randn(16, 3, generator=g, dtype=DT)) ** 2).argmax(1)
    x, y = x.to(DEVICE), y.to(DEVICE)
    for n, p in model.named_parameters():
        p.requires_grad_(not (frozen_hidden and not n.startswith("readout.")))
    est = fwdgrad.estimator(method, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(est(model, lambda m: F.cross_entropy(m(x), y))))
        opt.step()
    return losses[0], losses[-1]


@pytest.mark.parametrize(("method", "share"), [("dfa", 0.5), ("fa", 0.85)])
def test_feedback_trains_the_mixer_units(method: str, share: float) -> None:
    """Full-batch Adam on a small nonlinear rule (2 blocks, 1 patch, 2 groups, 200 steps): with DFA or FA on
    the hidden units the training loss ends below that of the same run training the read-out alone
    (deterministic; measured from 1.10: dfa 0.37, fa 0.73, read-out alone 0.93), so the hidden units'
    updates, not the read-out's, do part of the learning."""
    start, end = _fit(False, method=method)
    _, readout_only = _fit(True)
    assert end < share * readout_only, (start, end, readout_only)


class _Units(nn.Module):
    """Two ActivityLayer-style units with a functional activation between them (invisible to hooks)."""

    def __init__(self) -> None:
        super().__init__()
        from fwdgrad.models.localmixer import ChannelLinear

        self.a, self.out = ChannelLinear(5, 4, 1), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x)))


def test_dfa_units_without_a_visible_activation_raise() -> None:
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"unit 'a' \(ChannelLinear\) is not followed by an element-wise"):
        fwdgrad.estimator("dfa", seed=0)(_Units(), lambda m: F.cross_entropy(m(x), y))


def test_fdfa_still_refuses_the_mixer() -> None:
    model, x, y = _mixer()
    with pytest.raises(ValueError, match=r"ChannelLinear\) is not supported"):
        fwdgrad.estimator("fdfa", seed=0)(model, lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize("blocks", [1, 2])
def test_fa_on_the_mixer_with_the_weights_as_feedback_is_backprop(blocks: int) -> None:
    """FA's backward with ``B := W`` for every unit is backprop (float64, 1e-10): the units' input rules,
    the normalisations, group reshapes, token mixing and residuals between them are all on the path."""
    model, x, y = _mixer(blocks=blocks)
    loss_fn = lambda m: F.cross_entropy(m(x), y, reduction="none")
    est = fwdgrad.estimator("fa", seed=0)
    est(copy.deepcopy(model), loss_fn)  # draws the feedback
    modules = dict(model.named_modules())
    units = [n for n, m in modules.items() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    assert sorted(est.feedback) == sorted(n for n in units if not n.startswith("heads."))
    for n, b in est.feedback.items():
        assert b.shape == modules[n].weight.shape and not torch.equal(b, modules[n].weight), n
        est.feedback[n] = modules[n].weight.detach().clone()
    fa, ref = copy.deepcopy(model), copy.deepcopy(model)
    est(fa, loss_fn)
    loss_fn(ref).mean().backward()
    for (n, p), q in zip(fa.named_parameters(), ref.parameters()):
        want = torch.zeros_like(p) if q.grad is None else q.grad
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=n)


def test_fa_on_the_mixer_with_random_feedback() -> None:
    """Random feedback: the read-out (its gradient needs no feedback) equals backprop's, the units below it
    get other updates; the same seed gives the same feedback and the same step."""
    model, x, y = _mixer(blocks=2)
    loss_fn = lambda m: F.cross_entropy(m(x), y)
    a, b, ref = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    fwdgrad.estimator("fa", seed=5)(a, loss_fn)
    fwdgrad.estimator("fa", seed=5)(b, loss_fn)
    loss_fn(ref).backward()
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n
        if n.startswith("readout."):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)
        elif not n.startswith("heads.") and not n.endswith("token.bias"):
            assert not torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-8), n
