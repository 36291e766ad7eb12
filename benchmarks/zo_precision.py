"""Zeroth-order estimates in half precision: the measurements behind docs/precision.md.

Three parts (``--part``, default all):

* ``eps``: the relative error of the two-point derivative ``d_k`` against the exact directional derivative in
  float64 on the same (rounded) weights, for a grid of ε, per dtype (bfloat16, float16, float32, float32
  under ``torch.autocast``), with the loss computed in the model's dtype or in float32; and the share of
  entries whose ``θ + εz`` rounds back to ``θ``. MLP 8-16-16-4 (tanh), batch 64, ``--directions`` directions.
* ``restore``: what ``restore="exact"`` saves per step (share of entries, bytes) on an MLP 784-256-256-10,
  per dtype at the default ε and at 1e-3.
* ``timing``: the median step time per restore mode (a loaded machine: read the ratios only).
* ``sgd``: the fused step's update in bfloat16: the share of entries whose update ``lr·ĝ`` is lost entirely
  by round-to-nearest, per learning rate; then training (MLP 16-32-4 on a fixed generated task, ``--steps``
  fused ``zo`` steps at ``--lr``) in float32, in bfloat16 with round-to-nearest and with stochastic
  rounding: the final full-data loss of each.

Example::

    python benchmarks/zo_precision.py --part eps --directions 200
    python benchmarks/zo_precision.py --part sgd --steps 3000 --lr 0.02
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import fwdgrad
from fwdgrad.derivatives.finite_difference import Perturbation, RoundingLedger, spsa_directional_derivatives

DTYPES = {"bfloat16": (torch.bfloat16, None), "float16": (torch.float16, None), "float32": (torch.float32, None),
          "autocast-bf16": (torch.float32, torch.bfloat16)}


def _context(autocast: torch.dtype | None):
    return torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)


def part_eps(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x0, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    print("| weights | loss in | ε | rel. error of d | rounded back to θ |\n|---|---|---|---|---|")
    for label, (dtype, autocast) in DTYPES.items():
        model, x = copy.deepcopy(base).to(dtype), x0.to(dtype)
        m64, x64 = copy.deepcopy(model).double(), x.double()
        p64 = {n: p.detach() for n, p in m64.named_parameters()}
        names, params = list(p64), list(model.parameters())

        def f64(ps: dict, m64: nn.Module = m64, x64: torch.Tensor = x64) -> torch.Tensor:
            return F.cross_entropy(functional_call(m64, ps, (x64,)), y)

        for loss_in in ("model dtype", "float32"):
            cast = (lambda z: z.float()) if loss_in == "float32" else (lambda z: z)
            for eps in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
                src = Perturbation("gaussian", params, args.directions, torch.Generator().manual_seed(1))
                with _context(autocast):
                    _, d = spsa_directional_derivatives(
                        model, lambda m, x=x, cast=cast: F.cross_entropy(cast(m(x)), y), params, src, eps=eps)
                z = src.materialise()
                exact = torch.stack([
                    jvp(f64, (p64,), ({n: z[i][k].double() for i, n in enumerate(names)},))[1]
                    for k in range(args.directions)
                ])
                err = float((d.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
                with torch.no_grad():
                    back = sum(int(((p + eps * t[0]) == p).sum()) for p, t in zip(params, z))
                share = back / sum(p.numel() for p in params)
                print(f"| {label} | {loss_in} | {eps:g} | {err:.3f} | {share:.1%} |", flush=True)


def part_restore(args: argparse.Namespace) -> None:
    print("| weights | ε | entries | differing after the chain | kept per direction | a snapshot | rounded back to θ |")
    print("|---|---|---|---|---|---|---|")
    for label, (dtype, autocast) in DTYPES.items():
        if autocast:
            continue
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        model = model.to(dtype)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        n = sum(p.numel() for p in params)
        for eps in (None, 1e-3):
            step = fwdgrad.estimator("zo", eps=eps).step_size(params)
            kept, differ, back, steps = 0, 0, 0.0, args.restore_steps
            for s in range(steps):
                src = Perturbation("gaussian", params, 1, torch.Generator().manual_seed(s))
                ledger = RoundingLedger(params)
                with torch.no_grad():
                    ledger.perturb_(src, 0, step, two_point=True)
                    kept += ledger.saved_bytes
                    src.add_(0, -2 * step)
                    src.add_(0, step)
                    differ += sum(int((p != b).sum()) for p, b in zip(params, before))
                    ledger.patch_()
                assert all(torch.equal(p, b) for p, b in zip(params, before))
                back += float(ledger.rounded_away) / float(ledger.perturbed)
            print(f"| {label} | {step:g} | {n:,} | {differ / steps / n:.1%} | {kept / steps / 1024:.0f} KiB | "
                  f"{n * params[0].element_size() / 1024:.0f} KiB | {back / steps:.1%} |", flush=True)


def part_timing(args: argparse.Namespace) -> None:
    """Median step time of ``zo`` per restore mode (``.grad`` and fused with lr = 0), MLP 784-256-256-10."""
    import statistics
    import time

    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    print("| weights | restore | .grad step ms | fused step ms |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        model, xs = model.to(dtype), x.to(dtype)

        def loss_fn(m: nn.Module, xs: torch.Tensor = xs) -> torch.Tensor:
            return F.cross_entropy(m(xs).float(), y)

        for restore in ("exact", "regenerate", "snapshot"):
            est = fwdgrad.estimator("zo", seed=0, restore=restore)
            times: dict[str, list[float]] = {"grad": [], "fused": []}
            for _ in range(args.timing_steps):  # round-robin: the two kinds of step see the same load
                for kind in times:
                    start = time.perf_counter()
                    if kind == "grad":
                        est(model, loss_fn)
                        model.zero_grad(set_to_none=True)
                    else:
                        est.sgd_step(model, loss_fn, lr=0.0)
                    times[kind].append(time.perf_counter() - start)
            grad_ms, fused_ms = (statistics.median(t[2:]) * 1e3 for t in times.values())
            print(f"| {str(dtype)[6:]} | {restore} | {grad_ms:.1f} | {fused_ms:.1f} |", flush=True)


def _task() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 2)
        y = teacher(x).argmax(1)
    torch.manual_seed(1)
    return x, y, nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def train(dtype: torch.dtype, rounding: str, steps: int, lr: float, seed: int = 0) -> float:
    """Final full-data float32 loss after ``steps`` fused ``zo`` steps (batch 64) in ``dtype``."""
    x, y, model = _task()
    model = model.to(dtype)
    xs = x.to(dtype)
    est = fwdgrad.estimator("zo", seed=seed, rounding=rounding)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        est.sgd_step(model, lambda m, idx=idx: F.cross_entropy(m(xs[idx]).float(), y[idx]), lr=lr)
    with torch.no_grad():
        return float(F.cross_entropy(model(xs).float(), y))


def part_sgd(args: argparse.Namespace) -> None:
    x, y, model = _task()
    model = model.to(torch.bfloat16)
    params = list(model.parameters())
    est = fwdgrad.estimator("zo", seed=0)
    print("| lr | share of entries whose bfloat16 update is lost |\n|---|---|")
    for lr in (1e-2, 1e-3, 1e-4, 1e-5):
        for p in params:
            p.grad = None
        est(model, lambda m: F.cross_entropy(m(x.to(torch.bfloat16)).float(), y))
        with torch.no_grad():
            moved = sum(int(((p - lr * p.grad) == p).sum()) for p in params if p.grad is not None)
            live = sum(int((p.grad != 0).sum()) for p in params)
        print(f"| {lr:g} | {moved / live:.1%} |", flush=True)
    start = train(torch.float32, "nearest", 0, args.lr)
    print(f"\nTraining, {args.steps} fused zo steps at lr {args.lr}, batch 64, seeds {args.seeds}; "
          f"starting loss {start:.4f}:")
    print("| weights | rounding | final loss (mean over seeds) |\n|---|---|---|")
    for dtype, rounding in ((torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")):
        losses = [train(dtype, rounding, args.steps, args.lr, seed) for seed in range(args.seeds)]
        each = ", ".join(f"{v:.4f}" for v in losses)
        print(f"| {str(dtype)[6:]} | {rounding} | {sum(losses) / len(losses):.4f} ({each}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("eps", "restore", "sgd", "timing", "all"), default="all")
    parser.add_argument("--directions", type=int, default=200)
    parser.add_argument("--restore-steps", type=int, default=20)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for part in ("eps", "restore", "sgd", "timing") if args.part == "all" else (args.part,):
        print(f"\n## {part}\n", flush=True)
        {"eps": part_eps, "restore": part_restore, "sgd": part_sgd, "timing": part_timing}[part](args)


if __name__ == "__main__":
    main()
