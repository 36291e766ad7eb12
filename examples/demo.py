"""``make demo``: where every method of fwdgrad stands on one task that needs no download, each at its best rate.

MNIST-1D (Greydanus 2020, generated offline: 3,600 training examples, 400 held out for validation, 1,000 test;
chance 10 %), Adam, batch 128. Every method gets the same budget: a learning-rate sweep of three rates on
the validation split (``SWEEP_EPOCHS`` epochs, first seed), then ``EPOCHS`` epochs at the chosen rate for
``SEEDS`` seeds, from the same initial weights and batch order as the other methods on its model. The methods
that need another model run on it, beside backprop on that same model:

- ``mlp`` 40-128-128-10: backprop, feedback alignment (``fa``, ``dfa``), activity- and weight-perturbed forward
  gradients (``fg-a``, ``fg-w`` with and without the exact read-out, their momentum / mixed directions) and the
  zeroth-order family (``zo``, ``zo-sign``, ``zo-cons``);
- ``fdfa-mlp`` 40-128-128-10: ``fdfa`` (its own nets: Linear layers with the feedback matrices it learns);
- ``localmixer`` (2 blocks of 128 channels in 8 groups, one token: the signal viewed as a 1×1×40 image), a
  model with local heads: ``l-bp``, ``lg-bp``, ``l-fg-a``, ``lg-fg-a``, ``l-fg-w``, ``lg-fg-w``, ``fg-guess``.

The recurrent methods (``online-fg``, ``forward-exact``, ``bp-tbptt``) need a sequence model and are not in
this demo (see ``docs/recurrent.md``). Output: ``OUT/results.md`` (one table, the sweep, three lines of what it
shows), ``OUT/results.json`` and ``OUT/curves.png``.

Example::

    python examples/demo.py --out runs/demo            # the whole demo (make demo)
    python examples/demo.py --quick --out /tmp/demo   # a smoke run of every method in seconds
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import resource
import statistics
import time
import types
from pathlib import Path
from typing import Any

import torch

from fwdgrad._io import write_atomic
from fwdgrad.training import MethodSpec, RunConfig, run_experiment
from fwdgrad.training.experiment import Experiment, load_data
from fwdgrad.training.report import plot_png

EPOCHS, SWEEP_EPOCHS, SEEDS = 25, 8, 2
CHANCE = 0.10
BP_GRID, FG_GRID, W_GRID = (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2), (1e-4, 3e-4, 1e-3)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"width": 128, "depth": 2}),
    "fdfa-mlp": ("fdfa-mlp", {"width": 128, "depth": 2}),
    "localmixer": ("localmixer", {"num_blocks": 2, "num_patches": 1, "channels": 128, "groups": 8}),
}
# (method spec, model, lr grid, whether a backward pass runs through the network)
METHODS: list[tuple[str, str, tuple[float, ...], bool]] = [
    ("bp", "mlp", BP_GRID, True), ("fa", "mlp", BP_GRID, True), ("dfa", "mlp", BP_GRID, False),
    ("fg-a", "mlp", FG_GRID, False), ("fg-a-momentum", "mlp", FG_GRID, False),
    ("fg-w:readout=exact", "mlp", FG_GRID, False), ("fg-w", "mlp", W_GRID, False),
    ("fg-w-momentum", "mlp", W_GRID, False), ("fg-w-mixed", "mlp", W_GRID, False),
    ("zo", "mlp", W_GRID, False), ("zo-sign", "mlp", W_GRID, False), ("zo-cons", "mlp", W_GRID, False),
    ("bp", "fdfa-mlp", BP_GRID, True), ("fdfa", "fdfa-mlp", BP_GRID, False),
    ("bp", "localmixer", BP_GRID, True), ("l-bp", "localmixer", BP_GRID, True),
    ("lg-bp", "localmixer", BP_GRID, True), ("l-fg-a", "localmixer", FG_GRID, False),
    ("lg-fg-a", "localmixer", FG_GRID, False), ("l-fg-w", "localmixer", W_GRID, False),
    ("lg-fg-w", "localmixer", W_GRID, False), ("fg-guess", "localmixer", BP_GRID, True),
]


def mnist1d_as_image() -> Any:
    """MNIST-1D with every signal shaped ``[1, 1, 40]``, so the LocalMixer reads it as one 40-value token;
    the MLPs flatten it back."""
    d = load_data(RunConfig(dataset="mnist1d"))
    return types.SimpleNamespace(
        name="mnist1d", source=str(d.source), num_classes=d.num_classes, input_shape=(1, 1, 40),
        x_train=d.x_train.reshape(-1, 1, 1, 40), y_train=d.y_train, x_test=d.x_test.reshape(-1, 1, 1, 40),
        y_test=d.y_test)


_DATA: list[Any] = []


def run_method(args: argparse.Namespace, spec_text: str, model_key: str, grid: tuple[float, ...],
               label: str) -> Experiment:
    """One method on its model: the sweep over ``grid`` on the validation split, then the seeds (in a worker
    process of its own: the data is generated once per process)."""
    from fwdgrad.training import parse_method

    torch.set_num_threads(args.threads)
    if not _DATA:
        _DATA.append(mnist1d_as_image())
    spec = parse_method(spec_text)
    spec = MethodSpec(spec.name, spec.options, None, label)
    model, options = MODELS[model_key]
    config = RunConfig(dataset="mnist1d", model=model, model_options=options, methods=[spec], optimizer="adam",
                       epochs=args.epochs, seeds=args.seeds, lr_sweep=list(grid[: args.grid]),
                       sweep_epochs=args.sweep_epochs, threads=args.threads, quiet=True, plots=False)
    return run_experiment(config, "demo", dataset=_DATA[0])


def summarize(label: str, spec: str, model: str, backward: bool, exp: Experiment) -> dict[str, Any]:
    runs = exp.runs
    accs = [r.final.get("test_acc", math.nan) for r in runs]
    choice = exp.methods[0]
    return {
        "label": label, "method": spec, "model": model, "parameters": exp.model_info["num_parameters"],
        "backward": backward, "lr": choice["lr"], "sweep": choice.get("sweep", []),
        "test_acc": statistics.fmean(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
        "train_loss": statistics.fmean(r.final.get("train_loss", math.nan) for r in runs),
        "time_per_epoch_s": statistics.fmean(r.figures()["time_per_epoch_s"] for r in runs),
        "peak_step_memory_bytes": max((r.peak_step_memory_bytes or 0) for r in runs) or None,
        "statuses": sorted({r.status for r in runs}),
    }


def _mem(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**20:.1f} MiB"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | model (parameters) | backward pass | lr (sweep: val acc) | test acc (mean ± std) | "
            "final train loss | time / epoch | peak step memory |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        sweep = ", ".join(f"{t['lr']:g}: {100 * t['val_acc']:.1f}" if t["val_acc"] >= 0 else f"{t['lr']:g}: failed"
                          for t in r["sweep"])
        std = "—" if math.isnan(r["test_acc_std"]) else f"{100 * r['test_acc_std']:.2f}"
        below = " ⚠ < chance + 20" if r["test_acc"] < CHANCE + 0.20 else ""
        lines.append(f"| {r['method']} | {r['model']} ({r['parameters']:,}) | {'yes' if r['backward'] else 'no'} | "
                     f"**{r['lr']:g}** ({sweep}) | {100 * r['test_acc']:.2f} ± {std} %{below} | "
                     f"{r['train_loss']:.4f} | {r['time_per_epoch_s']:.3f} s | {_mem(r['peak_step_memory_bytes'])} |")
    return head + "\n".join(lines) + "\n"


def _perturbs_every_weight(shown: str) -> bool:
    """Whether a method (as shown in the findings) perturbs every weight: the weight-perturbation and zeroth-order
    families, not ``fg-w:readout=exact`` (its read-out has its exact gradient)."""
    name = shown.split(" ")[0]
    return name.split(":")[0] in ("fg-w", "fg-w-momentum", "fg-w-mixed", "l-fg-w", "lg-fg-w", "zo", "zo-sign",
                                  "zo-cons") and "readout=exact" not in name


def low_line(low: list[str], rows: list[dict[str, Any]]) -> str:
    """The third finding: which methods stayed below chance + 20 points, and why where the reason is known."""
    acc = {r["method"] + ("" if r["model"] == "mlp" else f" ({r['model']})"): r["test_acc"] for r in rows}
    every = [m for m in low if _perturbs_every_weight(m)]
    other = [f"{m} ({100 * acc[m]:.1f} %)" for m in low if m not in every]
    text = "- Below chance + 20 points after the budget: "
    if every:
        text += (", ".join(every) + " (weight perturbation and zeroth order, one random direction per step for all "
                 "the weights: the estimate's variance grows with their number, so only small rates are stable and "
                 "the budget ends first)")
    if other:
        text += ("; and " if every else "") + ", ".join(other)
    return text + "."


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """The three lines under the table, computed from the rows."""
    bp = {r["model"]: r for r in rows if r["method"] == "bp"}
    free = [r for r in rows if not r["backward"]]
    best = max(free, key=lambda r: r["test_acc"])
    ref = bp[best["model"]]
    gap = 100 * (ref["test_acc"] - best["test_acc"])
    t = best["time_per_epoch_s"] / ref["time_per_epoch_s"]
    mem = (best["peak_step_memory_bytes"] or 0) / (ref["peak_step_memory_bytes"] or 1)
    low = [r["method"] + ("" if r["model"] == "mlp" else f" ({r['model']})") for r in rows
           if r["test_acc"] < CHANCE + 0.20]
    ranked = sorted(free, key=lambda r: -r["test_acc"])[:3]
    return [
        f"- Closest to backprop without a backward pass through the network: **{best['method']}** on "
        f"{best['model']}, {100 * best['test_acc']:.1f} % against backprop's {100 * ref['test_acc']:.1f} % on the "
        f"same model ({gap:.1f} points behind), at {t:.1f}× its time per epoch and {mem:.1f}× its peak step "
        "memory.",
        "- Next without a backward pass: " + ", ".join(f"{r['method']} {100 * r['test_acc']:.1f} %" for r in ranked[1:])
        + f"; chance is {100 * CHANCE:.0f} %.",
        low_line(low, rows) if low else
        "- Every method is at least 20 points above chance.",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--sweep-epochs", type=int, default=SWEEP_EPOCHS)
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--grid", type=int, default=3, help="how many rates of each grid to sweep")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=2, help="methods trained at once, one process each")
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 sweep epoch, 1 seed, 2 rates: a smoke run")
    p.add_argument("--only", default="", help="comma-separated method specs to run (default: all)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.sweep_epochs, args.seeds, args.grid = 1, 1, 1, 2
    out = Path(args.out)
    t0 = time.perf_counter()
    only = set(filter(None, args.only.split(",")))
    chosen = [m for m in METHODS if not only or m[0] in only]
    labels = [spec.replace(":", ".").replace("=", "-") + ("" if key == "mlp" else f".{key}")
              for spec, key, _, _ in chosen]
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        # the slowest first (forward-mode passes on the LocalMixer), so the workers finish together
        order = sorted(range(len(chosen)), key=lambda i: (chosen[i][1] != "localmixer", "fg" not in chosen[i][0]))
        submitted = {i: pool.submit(run_method, args, *chosen[i][:3], labels[i]) for i in order}
        futures = [submitted[i] for i in range(len(chosen))]
        for f in concurrent.futures.as_completed(futures):
            spec, key = chosen[futures.index(f)][:2]
            r = f.result().methods[0]
            print(f"{spec:>20} on {key:<10} lr {r['lr']:<7g} ({time.perf_counter() - t0:.0f} s)", flush=True)
        exps = [f.result() for f in futures]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, now ended and waited for
    cpu = children.ru_utime + children.ru_stime
    rows, merged = [], None
    for (spec, key, _, backward), label, exp in zip(chosen, labels, exps):
        rows.append(summarize(label, spec, key, backward, exp))
        shown = spec if key == "mlp" else f"{spec} ({key})"
        for m in exp.methods:
            m["method"] = shown
        for run in exp.runs:
            run.method = shown
        if merged is None:
            merged = exp
        else:
            merged.methods += exp.methods
            merged.runs += exp.runs
    wall = time.perf_counter() - t0
    write_report(out, rows, merged, args, wall, cpu)
    print((out / "results.md").read_text())
    return 0


def report_text(rows: list[dict[str, Any]], budget: str, wall: float, cpu: float, processes: str) -> str:
    """``results.md``: the setting, the table, the three lines of findings, the legend and the plot."""
    text = [
        "# fwdgrad demo: every method on MNIST-1D at its best rate", "",
        f"MNIST-1D, generated offline (no download): 3,600 train / 400 validation / 1,000 test; 10 classes, "
        f"chance {100 * CHANCE:.0f} %. {budget}. Wall clock {wall:.0f} s, CPU time {cpu:.0f} s ({processes}).", "",
        table(rows), *(findings(rows) if any(r["method"] == "bp" for r in rows) and any(
            not r["backward"] for r in rows) else []), "",
        "Backward pass: whether a reverse-mode pass runs through the network (fa propagates errors backwards "
        "through fixed random matrices; l-bp, lg-bp and fg-guess backpropagate inside blocks). The lr column "
        "gives the chosen rate in bold and each swept rate's validation accuracy after the sweep epochs.", "",
        "![test accuracy and train loss per epoch](curves.png)", "",
    ]
    return "\n".join(text)


def write_report(out: Path, rows: list[dict[str, Any]], merged: Experiment | None, args: argparse.Namespace,
                 wall: float, cpu: float) -> None:
    budget = (f"Adam, batch 128; sweep: {args.grid} rates × {args.sweep_epochs} epochs on the validation split "
              f"(seed 0); then {args.epochs} epochs × {args.seeds} seeds at the chosen rate")
    processes = f"{args.workers} worker processes × {args.threads} thread"
    write_atomic(out / "results.json", json.dumps({"rows": rows, "wall_s": wall, "cpu_s": cpu, "budget": budget,
                                                     "processes": processes}, indent=1, default=str))
    write_atomic(out / "results.md", report_text(rows, budget, wall, cpu, processes))
    if merged is not None:
        write_atomic(out / "curves.png", plot_png(merged, "epoch", "fwdgrad demo, MNIST-1D (mean over seeds)"))


if __name__ == "__main__":
    raise SystemExit(main())
