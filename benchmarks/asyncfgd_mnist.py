"""AsyncFGD on MNIST: throughput of the 2-module pipeline (2 processes) against the synchronous step, and
test accuracy after a few epochs, same initial weights, seeds and learning rate::

    PYTHONPATH=src python benchmarks/asyncfgd_mnist.py --data-dir ../shared/data --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.data import load_dataset
from fwdgrad.distributed import AsyncFGD


def modules() -> list[nn.Module]:
    """MLP 784-256-256-10 (ReLU) in two modules of about equal cost."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU()),
            nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))]


def accuracy(mods: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        h = x
        for m in mods:
            h = m(h)
        return float((h.argmax(1) == y).float().mean())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FWDGRAD_DATA_DIR", "data"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--timing-batches", type=int, default=300)
    ap.add_argument("--train-subset", type=int, default=0, help="train on the first N examples only (0: all)")
    ap.add_argument("--out", default="benchmarks/results/asyncfgd_mnist.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir)
    b = args.batch
    n_train = args.train_subset or data.x_train.shape[0]
    n = n_train // b * b
    result: dict[str, object] = {"command": "benchmarks/asyncfgd_mnist.py " + " ".join(argv),
                                 "load_average_start": os.getloadavg()}
    # throughput: the same batches through the synchronous step, the pipeline in one thread, in two threads
    batches = [(data.x_train[i:i + b], data.y_train[i:i + b]) for i in range(0, args.timing_batches * b, b)]
    timing = {}
    for label, split, workers in (("synchronous", False, False), ("pipeline, 1 process", True, False),
                                  ("pipeline, 2 processes", True, True)):
        mods = modules() if split else [nn.Sequential(*modules())]
        began = time.perf_counter()  # includes starting the worker processes
        AsyncFGD(mods, F.cross_entropy, lr=args.lr, seed=0, workers=workers).run(batches)
        timing[label] = len(batches) * b / (time.perf_counter() - began)
        print(f"{label:<20} {timing[label]:8.0f} examples/s", flush=True)
    result["examples_per_s"] = timing
    # convergence: epochs over MNIST, test accuracy after each
    curves = {}
    for label, split in (("synchronous", False), ("asyncfgd M=2", True)):
        mods = modules() if split else [nn.Sequential(*modules())]
        accs = []
        for epoch in range(args.epochs):
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch))[:n]
            epoch_batches = [(data.x_train[order[i:i + b]], data.y_train[order[i:i + b]]) for i in range(0, n, b)]
            AsyncFGD(mods, F.cross_entropy, lr=args.lr, seed=1000 * epoch, workers=split).run(epoch_batches)
            accs.append(accuracy(mods, data.x_test, data.y_test))
            print(f"{label:<14} epoch {epoch + 1}: test accuracy {accs[-1]:.4f}", flush=True)
        curves[label] = accs
    result["test_accuracy_by_epoch"] = curves
    result["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
