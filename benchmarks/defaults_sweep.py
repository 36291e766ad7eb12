"""Do the default learning rates learn? One epoch of every method on every built-in dataset × model pair.

For each pair (``--pairs``, default :data:`PAIRS`), each method that can train the model (``all``, as
``fwdgrad compare --methods all`` resolves it) and each optimizer (SGD with momentum 0.9, Adam), one epoch
at the method's default learning rate (:func:`fwdgrad.training.lr.default_lr`, the rate ``fwdgrad train``
uses when none is given, scaled to the model's size where the recipe says so) on a seeded subset of the
training set, batch 128, seed 0. Measured on a fixed probe of 1,024 training examples of the subset: the mean
cross-entropy before the epoch (the initial weights) and after it, and the mean of the epoch's step losses.

A default *learns* when the run completes with finite losses and the probe loss after the epoch is at most
``0.95 ×`` the loss before (a drop of 5 % or more). It *diverges* when a loss is non-finite, the run stopped,
the probe loss rose by more than 5 %, or the epoch's mean step loss exceeds 1.5 × the loss before (a run
that blows up and comes back, like DFA's 637.7 on the MNIST mlp). Anything else is *slow*: finite, but
less than a 5 % drop in one epoch.

Results go to ``OUT/results.json`` (rewritten atomically after every run, so a killed sweep keeps what it
measured; ``--resume`` skips the runs already there with the same lr) and ``OUT/table.md``.

Example::

    PYTHONPATH=src python benchmarks/defaults_sweep.py --data-dir ../shared/data --threads 1 --out runs/defaults
    PYTHONPATH=src python benchmarks/defaults_sweep.py --pairs mnist1d:mlp --methods bp,fg-w --out runs/d1
"""

from __future__ import annotations

import argparse
import json
import math
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fwdgrad._io import write_atomic
from fwdgrad.training import MethodSpec, RunConfig, initial_model, resolve_methods, split_dataset, train_run
from fwdgrad.training.experiment import load_data
from fwdgrad.training.lr import default_lr

# Built-in dataset × model pairs whose models accept the dataset's shape. Subsets keep one epoch short on
# two shared cores; CIFAR-10 is left out where its files are absent (see --pairs).
PAIRS = (
    "mnist1d:mlp", "mnist1d:fdfa-mlp", "mnist1d:cnn", "mnist1d:gru", "mnist1d:lstm", "mnist1d:lif",
    "mnist:mlp", "mnist:fdfa-mlp", "mnist:localmixer-s1", "fashion-mnist:mlp", "fashion-mnist:fdfa-mlp",
    "fashion-mnist:localmixer-s1", "seqmnist:gru", "seqmnist:lstm", "seqmnist:lif",
    "mnist:fdfa-cnn", "mnist:localmixer-m1-16", "mnist:block-cnn", "mnist:cnn", "mnist:resnet18-blocks",
    "fashion-mnist:cnn", "fashion-mnist:block-cnn", "fashion-mnist:fdfa-cnn",
)
# Training examples per dataset (MNIST-1D: all 3,600 after the split; the MNIST family: 12,000, 94 steps, as
# in issue 25's own measurement), fewer for the convolutional models whose steps take seconds here.
SUBSET = {"mnist1d": None, "mnist": 12_000, "fashion-mnist": 12_000, "seqmnist": 12_000}
SUBSET_OF_MODEL = {"cnn": 2048, "block-cnn": 2048, "resnet18-blocks": 1024, "fdfa-cnn": 4096,
                   "localmixer-m1-16": 4096}
PROBE = 1024
DROP = 0.95  # learns: probe loss after <= DROP x probe loss before
BLOWUP = 1.5  # diverges: the epoch's mean step loss above BLOWUP x the probe loss before


def subset_of(dataset: str, model: str) -> int | None:
    """The number of training examples of one pair's epoch (``None``: the whole training split)."""
    full = SUBSET.get(dataset)
    return full if dataset == "mnist1d" else min(filter(None, (full, SUBSET_OF_MODEL.get(model))))


