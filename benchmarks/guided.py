"""Guided forward gradients on real data: feedback alignment (FA, DFA, FDFA) and gradient guesses (fg-guess).

Trains one model on one dataset with several estimators, evaluates test and train error after every epoch,
and writes ``<out>/results.json`` (settings, curves, wall-clock) and ``<out>/table.md``.

A method is a registry name, optionally with options: ``fg-guess:guess=above,space=weight``. Learning rates
per method with ``--lr METHOD=LR`` (the method string as written in ``--methods``), else ``--default-lr``.

Examples (the runs of docs/guided.md; minutes on 1 CPU thread)::

    python benchmarks/guided.py --dataset mnist --model fdfa-mlp --methods bp,fa,dfa,fdfa,fg-w,fg-a \\
        --epochs 1 --out benchmarks/results/guided/mnist_fdfa-mlp
    python benchmarks/guided.py --dataset mnist --model block-cnn:channels=16x32x32 --optimizer sgd \\
        --methods bp,l-bp,fg-w,fg-guess:guess=local,fg-guess:guess=random --train-subset 20000 \\
        --out benchmarks/results/guided/mnist_block-cnn

Fournier et al.'s ResNet-18 / CIFAR-10 setting (needs a GPU and the CIFAR-10 files; not run here)::

    python benchmarks/guided.py --dataset cifar10 --data-dir DATA --model resnet18-blocks:blocks=16 \\
        --methods bp,l-bp,fg-guess:guess=local --optimizer sgd --momentum 0.9 --weight-decay 5e-4 \\
        --default-lr 0.05 --batch-size 128 --epochs 100 --step-every 30 --step-gamma 0.2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.models import build_model


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` → ``(name, {key: value})`` with ints/floats converted."""
    name, _, rest = spec.partition(":")
    opts: dict = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        for conv in (int, float):
            try:
                opts[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            opts[k] = v
    return name, opts


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 1000) -> float:
    model.eval()
    wrong = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        wrong += int((model(xb).argmax(1) != yb).sum())
    model.train()
    return 100.0 * wrong / len(y)


def train_one(method: str, lr: float, data, args) -> dict:
    torch.manual_seed(args.seed)
    mname, mopts = parse_spec(args.model)
    model = build_model(mname, data.input_shape, data.num_classes, **mopts).to(args.device)
    ename, eopts = parse_spec(method)
    if ename not in ("bp", "l-bp", "lg-bp"):
        eopts.setdefault("seed", args.seed)
    est = fwdgrad.estimator(ename, **eopts)
    reduction = "none" if type(est).per_example_loss else "mean"
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    n_pool = len(data.y_train) - args.val
    n = n_pool if args.train_subset is None else min(args.train_subset, n_pool)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.step_every, gamma=args.step_gamma)
    gen = torch.Generator().manual_seed(args.seed)
    curve, losses, train_time = [], [], 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n_pool, generator=gen)[:n]
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = data.x_train[idx].to(args.device), data.y_train[idx].to(args.device)
            opt.zero_grad(set_to_none=True)
            loss = est(model, lambda m, x=x, y=y: F.cross_entropy(m(x), y, reduction=reduction))
            opt.step()
            losses.append(float(loss))
        sched.step()
        train_time += time.perf_counter() - start
        point = {
            "epoch": epoch,
            "test_error": error_rate(model, data.x_test, data.y_test, args.device),
            "train_error": error_rate(model, data.x_train[: args.train_eval], data.y_train[: args.train_eval],
                                      args.device),
            "val_error": (error_rate(model, data.x_train[n_pool:], data.y_train[n_pool:], args.device)
                          if args.val else None),
            "train_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
            "train_seconds": train_time,
        }
        curve.append(point)
        val = f"val {point['val_error']:.2f}% " if args.val else ""
        print(f"{args.dataset} {args.model} {method} lr={lr:g} epoch {epoch}: test {point['test_error']:.2f}% "
              f"train {point['train_error']:.2f}% {val}loss {point['train_loss_last_100']:.3f} ({train_time:.0f}s)",
              flush=True)
    return {"method": method, "lr": lr, "train_examples_per_epoch": n, "curve": curve}


def table(runs: list[dict], args) -> str:
    opt = (f"Adam (weight decay {args.weight_decay:g})" if args.optimizer == "adam"
           else f"SGD momentum {args.momentum:g} (weight decay {args.weight_decay:g})")
    lines = [
        f"{args.dataset}, model {args.model}; {args.epochs} epoch(s) of {runs[0]['train_examples_per_epoch']} "
        f"examples, batch {args.batch_size}, {opt}, lr × {args.step_gamma:g} every {args.step_every} epoch(s), "
        f"seed {args.seed}; train error on the first {args.train_eval} training images; "
        + (f"val error on the last {args.val} training images (held out); " if args.val else "") +
        f"{torch.get_num_threads()} thread(s) on {args.device}.",
        "",
        "| method | lr | test error % | train error % | val error % | train loss (last 100 steps) "
        "| train wall-clock (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = r["curve"][-1]
        val = f"{last['val_error']:.2f}" if last.get("val_error") is not None else "–"
        lines.append(f"| {r['method']} | {r['lr']:g} | {last['test_error']:.2f} | {last['train_error']:.2f} | "
                     f"{val} | {last['train_loss_last_100']:.3f} | {last['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="fdfa-mlp", help="registered model, options as name:key=value,...")
    ap.add_argument("--methods", default="bp,fa,dfa,fdfa")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-subset", type=int, default=None, help="examples per epoch (default: all)")
    ap.add_argument("--train-eval", type=int, default=10000)
    ap.add_argument("--val", type=int, default=0,
                    help="hold out the last VAL training images (never trained on) and report their error, "
                         "to choose settings without the test set")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--default-lr", type=float, default=1e-3)
    ap.add_argument("--lr", action="append", default=[], help="method=lr, repeatable")
    ap.add_argument("--step-every", type=int, default=1, help="StepLR period in epochs")
    ap.add_argument("--step-gamma", type=float, default=1.0, help="StepLR factor (1: constant)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/guided/run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrs = {}
    for item in args.lr:
        k, _, v = item.rpartition("=")
        lrs[k] = float(v)
    data = load_dataset(args.dataset, args.data_dir)
    out = Path(args.out)
    runs: list[dict] = []
    for method in args.methods.split(";") if ";" in args.methods else _split_methods(args.methods):
        runs.append(train_one(method, lrs.get(method, args.default_lr), data, args))
        write_atomic(out / "results.json", json.dumps({"args": vars(args), "runs": runs}, indent=1))
        write_atomic(out / "table.md", table(runs, args))
    print(table(runs, args))


def _split_methods(text: str) -> list[str]:
    """Split ``"bp,fg-guess:guess=local,space=weight,fa"`` into methods: a ``key=value`` item joins the method
    before it."""
    out: list[str] = []
    for item in text.split(","):
        if "=" in item and ":" not in item and out and ":" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    main()
