"""Recurrent and spiking nets trained forward in time: accuracy, memory and time (docs/recurrent.md).

Two parts, each writing ``benchmarks/results/recurrent/<part>.{json,md}`` (and ``memory.png``)::

    python benchmarks/recurrent.py memory --data-dir ../shared/data          # memory and time vs T
    python benchmarks/recurrent.py train  --data-dir ../shared/data          # accuracies (short runs)
    python benchmarks/recurrent.py memory --quick                            # smoke test, random data

``memory``: MNIST images read as T steps of 784/T pixels (T = 28 … 784; T = 784 is pixel-by-pixel MNIST),
one batch, every (model, method, T) in a fresh process: the increase of the process's resident memory over
two training steps above the resident memory before them (``VmHWM`` after resetting it, Linux), after a
warm-up step on one example (lazy initialisations), and the time per step. ``train``: sequential MNIST with
a GRU (online forward mode, full BPTT, truncated BPTT) and an LIF network on MNIST and Fashion-MNIST (exact
forward-propagated gradient, forward gradient, BPTT with the same surrogate), on a training subset for a few
epochs; test accuracy on the full test set.

Only the public API: ``fwdgrad.estimator``, ``fwdgrad.models.build_model``, ``fwdgrad.data.load_dataset``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.models import build_model

OUT = Path(__file__).resolve().parent / "results" / "recurrent"
STEPS = (28, 56, 112, 196, 392, 784)
MEMORY_METHODS = {
    "gru": [("bp (full BPTT)", "bp-tbptt", {}), ("bp-tbptt window=28", "bp-tbptt", {"window": 28}),
            ("online-fg", "online-fg", {}), ("bp-tbptt window=4", "bp-tbptt", {"window": 4})],
    "lif": [("bp (BPTT + surrogate)", "bp-tbptt", {}), ("forward-exact", "forward-exact", {}),
            ("forward-exact chunk=28", "forward-exact", {"chunk": 28}), ("online-fg", "online-fg", {})],
}  # fmt: skip


def _kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _images(data_dir: str | None, quick: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if quick:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = load_dataset("mnist", data_dir)
    return ds.x_train[:n].reshape(n, 784), ds.y_train[:n]


def measure_one(args: argparse.Namespace) -> dict:
    """One (model, method, T) in this process: peak RSS increase over two steps, time per step."""
    torch.set_num_threads(1)
    steps = args.steps
    x, y = _images(args.data_dir, args.quick, args.batch)
    x = x.reshape(args.batch, steps, 784 // steps)
    name, est_name, opts = MEMORY_METHODS[args.model][args.method]
    torch.manual_seed(0)
    model = build_model(args.model, (steps, 784 // steps), 10, hidden=args.hidden)
    est = fwdgrad.estimator(est_name, **({"seed": 0} if est_name == "online-fg" else {}), **opts)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    # warm-up on one example: lazy initialisations run, while what the heap keeps of it stays 1/B of a step
    est(model, lambda m: F.cross_entropy(m(x[:1]), y[:1]))
    model.zero_grad()
    before = _kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    for _ in range(2):
        est(model, loss_fn)
        model.zero_grad()
    per_step = (time.perf_counter() - t0) / 2
    return {
        "model": args.model, "method": name, "T": steps, "features": 784 // steps, "batch": args.batch,
        "hidden": args.hidden, "step_s": per_step, "rss_before_mib": before / 1024,
        "peak_increase_mib": (_kib("VmHWM") - before) / 1024, "peak_rss_mib": _kib("VmHWM") / 1024,
    }  # fmt: skip


def run_memory(args: argparse.Namespace) -> None:
    steps = (28, 112) if args.quick else tuple(int(t) for t in args.ts.split(",")) if args.ts else STEPS
    rows = []
    for model in MEMORY_METHODS:
        if args.models and model not in args.models.split(","):
            continue
        for method in range(len(MEMORY_METHODS[model])):
            label = MEMORY_METHODS[model][method][0]
            if args.methods and label not in args.methods.split(","):
                continue
            for t in steps:
                cmd = [sys.executable, __file__, "_one", "--model", model, "--method", str(method), "--steps", str(t),
                       "--batch", str(args.batch), "--hidden", str(args.hidden)]  # fmt: skip
                cmd += ["--quick"] if args.quick else ["--data-dir", str(args.data_dir)]
                # a fixed mmap threshold makes glibc return freed large blocks at once, so that the RSS before the
                # measured steps holds what is live, not what the warm-up step freed
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{row['model']:4s} {row['method']:24s} T={t:4d}  step {row['step_s']:.3f} s  "
                    f"peak +{row['peak_increase_mib']:.1f} MiB (RSS {row['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
    _write(args, "memory" + (f"_{args.name}" if args.name else ""), rows, _memory_table(rows))
    if not args.name:
        _plot(rows, OUT / ("memory_quick.png" if args.quick else "memory.png"))


def _memory_table(rows: list[dict]) -> str:
    ts = sorted({r["T"] for r in rows})
    lines = [
        "| model | method | " + " | ".join(f"T={t}" for t in ts) + f" | ratio T={ts[-1]}/T={ts[0]} |",
        "|---|---|" + "---|" * (len(ts) + 1),
    ]
    keys = list(dict.fromkeys((r["model"], r["method"]) for r in rows))
    parts = (("peak increase (MiB)", "peak_increase_mib", "{:.1f}"), ("time/step (s)", "step_s", "{:.3f}"))
    for what, field, fmt in parts:
        lines.append(f"| **{what}** |" + " |" * (len(ts) + 2))
        for model, method in keys:
            by_t = {r["T"]: r[field] for r in rows if r["model"] == model and r["method"] == method}
            ratio = by_t[ts[-1]] / by_t[ts[0]] if by_t[ts[0]] > 0 else float("nan")
            lines.append(f"| {model} | {method} | " + " | ".join(fmt.format(by_t[t]) for t in ts) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in rows):
        sel = [r for r in rows if r["model"] == model and r["method"] == method]
        ts = [r["T"] for r in sel]
        axes[0].plot(ts, [max(r["peak_increase_mib"], 0.1) for r in sel], "o-", label=f"{model}: {method}")
        axes[1].plot(ts, [r["step_s"] for r in sel], "o-", label=f"{model}: {method}")
    all_t = sorted({r["T"] for r in rows})
    for ax, label in zip(axes, ("peak memory increase over a step (MiB)", "time per step (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(all_t, [str(t) for t in all_t])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sequence length T (784/T pixels per step)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


# --- training --------------------------------------------------------------------------------------------------
TRAIN_RUNS = [
    # (dataset, model, model options, label, estimator, estimator options)
    ("seqmnist", "gru", {"hidden": 64}, "bp (full BPTT)", "bp-tbptt", {}),
    ("seqmnist", "gru", {"hidden": 64}, "bp-tbptt window=4", "bp-tbptt", {"window": 4}),
    ("seqmnist", "gru", {"hidden": 64}, "online-fg (window=T)", "online-fg", {}),
    ("seqmnist", "gru", {"hidden": 64}, "online-fg window=4", "online-fg", {"window": 4}),
    ("mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "bp (BPTT + surrogate)", "bp-tbptt", {}),
    ("mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "forward-exact", "forward-exact", {}),
    ("mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "online-fg", "online-fg", {}),
    ("fashion-mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "bp (BPTT + surrogate)", "bp-tbptt", {}),
    ("fashion-mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "forward-exact", "forward-exact", {}),
    ("fashion-mnist", "lif", {"hidden": 128, "steps": 10, "encoding": "rate"}, "online-fg", "online-fg", {}),
]


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(y)


def train_one(dataset: str, model_name: str, model_opts: dict, est_name: str, est_opts: dict,
              args: argparse.Namespace) -> dict:  # fmt: skip
    if args.quick:
        g = torch.Generator().manual_seed(0)
        shape = (28, 28) if dataset == "seqmnist" else (1, 28, 28)
        x_tr, y_tr = torch.randn(256, *shape, generator=g), torch.randint(0, 10, (256,), generator=g)
        x_te, y_te = x_tr[:128], y_tr[:128]
    else:
        ds = load_dataset(dataset, args.data_dir)
        x_tr, y_tr, x_te, y_te = ds.x_train[: args.train_subset], ds.y_train[: args.train_subset], ds.x_test, ds.y_test
    torch.manual_seed(0)
    model = build_model(model_name, tuple(x_tr.shape[1:]), 10, **model_opts)
    est = fwdgrad.estimator(est_name, **({"seed": 0} if est_name == "online-fg" else {}), **est_opts)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order_gen = torch.Generator().manual_seed(1)
    history, t_train = [], 0.0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_tr), generator=order_gen)
        t0 = time.perf_counter()
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            xb, yb = x_tr[idx], y_tr[idx]
            opt.zero_grad()
            est(model, lambda m, xb=xb, yb=yb: F.cross_entropy(m(xb), yb))
            opt.step()
        t_train += time.perf_counter() - t0
        history.append(_accuracy(model, x_te, y_te))
        print(f"  {dataset} {model_name} {est_name} {est_opts} epoch {epoch}: test acc {history[-1]:.4f} "
              f"({t_train:.0f} s)", flush=True)  # fmt: skip
    return {"test_acc": history[-1], "history": history, "train_s": t_train}


def run_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rows = []
    for dataset, model, mopts, label, est, eopts in TRAIN_RUNS:
        if args.only and args.only not in f"{dataset} {model}":
            continue
        res = train_one(dataset, model, mopts, est, eopts, args)
        rows.append({"dataset": dataset, "model": model, "model_options": mopts, "method": label, "estimator": est,
                     "estimator_options": eopts, **res})  # fmt: skip
    table = [
        "| dataset | model | method | test acc (per epoch) | train time (s) |",
        "|---|---|---|---|---|",
    ] + [
        f"| {r['dataset']} | {r['model']} {r['model_options']} | {r['method']} | "
        + " → ".join(f"{a:.4f}" for a in r["history"]) + f" | {r['train_s']:.0f} |"
        for r in rows
    ]  # fmt: skip
    _write(args, "train" + (f"_{args.only.replace(' ', '_')}" if args.only else ""), rows, "\n".join(table))


def _write(args: argparse.Namespace, part: str, rows: list[dict], table: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    part = part + ("_quick" if args.quick else "")
    meta = {
        "command": "python benchmarks/recurrent.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch "
        f"{torch.__version__}, 1 thread",
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    for suffix, text in (
        ("json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)),
        ("md", f"`{meta['command']}` ({meta['utc']} UTC, {meta['machine']})\n\n{table}\n"),
    ):
        path = OUT / f"{part}.{suffix}"
        tmp = path.with_suffix(f".{suffix}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    for name in ("memory", "train", "_one"):
        s = sub.add_parser(name)
        s.add_argument("--data-dir", default=os.environ.get("FWDGRAD_DATA_DIR", "../shared/data"))
        s.add_argument("--quick", action="store_true", help="random data, few sizes: a smoke test")
        s.add_argument("--batch", type=int, default=64)
        s.add_argument("--hidden", type=int, default=128)
    mem = sub.choices["memory"]
    mem.add_argument("--ts", default="", help="comma-separated sequence lengths (default: 28,56,...,784)")
    mem.add_argument("--models", default="", help="comma-separated subset of: gru,lif")
    mem.add_argument("--methods", default="", help="comma-separated method labels to keep")
    mem.add_argument("--name", default="", help="suffix of the result files (and no plot)")
    one = sub.choices["_one"]
    one.add_argument("--model", choices=list(MEMORY_METHODS))
    one.add_argument("--method", type=int)
    one.add_argument("--steps", type=int)
    tr = sub.choices["train"]
    tr.add_argument("--epochs", type=int, default=2)
    tr.add_argument("--train-subset", type=int, default=10000)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--only", default="", help="run only the rows whose 'dataset model' contains this")
    args = p.parse_args(argv)
    if args.part == "_one":
        print(json.dumps(measure_one(args)))
    elif args.part == "memory":
        run_memory(args)
    else:
        run_train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
