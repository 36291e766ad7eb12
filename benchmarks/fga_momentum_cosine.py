"""How well does fg-a's momentum guess point along the gradient? (docs/directions.md)

Trains the MLP 784-128-10 of ``directions_mnist.py`` with ``fg-a`` ``directions="momentum"`` (K = 1, Adam lr
1e-3, batch 128, the same seeded batches) and prints, at a few steps, the cosine between the guess ``u`` (the
unit running average over the hidden layer's parameters, the read-out being exact) and the true gradient of
the batch's loss over those parameters, from autograd, before the step.

    python benchmarks/fga_momentum_cosine.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.directions.stateful import MomentumState


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--steps", default="2,10,100,1000,3000")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    at = sorted(int(s) for s in args.steps.split(","))
    data = load_dataset("mnist", args.data_dir)
    x, y = data.x_train.float(), data.y_train
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    est = fwdgrad.estimator("fg-a", seed=args.seed, directions="momentum")
    order = torch.Generator().manual_seed(args.seed)
    params = list(model.parameters())
    hidden = [i for i, (n, _) in enumerate(model.named_parameters()) if not n.startswith("3.")]
    for step in range(1, at[-1] + 1):
        idx = torch.randint(0, len(y), (128,), generator=order)
        xb, yb = x[idx], y[idx]
        loss_fn = lambda m, xb=xb, yb=yb: F.cross_entropy(m(xb), yb, reduction="none")
        if step in at:
            state = est._momentum.bind(params)
            u = est._momentum.source.guess(MomentumState([state.average[i] for i in hidden], state.count))
            g = torch.autograd.grad(loss_fn(model).mean(), [params[i] for i in hidden])
            gf, uf = torch.cat([t.reshape(-1) for t in g]), torch.cat([t.reshape(-1) for t in u])
            print(f"step {step}: cos(u, ∇L) = {float(uf @ gf / gf.norm()):.4f}", flush=True)
        opt.zero_grad()
        est(model, loss_fn)
        opt.step()


if __name__ == "__main__":
    main()
