"""Momentum directions and the projection aggregation against plain Gaussian FG-W on MNIST: steps to a
training loss (issue 11, item 3).

Every method trains the same MLP (784-128-10) from the same initial weights on the same batches (batch 128,
Adam lr 1e-3, fg-w's Adam default), for a fixed number of steps; the figure is the first step at which the
moving average (window 50) of the training loss falls below each threshold. Step counts do not depend on
the machine's load. Methods are compared at an equal number of directional derivatives per step: K = 4
mean vs K = 4 projection vs momentum with K = 3 (3 fresh + 1 along the guess) vs mixed with K = 4; K = 1
against mixed with K = 1 (``directions="mixed"``: Silver et al.'s biased form, the guess mixed into each
tangent, one derivative per direction).

    python benchmarks/directions_mnist.py --data-dir ../shared/data --steps 3000

``--family fg-a`` runs the same comparison for activity perturbation (per-example losses): fg-a with K = 1
and K = 2 passes against fg-a's momentum guess with K = 1 (1 activity pass + 1 weight-space JVP along the
guess), results in ``benchmarks/results/directions_mnist_fg-a``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.data import load_dataset

METHODS = {
    "fg-w K=1": {"num_directions": 1},
    "fg-w K=4 mean": {"num_directions": 4},
    "fg-w K=4 projection": {"num_directions": 4, "aggregation": "projection"},
    "fg-w momentum K=1 (2 derivatives)": {"num_directions": 1, "directions": "momentum"},
    "fg-w momentum K=3 (4 derivatives)": {"num_directions": 3, "directions": "momentum"},
    "fg-w momentum β=0.99 K=1 (2 derivatives)": {"num_directions": 1, "directions": "momentum", "direction_beta": 0.99},
    "fg-w momentum β=0.99 K=3 (4 derivatives)": {"num_directions": 3, "directions": "momentum", "direction_beta": 0.99},
    "fg-w mixed β=0.3 K=1 (1 derivative)": {"num_directions": 1, "directions": "mixed", "guess_weight": 0.3},
    "fg-w mixed β=0.3 K=4 (4 derivatives)": {"num_directions": 4, "directions": "mixed", "guess_weight": 0.3},
}
FG_A_METHODS = {
    "fg-a K=1": {"num_directions": 1},
    "fg-a K=2 (2 passes)": {"num_directions": 2},
    "fg-a momentum K=1 (2 passes)": {"num_directions": 1, "directions": "momentum"},
    "fg-a momentum β=0.99 K=1 (2 passes)": {"num_directions": 1, "directions": "momentum", "direction_beta": 0.99},
}
THRESHOLDS = (1.5, 1.0, 0.7, 0.5)
FG_A_THRESHOLDS = (1.0, 0.6, 0.4, 0.3)  # fg-a's loss falls much faster than fg-w's


def run(name: str, options: dict, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int,
        family: str = "fg-w", thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    est = fwdgrad.estimator(family, seed=seed, **options)
    reduction = "none" if est.per_example_loss else "mean"
    order = torch.Generator().manual_seed(seed)
    losses, reached = [], {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (128,), generator=order)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = est(model, lambda m, xb=xb, yb=yb: F.cross_entropy(m(xb), yb, reduction=reduction))
        opt.step()
        losses.append(float(loss))
        avg = sum(losses[-50:]) / len(losses[-50:])
        for t in thresholds:
            if t not in reached and step >= 50 and avg < t:
                reached[t] = step
    return {"method": name, "options": options, "steps_to_loss": {str(t): reached.get(t) for t in thresholds},
            "final_avg_loss": sum(losses[-50:]) / 50, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=("fg-w", "fg-a"), default="fg-w")
    p.add_argument("--out", default=None, help="default benchmarks/results/directions_mnist[_fg-a]")
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only the methods whose name contains TEXT (repeatable)")
    args = p.parse_args()
    if args.out is None:
        args.out = "benchmarks/results/directions_mnist" + ("_fg-a" if args.family == "fg-a" else "")
    methods = FG_A_METHODS if args.family == "fg-a" else METHODS
    if args.only:
        methods = {k: v for k, v in methods.items() if any(t in k for t in args.only)}
        if not methods:
            p.error(f"--only {args.only} matches no method")
    thresholds = FG_A_THRESHOLDS if args.family == "fg-a" else THRESHOLDS
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir)
    x, y = data.x_train.float(), data.y_train
    rows = [run(name, opts, x, y, args.steps, args.seed, args.family, thresholds) for name, opts in methods.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": " ".join(["python", *__import__("sys").argv]),
                                                  "rows": rows}, indent=2))
    lines = ["| method | " + " | ".join(f"steps to loss < {t}" for t in thresholds) + " | final loss (avg 50) |",
             "|---|" + "---|" * (len(thresholds) + 1)]
    for r in rows:
        cells = [str(r["steps_to_loss"][str(t)] or "—") for t in thresholds]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['final_avg_loss']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
