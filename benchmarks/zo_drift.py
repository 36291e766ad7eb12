"""Rounding drift of in-place perturbation, and what the bit-exact ``restore="snapshot"`` costs.

Runs ``--steps`` fused ``zo`` steps with ``lr = 0`` on one batch (so the only change to the parameters is what
the perturbations ``+εz, −2εz, +εz`` leave behind), for ``restore="regenerate"`` (MeZO's way, no extra
memory) and ``restore="snapshot"`` (a copy of the parameters, copied back after each evaluation), on a
float32 MLP of ``--width`` hidden units. Reports the drift (largest and RMS change, the fraction of entries
changed, the RMS change over the RMS of θ), the median step time, and the size of the copy.

Example::

    python benchmarks/zo_drift.py --steps 1000 --eps 1e-3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad


def run(restore: str, args) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, args.width), nn.Tanh(), nn.Linear(args.width, args.width), nn.Tanh(),
                          nn.Linear(args.width, 10))
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    est = fwdgrad.estimator("zo", eps=args.eps, seed=0, restore=restore)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.0)
        times.append(time.perf_counter() - t)
    end = torch.cat([p.detach().flatten() for p in model.parameters()])
    delta = (end - start).double()
    return {
        "restore": restore, "n": start.numel(), "max_abs": float(delta.abs().max()),
        "rms": float(delta.pow(2).mean().sqrt()), "changed": float((delta != 0).double().mean()),
        "relative_rms": float(delta.pow(2).mean().sqrt() / start.double().pow(2).mean().sqrt()),
        "ms": 1e3 * statistics.median(times), "copy_mb": start.numel() * 4 / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"steps={args.steps} eps={args.eps} width={args.width} batch={args.batch} threads={args.threads}")
    print("| restore | n | max abs drift | RMS drift | entries changed | RMS drift / RMS θ | step ms | copy MB |")
    print("|---|---|---|---|---|---|---|---|")
    for restore in ("regenerate", "snapshot"):
        r = run(restore, args)
        print(f"| {r['restore']} | {r['n']:,} | {r['max_abs']:.2e} | {r['rms']:.2e} | {100 * r['changed']:.1f} % | "
              f"{r['relative_rms']:.1e} | {r['ms']:.2f} | {r['copy_mb'] if restore == 'snapshot' else 0:.2f} |")


if __name__ == "__main__":
    main()
