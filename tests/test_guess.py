"""fg-guess (Fournier et al. 2023): projections against autograd in float64, unbiasedness of random guesses,
no global backward, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad import local
from fwdgrad.estimators.guess import GUESSES, SPACES
from fwdgrad.models.blockcnn import BlockCNN
from fwdgrad.models.localmixer import LocalMixer
from problems import RaisingBackward

Tensor = torch.Tensor
DT64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread


def _block_cnn() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = BlockCNN((2, 8, 8), 3, channels="3x4x4", head_pool=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y


def _block_cnn_readout() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = BlockCNN((2, 8, 8), 3, channels="3x4x4", head_pool=2, last_head="readout").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y


def _mixer() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = LocalMixer((1, 4, 4), 3, num_blocks=2, num_patches=2, channels=8, groups=2).double()
    with torch.no_grad():  # the read-out starts at zero; give it values so every gradient is non-trivial
        model.readout.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    return model, x, y


MODELS = {"block-cnn": _block_cnn, "block-cnn-readout": _block_cnn_readout, "localmixer": _mixer}


def _loss(x: Tensor, y: Tensor):
    return lambda m: F.cross_entropy(m(x), y, reduction="none")


def _reference(model: nn.Module, x: Tensor, y: Tensor, est, eps: float) -> dict[str, Tensor]:
    """The estimate rebuilt from autograd: projections of the true gradient onto ``est.last_guesses``."""
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    blocks = list(model.blocks)
    outs: dict[int, Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(k, o)) for k, b in enumerate(blocks)]
    loss = F.cross_entropy(model(x), y)  # the global loss, no cut
    for h in handles:
        h.remove()
    names = {id(p): n for n, p in model.named_parameters()}
    for k, blk in enumerate(blocks):
        theta = list(blk.parameters())
        u = est.last_guesses[k]
        if est.space == "activation":
            (g_h,) = torch.autograd.grad(loss, outs[k], retain_graph=True)  # per example: ∇_{h_i} L
            dims = tuple(range(1, u.dim()))
            s = u[0].numel() if est.guess == "random" else 1.0
            coef = s * (g_h * u).sum(dims) / ((u * u).sum(dims) + eps)
            signal = coef.view(-1, *([1] * (u.dim() - 1))) * u
            gs = torch.autograd.grad(outs[k], theta, signal, retain_graph=True)
        else:
            g_t = torch.autograd.grad(loss, theta, retain_graph=True)
            s = sum(t.numel() for t in u) if est.guess == "random" else 1.0
            coef = s * sum((a * b).sum() for a, b in zip(g_t, u)) / (sum((t * t).sum() for t in u) + eps)
            gs = [coef * t for t in u]
        for p, g in zip(theta, gs):
            ref[names[id(p)]] += g
    # Heads: their own exact gradient (l-bp gives the same on head parameters: the split logits stop W).
    twin = copy.deepcopy(model)
    fwdgrad.estimator("l-bp")(twin, _loss(x, y))
    head_params = {n for n, _ in model.named_parameters() if n.startswith(("heads.", "readout."))}
    for n, p in twin.named_parameters():
        if n in head_params:
            trained = n.startswith("readout.") or est.guess not in ("ntk", "fixed-ntk")
            ref[n] = p.grad if trained else torch.zeros_like(p)
    return ref


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("guess", GUESSES)
@pytest.mark.parametrize("which", sorted(MODELS))
def test_projection_matches_autograd(which: str, guess: str, space: str) -> None:
    model, x, y = MODELS[which]()
    eps = 1e-3  # large enough that a wrong eps placement shows
    est = fwdgrad.estimator("fg-guess", guess=guess, space=space, eps=eps, seed=3)
    est(model, _loss(x, y))
    ref = _reference(model, x, y, est, eps)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("blocks."))


def _ce(logits: Tensor, y: Tensor, reduction: str = "none") -> Tensor:
    return F.cross_entropy(logits, y, reduction=reduction)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("guess", ["local", "above"])
def test_guesses_are_local_gradients(guess: str, space: str) -> None:
    """The deterministic guesses, recomputed by hand on the block CNN (heads: pool → flatten → linear)."""
    model, x, y = _block_cnn()
    est = fwdgrad.estimator("fg-guess", guess=guess, space=space)
    est(model, _loss(x, y))
    blocks, heads = list(model.blocks), list(model.heads)
    ins = [x]
    with torch.no_grad():
        for b in blocks:
            ins.append(b(ins[-1]))
    for k in range(len(blocks)):
        j = k + 1 if guess == "above" and k + 1 < len(blocks) else k
        xin = ins[k].clone().requires_grad_(True)
        out = blocks[k](xin)
        h = out if j == k else blocks[j](out)
        ell = _ce(heads[j](model.pool(h).flatten(1)), y)
        if space == "activation":
            (want,) = torch.autograd.grad(ell.sum(), out)
            torch.testing.assert_close(est.last_guesses[k], want, rtol=1e-10, atol=1e-14)
        else:
            want = torch.autograd.grad(ell.mean(), list(blocks[k].parameters()))
            for a, b in zip(est.last_guesses[k], want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("space", SPACES)
def test_readout_as_last_head_gives_the_last_block_its_exact_gradient(space: str) -> None:
    """``last_head="readout"`` (Fournier et al.'s protocol): the last block's local loss is the model's loss,
    so its ``local`` projection is its exact gradient, and ``above`` at the block before is exact too; the
    read-out, recorded twice, is trained once (its gradient equals backprop's under fg-guess and l-bp)."""
    model, x, y = _block_cnn_readout()
    assert len(model.heads) == 2
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(x), y).backward()
    exact = {n: p.grad for n, p in twin.named_parameters()}
    for guess, k in (("local", 2), ("above", 1)):
        model.zero_grad(set_to_none=True)
        fwdgrad.estimator("fg-guess", guess=guess, space=space, eps=0.0)(model, _loss(x, y))
        for n, p in model.named_parameters():
            if n.startswith((f"blocks.{k}.", "readout.")):
                torch.testing.assert_close(p.grad, exact[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    others = ("l-bp", "l-fg-w", "l-fg-a")  # l-fg-w / l-fg-a: heads by the shared local rule
    ests = [fwdgrad.estimator(n, **({} if n == "l-bp" else {"seed": 0})) for n in others]
    for est in (*ests, fwdgrad.estimator("fg-guess", guess="ntk", space=space, seed=0)):
        model.zero_grad(set_to_none=True)
        est(model, _loss(x, y))
        for n in ("readout.weight", "readout.bias"):
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, exact[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="last_head"):
        BlockCNN((2, 8, 8), 3, channels="3x4", last_head="mine")


def test_ntk_redraws_and_fixed_ntk_keeps_its_head() -> None:
    model, x, y = _block_cnn()
    for guess, same in (("ntk", False), ("fixed-ntk", True)):
        est = fwdgrad.estimator("fg-guess", guess=guess, seed=0)
        est(model, _loss(x, y))
        first = est.last_guesses[0].clone()
        est(model, _loss(x, y))
        assert torch.equal(first, est.last_guesses[0]) is same
        assert all(model.heads[k].weight.grad is None or not model.heads[k].weight.grad.any() for k in range(3))
        model.zero_grad(set_to_none=True)


def test_same_seed_same_estimate() -> None:
    outs = []
    for _ in range(2):
        model, x, y = _block_cnn()
        fwdgrad.estimator("fg-guess", guess="random", seed=7)(model, _loss(x, y))
        outs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _random_mean(space: str, n: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Mean and standard error of ``n`` random-guess estimates of the block parameters' gradients, and the truth."""
    model, x, y = _block_cnn()
    theta = [p for n_, p in model.named_parameters() if n_.startswith("blocks.")]
    true = list(torch.autograd.grad(F.cross_entropy(model(x), y), theta))
    est = fwdgrad.estimator("fg-guess", guess="random", space=space, eps=0.0, seed=11)
    total = [torch.zeros_like(p) for p in theta]
    sq = [torch.zeros_like(p) for p in theta]
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        est(model, _loss(x, y))
        for t, s, p in zip(total, sq, theta):
            t += p.grad
            s += p.grad**2
    mean = [t / n for t in total]
    se = [((s / n - m**2).clamp_min(0) / n).sqrt() for s, m in zip(sq, mean)]
    return mean, se, true


def _check_unbiased(space: str, n: int) -> None:
    # Probabilistic: each coordinate's sample mean is close to Gaussian (CLT over n draws) around the true
    # gradient; |z| > 5.5 has probability ~4e-8 per coordinate (~150 coordinates here). In aggregate,
    # ‖mean − g‖² / Σ se² is a chi-square over its ~150 degrees of freedom divided by them: mean 1, sd ~0.12,
    # so 2 is far out. Seeded, so deterministic in CI. A biased estimator (e.g. without the dimension factor
    # s = n, off by 1/n) gives |z| in the tens.
    mean, se, true = _random_mean(space, n)
    for m, s, t in zip(mean, se, true):
        z = (m - t).abs() / s.clamp_min(1e-12)
        assert float(z.max()) < 5.5, float(z.max())
    err2 = sum(float(((m - t) ** 2).sum()) for m, t in zip(mean, true))
    var = sum(float((s**2).sum()) for s in se)
    assert err2 < 2 * var, (err2, var)


@pytest.mark.parametrize("space", SPACES)
def test_random_guess_unbiased_light(space: str) -> None:
    _check_unbiased(space, 300)


@pytest.mark.montecarlo
@pytest.mark.parametrize("space", SPACES)
def test_random_guess_unbiased_heavy(space: str) -> None:
    _check_unbiased(space, 10000)


class _RaisingBlocks(nn.Module):
    """Two blocks with heads; a backward-raising op sits between the blocks and in front of the read-out,
    where only a global backward (not a block-local one) would pass."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 5),
                                                                                              nn.Tanh())])
        self.heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 3)])
        self.readout = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        rec = local.current()
        h = x
        for blk, head in zip(self.blocks, self.heads):
            if rec is not None:
                h = local.stop_gradient(h)
            h = blk(h)
            if rec is not None:
                hin, split = local.split_head_logits(h[:, None, None, :], head, False)
                rec.add_head(blk, head, hin, split)
            h = RaisingBackward.apply(h)
        if rec is not None:
            return rec.add_head(None, self.readout, local.stop_gradient(h), None)
        return self.readout(h)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("guess", GUESSES)
def test_no_global_backward(guess: str, space: str) -> None:
    torch.manual_seed(0)
    model = _RaisingBlocks().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(RuntimeError, match="backward ran"):
        fwdgrad.estimator("bp")(model, lambda m: F.cross_entropy(m(x), y))
    model.zero_grad(set_to_none=True)
    fwdgrad.estimator("fg-guess", guess=guess, space=space, seed=0)(model, _loss(x, y))
    assert model.blocks[0][0].weight.grad.abs().sum() > 0


def test_model_without_blocks_says_what_to_declare() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"declared no blocks.*add_head\(block, head"):
        fwdgrad.estimator("fg-guess")(model, _loss(x, y))


def test_activation_space_needs_per_example_losses() -> None:
    model, x, y = _block_cnn()
    with pytest.raises(ValueError, match="per-example"):
        fwdgrad.estimator("fg-guess")(model, lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [({"guess": "oracle"}, "'oracle'"), ({"space": "param"}, "'param'"), ({"eps": -1.0}, "-1.0"),
     ({"eps": float("nan")}, "nan")],
)
def test_bad_options(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=f"fg-guess.*{bad}"):
        fwdgrad.estimator("fg-guess", **kwargs)


def test_local_guess_trains_block_cnn() -> None:
    torch.manual_seed(0)
    model = BlockCNN((1, 8, 8), 2, channels="4x4")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    est = fwdgrad.estimator("fg-guess", guess="local")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = est(model, _loss(x, y))
        first = float(loss) if first is None else first
        opt.step()
    assert float(loss) < 0.7 * first


@pytest.mark.parametrize("blocks", [16])
def test_resnet18_blocks_projection_matches_autograd(blocks: int) -> None:
    """The ResNet-18 split of Fournier et al. (tiny width): the skip connections across cuts are handled."""
    from fwdgrad.models.resnet_blocks import ResNet18Blocks

    torch.manual_seed(0)
    model = ResNet18Blocks((3, 8, 8), 3, blocks=blocks, width=2).double()
    assert len(model.blocks) == blocks
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 8, 8, generator=g, dtype=DT64), torch.tensor([0, 1, 2])
    est = fwdgrad.estimator("fg-guess", guess="above", eps=1e-3)
    est(model, _loss(x, y))
    ref = _reference(model, x, y, est, 1e-3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
