"""AsyncFGD (module-wise pipelined forward gradients, stale parameters): the schedule against an explicit
torch.autograd simulation in float64 (M = 3, and M = 1: plain FG-W), one process per module against one
process bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fwdgrad.distributed.asyncfgd import AsyncFGD
from fwdgrad.distributed.seeds import step_source

LR, SEED = 0.05, 3


def chain() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 7), nn.Tanh()).double(), nn.Sequential(nn.Linear(7, 6), nn.Tanh()).double(),
            nn.Linear(6, 3).double()]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def reference(mods: list[nn.Module], data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """The schedule written out with torch.autograd: module m runs batch b at tick b + m after applying
    d_{b+m-M}; d_b = Σ_m ⟨∂L/∂θ_m, v_m^b⟩ at the parameters each module used for b."""
    big_m, n = len(mods), len(data)
    params = [list(m.parameters()) for m in mods]
    used: dict[tuple[int, int], list[torch.Tensor]] = {}
    ds: dict[int, float] = {}
    losses: dict[int, float] = {}

    def tang(m: int, b: int) -> list[torch.Tensor]:
        src = step_source("gaussian", [p.detach() for p in params[m]], 1, SEED, b, m)
        return [src.dense(i, 0) for i in range(len(params[m]))]

    def update(m: int, b: int) -> None:
        with torch.no_grad():
            for p, v in zip(params[m], tang(m, b), strict=True):
                p.sub_(LR * ds[b] * v)

    for s in range(n + big_m - 1):
        for m in range(big_m):
            if s - big_m >= 0:
                update(m, s - big_m)
            if 0 <= s - m < n:
                used[(m, s - m)] = [p.detach().clone().requires_grad_() for p in params[m]]
        b = s - big_m + 1
        if 0 <= b < n:
            h = data[b][0]
            for m, mod in enumerate(mods):
                names = [k for k, _ in mod.named_parameters()]
                h = functional_call(mod, dict(zip(names, used[(m, b)], strict=True)), (h,))
            loss = F.cross_entropy(h, data[b][1])
            flat = [t for m in range(big_m) for t in used[(m, b)]]
            grads = torch.autograd.grad(loss, flat)
            vs = [v for m in range(big_m) for v in tang(m, b)]
            ds[b] = float(sum((g * v).sum() for g, v in zip(grads, vs, strict=True)))
            losses[b] = float(loss.detach())
    for m in range(big_m):
        update(m, n - 1)
    return [losses[b] for b in range(n)]


@pytest.mark.parametrize("split", [1, 3])
def test_schedule_equals_autograd_simulation(split: int) -> None:
    mods = chain() if split == 3 else [nn.Sequential(*chain())]
    ref_mods = copy.deepcopy(mods)
    data = batches(6)
    losses = AsyncFGD(mods, F.cross_entropy, lr=LR, seed=SEED, workers=False).run(data)
    want = reference(ref_mods, data)
    assert losses == pytest.approx(want, rel=0, abs=1e-12)
    for a, b in zip(mods, ref_mods, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


def test_stale_differs_from_synchronous() -> None:
    data = batches(4)
    piped, whole = chain(), nn.Sequential(*chain())
    AsyncFGD(piped, F.cross_entropy, lr=LR, seed=SEED, workers=False).run(data)
    AsyncFGD([whole], F.cross_entropy, lr=LR, seed=SEED, workers=False).run(data)
    assert not torch.equal(piped[0][0].weight, whole[0][0].weight)  # module 0 ran on stale weights


def two_modules() -> list[nn.Module]:
    c = chain()
    return [nn.Sequential(c[0], c[1]), c[2]]


@pytest.mark.slow  # two fresh processes importing torch: 10-20 s on 2 shared cores
def test_processes_equal_one_process_bit_for_bit() -> None:
    data = batches(8)
    a, b = two_modules(), two_modules()
    la = AsyncFGD(a, F.cross_entropy, lr=LR, seed=SEED, workers=True, timeout_s=120).run(data)
    lb = AsyncFGD(b, F.cross_entropy, lr=LR, seed=SEED, workers=False).run(data)
    assert la == lb
    assert all(torch.equal(p, q) for x, y in zip(a, b, strict=True)
               for p, q in zip(x.parameters(), y.parameters(), strict=True))


@pytest.mark.slow
def test_worker_error_reaches_the_caller() -> None:
    data = batches(3)
    data[1] = (torch.randn(4, 9, dtype=torch.float64), data[1][1])  # wrong width for module 0
    with pytest.raises(RuntimeError, match="module 0 failed"):
        AsyncFGD(two_modules(), F.cross_entropy, lr=LR, seed=SEED, workers=True, timeout_s=120).run(data)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="needs at least one module"):
        AsyncFGD([], F.cross_entropy, lr=LR, seed=0)
    with pytest.raises(ValueError, match="module 0 \\(Tanh\\) has no trainable parameter"):
        AsyncFGD([nn.Tanh()], F.cross_entropy, lr=LR, seed=0)
