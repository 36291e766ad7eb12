"""The read-out-only baseline for DFA on the LocalMixer (docs/guided.md): every hidden unit frozen at its
initialisation, only the read-out trained (backprop through the read-out alone). What a method that trains
the hidden units must beat to show that they learn.

Adam lr 1e-3, batch 128, ``--epochs`` epochs over the first 54,000 MNIST training images (the size of
``fwdgrad compare``'s training split), seed 0, one thread; prints the test accuracy.

    python benchmarks/localmixer_readout_only.py --data-dir ../shared/data --model localmixer-s1 --epochs 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fwdgrad.data import load_dataset
from fwdgrad.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="localmixer-s1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir)
    x, y = data.x_train.float()[:54000], data.y_train[:54000]
    torch.manual_seed(args.seed)
    model = build_model(args.model, tuple(x.shape[1:]), 10)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("readout."))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        xt, yt = data.x_test.float(), data.y_test
        hits = sum(int((model(xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum()) for i in range(0, len(yt), 1000))
    print(f"{args.model}: read-out only, {args.epochs} epoch(s): test accuracy {100 * hits / len(yt):.2f} %")


if __name__ == "__main__":
    main()