def probe_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)`` in eval mode, without gradients."""
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x[i : i + 256]), y[i : i + 256], reduction="sum").item()
                   for i in range(0, len(y), 256)) / len(y)
    model.train(was)
    return loss


def verdict(before: float, after: float, epoch_mean: float, status: str) -> str:
    """``"learns"``, ``"slow"`` (finite, but the probe loss fell less than 5 %) or ``"diverges"``."""
    if status != "completed" or not all(map(math.isfinite, (before, after, epoch_mean))):
        return "diverges"
    if epoch_mean > BLOWUP * before or after > before / DROP:
        return "diverges"
    return "learns" if after <= DROP * before else "slow"


def small_test(data: Any, n: int = 1000) -> Any:
    """The dataset with its test split cut to ``n`` examples (the sweep reads the training loss only)."""
    return types.SimpleNamespace(name=data.name, source=data.source, num_classes=data.num_classes,
                                 input_shape=tuple(data.input_shape), x_train=data.x_train, y_train=data.y_train,
                                 x_test=data.x_test[:n], y_test=data.y_test[:n])


def measure_pair(args: argparse.Namespace, dataset: str, model: str, data: Any, done: dict, out: list) -> None:
    """Every suitable method × optimizer on one pair; appends to ``out`` and rewrites the results."""
    base = RunConfig(dataset=dataset, data_dir=args.data_dir, model=model, epochs=1, batch_size=128,
                     train_subset=subset_of(dataset, model), val_fraction=0.0, methods=[MethodSpec("all")],
                     threads=args.threads, quiet=True, plots=False)
    splits = split_dataset(data, 0.0, base.train_subset, 0)
    chosen, skipped = resolve_methods(base, splits)
    names = [s.name for s in chosen if not args.methods or s.name in args.methods]
    px, py = splits.x_train[:PROBE], splits.y_train[:PROBE]
    start = probe_loss(initial_model(base, splits, 0), px, py)
    for name in names:
        for optimizer in args.optimizers:
            config = RunConfig(**{**base.__dict__, "optimizer": optimizer, "methods": [MethodSpec(name)]})
            net = initial_model(config, splits, 0)
            n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
            lr, source = default_lr(name, optimizer, num_parameters=n_params)
            key = f"{dataset}|{model}|{name}|{optimizer}|{lr:.6g}"
            if key in done:
                continue
            t0 = time.perf_counter()
            run = train_run(config, MethodSpec(name), lr, splits, 0, lr_source=source, model=net)
            after = probe_loss(net, px, py)
            epoch_mean = run.final.get("train_loss", math.nan)
            row = {"key": key, "dataset": dataset, "model": model, "method": name, "optimizer": optimizer,
                   "lr": lr, "lr_source": source, "parameters": n_params, "train_examples": len(splits.y_train),
                   "steps": run.steps, "loss_before": start, "loss_after": after, "epoch_mean_loss": epoch_mean,
                   "status": run.status, "verdict": verdict(start, after, epoch_mean, run.status),
                   "seconds": round(time.perf_counter() - t0, 2)}
            done[key] = row
            out.append(row)
            print(f"{dataset:>13} {model:<18} {name:<14} {optimizer:<4} lr {lr:<9.3g} {start:.3f} -> {after:.4g} "
                  f"(epoch mean {epoch_mean:.4g}) {row['verdict']:<8} {row['seconds']:.1f} s", flush=True)
            write_results(args.out, out, args)
    for s in skipped:
        print(f"{dataset:>13} {model:<18} skipped {s['method']}: {s['reason'][:80]}", flush=True)


def write_results(out_dir: str, rows: list[dict], args: argparse.Namespace) -> None:
    meta = {"command": "python benchmarks/defaults_sweep.py " + " ".join(args.argv), "torch": torch.__version__,
            "threads": args.threads, "subsets": SUBSET, "subsets_of_model": SUBSET_OF_MODEL, "probe": PROBE,
            "drop": DROP, "blowup": BLOWUP}
    write_atomic(Path(out_dir) / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_atomic(Path(out_dir) / "table.md", table(rows))


def current(rows: list[dict]) -> list[dict]:
    """The rows measured at today's default rates (a row at a rate the defaults have since left is dropped)."""
    return [r for r in rows if math.isclose(r["lr"], default_lr(r["method"], r["optimizer"],
                                                                num_parameters=r["parameters"])[0], rel_tol=1e-6)]


def table(rows: list[dict]) -> str:
    """One line per pair × optimizer: each method's verdict, with the failures spelled out (rows at the current
    default rates only)."""
    rows = current(rows)
    lines = ["| data × model (parameters, steps) | optimizer | learns (≥ 5 % drop) | slow (moved < 5 %) | diverges |",
             "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r["verdict"] = verdict(r["loss_before"], r["loss_after"], r["epoch_mean_loss"], r["status"])
        groups.setdefault((r["dataset"], r["model"], r["optimizer"]), []).append(r)
    for (dataset, model, optimizer), rs in groups.items():
        def cell(kind: str, rs: list[dict] = rs) -> str:
            picked = [r for r in rs if r["verdict"] == kind]
            if kind == "learns":
                return ", ".join(r["method"] for r in picked) or "—"
            return ", ".join(f"{r['method']} ({r['lr']:.3g}: {r['loss_before']:.2f} → {r['loss_after']:.3g}, "
                             f"epoch mean {r['epoch_mean_loss']:.3g})" for r in picked) or "—"

        head = f"{dataset} × {model} ({rs[0]['parameters']:,}, {rs[0]['steps']})"
        lines.append(f"| {head} | {optimizer} | {cell('learns')} | {cell('slow')} | {cell('diverges')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder of the MNIST / Fashion-MNIST files")
    p.add_argument("--pairs", default=",".join(PAIRS), help="dataset:model pairs, comma separated")
    p.add_argument("--methods", default="", help="only these methods (comma separated; default: all that fit)")
    p.add_argument("--optimizers", default="sgd,adam")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/defaults")
    p.add_argument("--resume", action="store_true", help="keep the rows of OUT/results.json, skip their runs")
    args = p.parse_args(argv)
    import sys

    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.resume and (Path(args.out) / "results.json").exists():
        rows = json.loads((Path(args.out) / "results.json").read_text())["rows"]
    done = {r["key"]: r for r in rows}
    cache: dict[str, Any] = {}
    for pair in args.pairs.split(","):
        dataset, model = pair.split(":", 1)
        if dataset not in cache:
            try:
                cache[dataset] = small_test(load_data(RunConfig(dataset=dataset, data_dir=args.data_dir)))
            except Exception as exc:  # files absent: say so and go on with the other pairs
                print(f"{dataset}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                cache[dataset] = None
        if cache[dataset] is not None:
            try:
                measure_pair(args, dataset, model, cache[dataset], done, rows)
            except ValueError as exc:  # no method can train this model on this data
                print(f"{pair}: not measured ({str(exc).splitlines()[0][:160]})", flush=True)
    write_results(args.out, rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
