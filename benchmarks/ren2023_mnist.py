"""Reproduce Ren, Kornblith, Liao & Hinton (ICLR 2023), Table 3, MNIST columns, on a CPU budget.

Trains the LocalMixer S/1/1 and M/1/16 on real MNIST with BP, FG-W, FG-A and LG-FG-A (and optionally any other
registered estimator), evaluates test and train error after every epoch, and writes

* ``<out>/results.json``: every run's settings, per-epoch curves and wall-clock;
* ``<out>/table.md``: final test / train error beside the paper's figures;
* ``<out>/curves.png``: test error against epochs, one panel per configuration.

Optimiser: SGD with momentum 0.9 and a cosine learning-rate schedule over the run; learning rates per method
are arguments (``--lr fg-a=0.01``). Per-example losses (``reduction="none"``) go to estimators that want them.

Example (about an hour on 2 CPU cores)::

    python benchmarks/ren2023_mnist.py --data-dir ../shared/data --epochs 3 --out benchmarks/results/ren2023_mnist
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.models.localmixer import LocalMixer

# Ren et al. (2023), Table 3 (test / train error %, MNIST); see ../shared/ANCHORS.md.
PAPER = {
    ("s1", "bp"): (2.66, 0.00), ("m1-16", "bp"): (2.41, 0.00),
    ("s1", "l-bp"): (2.38, 0.00), ("m1-16", "l-bp"): (2.16, 0.00),
    ("s1", "lg-bp"): (2.43, 0.00), ("m1-16", "lg-bp"): (2.81, 0.00),
    ("s1", "fg-w"): (9.25, 8.93), ("m1-16", "fg-w"): (8.56, 8.64),
    ("s1", "fg-a"): (3.24, 1.53), ("m1-16", "fg-a"): (3.76, 1.75),
    ("s1", "lg-fg-w"): (9.25, 8.93), ("m1-16", "lg-fg-w"): (5.66, 4.59),
    ("s1", "lg-fg-a"): (3.24, 1.53), ("m1-16", "lg-fg-a"): (2.55, 0.00),
}
DEFAULT_LR = {"bp": 0.05, "l-bp": 0.05, "lg-bp": 0.05, "fg-w": 0.001, "lg-fg-w": 0.001, "fg-a": 0.01, "lg-fg-a": 0.02}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    wrong = 0
    for i in range(0, len(y), batch):
        wrong += int((model(x[i : i + batch]).argmax(1) != y[i : i + batch]).sum())
    model.train()
    return 100.0 * wrong / len(y)


def train_one(config: str, method: str, lr: float, data, args) -> dict:
    torch.manual_seed(args.seed)
    model = LocalMixer.from_config(config, data.input_shape, data.num_classes)
    kwargs = {} if method in ("bp", "l-bp", "lg-bp") else {"seed": args.seed}
    est = fwdgrad.estimator(method, **kwargs)
    reduction = "none" if type(est).per_example_loss else "mean"
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(data.y_train) if args.train_subset is None else min(args.train_subset, len(data.y_train))
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(args.seed)
    eval_x, eval_y = data.x_train[: args.train_eval], data.y_train[: args.train_eval]
    curve, start, losses = [], time.perf_counter(), []
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(data.y_train), generator=gen)[:n]
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = est(model, lambda m, x=x, y=y: F.cross_entropy(m(x), y, reduction=reduction))
            opt.step()
            sched.step()
            losses.append(float(loss))
        train_time = time.perf_counter() - start
        point = {
            "epoch": epoch,
            "test_error": error_rate(model, data.x_test, data.y_test),
            "train_error": error_rate(model, eval_x, eval_y),
            "train_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
            "train_seconds": train_time,
        }
        curve.append(point)
        print(f"{config:6s} {method:8s} lr={lr:g} epoch {epoch}: test {point['test_error']:.2f}% "
              f"train {point['train_error']:.2f}% loss {point['train_loss_last_100']:.3f} "
              f"({train_time:.0f}s)", flush=True)
    return {"config": config, "method": method, "lr": lr, "epochs": args.epochs, "batch_size": args.batch_size,
            "train_examples_per_epoch": n, "curve": curve, "paper": PAPER.get((config, method))}


def table(runs: list[dict], args) -> str:
    lines = [
        f"MNIST, LocalMixer; {args.epochs} epoch(s) of {runs[0]['train_examples_per_epoch']} examples, batch "
        f"{args.batch_size}, SGD momentum 0.9, cosine schedule, seed {args.seed}; train error on the first "
        f"{args.train_eval} training images; {torch.get_num_threads()} CPU thread(s).",
        "",
        "| config | method | lr | ours test / train error % | paper test / train % | train wall-clock (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = r["curve"][-1]
        paper = r["paper"]
        paper_s = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "—"
        lines.append(
            f"| {r['config']} | {r['method']} | {r['lr']:g} | {last['test_error']:.2f} / {last['train_error']:.2f} "
            f"| {paper_s} | {last['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in runs}, key=[r["config"] for r in runs].index)
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        for r in runs:
            if r["config"] != cfg:
                continue
            ep = [p["epoch"] for p in r["curve"]]
            label = f"{r['method']} (lr {r['lr']:g})"
            (line,) = ax.plot(ep, [p["test_error"] for p in r["curve"]], marker="o", label=label)
            if r["paper"]:
                ax.axhline(r["paper"][0], color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"LocalMixer {cfg} on MNIST (dotted: paper)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error %")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--configs", default="s1,m1-16")
    ap.add_argument("--methods", default="bp,fg-w,fg-a,lg-fg-a")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-subset", type=int, default=None, help="examples per epoch (default: all 60000)")
    ap.add_argument("--train-eval", type=int, default=10000, help="training images used for the train error")
    ap.add_argument("--lr", action="append", default=[], help="method=lr, repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ren2023_mnist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrs = dict(DEFAULT_LR)
    for item in args.lr:
        k, v = item.split("=")
        lrs[k] = float(v)
    data = load_dataset("mnist", args.data_dir)
    out = Path(args.out)
    runs: list[dict] = []
    for cfg in args.configs.split(","):
        for method in args.methods.split(","):
            runs.append(train_one(cfg, method, lrs[method], data, args))
            write_atomic(out / "results.json", json.dumps({"args": vars(args), "runs": runs}, indent=1))
            write_atomic(out / "table.md", table(runs, args))
            plot(runs, out / "curves.png")
    print(table(runs, args))


if __name__ == "__main__":
    main()
