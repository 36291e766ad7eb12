"""How well ``fg-guess`` and L-BP updates align with backprop's gradient per block, during training.

Trains ``block-cnn:channels=16x32x32`` on MNIST with one method (Adam, batch 64, one thread) and every
``--every`` steps measures, on a fixed batch of 256 held-out training images (the last 10,000 of the
training set, never trained on), the cosine between each estimator's update of a block's parameters and
backprop's gradient of the same loss, and the mean per-example ``|cos(u_i, ∇_{h_i} L)|`` of the local guess at
the block outputs (docs/guided.md)::

    python benchmarks/guess_training_alignment.py --data-dir ../shared/data --steps 312 --every 52
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.models import build_model

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data-dir", default="../shared/data")
ap.add_argument("--model", default="16x32x32", help="block-cnn channels")
ap.add_argument("--train-method", default="fg-guess:guess=local")
ap.add_argument("--steps", type=int, default=312)
ap.add_argument("--every", type=int, default=52)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--out", default=None, help="write the measurements as JSON here")
args = ap.parse_args()
torch.set_num_threads(1)
data = load_dataset("mnist", args.data_dir)
n_pool = len(data.y_train) - 10000
xv, yv = data.x_train[n_pool : n_pool + 256], data.y_train[n_pool : n_pool + 256]
torch.manual_seed(0)
model = build_model("block-cnn", data.input_shape, 10, channels=args.model)
blocks = [[n for n, _ in model.named_parameters() if n.startswith(f"blocks.{k}.")] for k in range(len(model.blocks))]

PROBES = {
    "l-bp": ("l-bp", {}),
    "local/activation": ("fg-guess", {"guess": "local"}),
    "local/weight": ("fg-guess", {"guess": "local", "space": "weight"}),
    "above/activation": ("fg-guess", {"guess": "above"}),
}


def update(name: str, opts: dict, x, y) -> dict[str, torch.Tensor]:
    est = fwdgrad.estimator(name, **opts)
    red = "none" if type(est).per_example_loss else "mean"
    model.zero_grad(set_to_none=True)
    est(model, lambda m: F.cross_entropy(m(x), y, reduction=red))
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, est


def measure(step: int) -> dict:
    ref, _ = update("bp", {}, xv, yv)
    row: dict = {"step": step}
    for label, (name, opts) in PROBES.items():
        g, est = update(name, opts, xv, yv)
        cos = []
        for names in blocks:
            a = torch.cat([g.get(n, torch.zeros_like(ref[n])).flatten() for n in names])
            b = torch.cat([ref[n].flatten() for n in names])
            cos.append(round(float(F.cosine_similarity(a, b, dim=0)), 3))
        row[label] = cos
        if label == "local/activation":
            outs: dict = {}
            hs = [b.register_forward_hook(lambda m, a, o, k=k, outs=outs: outs.__setitem__(k, o))
                  for k, b in enumerate(model.blocks)]
            loss = F.cross_entropy(model(xv), yv)
            gh = torch.autograd.grad(loss, [outs[k] for k in range(len(model.blocks))])
            for h in hs:
                h.remove()
            row["u_cos_per_example"] = [
                round(float(F.cosine_similarity(est.last_guesses[k].flatten(1), gh[k].flatten(1), dim=1)
                            .abs().mean()), 3)
                for k in range(len(model.blocks))]
    print(json.dumps(row), flush=True)
    return row


tname, _, topts_s = args.train_method.partition(":")
topts = dict(kv.split("=") for kv in filter(None, topts_s.split(",")))
train_est = fwdgrad.estimator(tname, **topts, **({"seed": 0} if tname.startswith("fg") else {}))
red = "none" if type(train_est).per_example_loss else "mean"
opt = torch.optim.Adam(model.parameters(), lr=args.lr)
gen = torch.Generator().manual_seed(0)
order = torch.randperm(n_pool, generator=gen)
rows = []
for step in range(args.steps + 1):
    if step % args.every == 0:
        rows.append(measure(step))
    if step == args.steps:
        break
    idx = order[step * 64 : (step + 1) * 64]
    x, y = data.x_train[idx], data.y_train[idx]
    opt.zero_grad(set_to_none=True)
    train_est(model, lambda m, x=x, y=y: F.cross_entropy(m(x), y, reduction=red))
    opt.step()
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
