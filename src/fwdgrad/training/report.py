"""Reports of an experiment under ``runs/<name>/``, every file written atomically (temporary file in the
same folder, then ``os.replace``), so a reader never sees half a file:

- ``results.json``: every figure of every run (per-epoch history included), the summary, the full
  config, the versions of python, torch and fwdgrad, and the machine;
- ``results.md``: the comparison table (method, test accuracy mean ± std over seeds, final train loss,
  time per epoch, examples/s, peak memory of a step) and notes;
- ``logs/<method>_seed<k>.csv``: one row per epoch of each run;
- ``curves_epoch.png`` and ``curves_time.png``: test accuracy and train loss against epochs and against
  training wall-clock time, one line per method (mean over seeds, band from min to max).

matplotlib (extra ``plots``) is imported only when plots are drawn, with the Agg backend.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import fwdgrad
from fwdgrad._io import write_atomic
from fwdgrad.training.experiment import Experiment
from fwdgrad.training.loop import RunResult

RESULTS_FORMAT = "fwdgrad-results/1"
MEMORY_NOTE = (
    "peak step memory: growth of the process's peak resident set size during the second training step of "
    "each run (zero_grad + estimate + optimizer step, batch already built), measured by resetting the "
    "Linux high-water mark (/proc/self/clear_refs) after malloc_trim; it counts activations, tangents, "
    "gradients and temporaries, not the model or data already resident. Max over seeds."
)
TIME_NOTE = (
    "time: training only (batches, estimates, optimizer steps), evaluation excluded; examples/s = training "
    "examples processed / that time."
)


# --- figures --------------------------------------------------------------------------------------------
def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float | None]) -> float:
    vals = _finite(values)
    return statistics.fmean(vals) if vals else math.nan


def _std(values: list[float | None]) -> float:
    """Sample standard deviation; NaN (``null`` in JSON, "—" in tables) with fewer than two values."""
    vals = _finite(values)
    return statistics.stdev(vals) if len(vals) > 1 else math.nan


def summarize(exp: Experiment) -> list[dict[str, Any]]:
    """One row per method: test accuracy mean and sample std over seeds (after the last epoch, never the
    best epoch), final train loss, time per epoch, examples/s, peak step memory (max over seeds)."""
    rows = []
    for m in exp.methods:
        runs = [r for r in exp.all_runs if r.method == m["method"]]
        if not runs:
            continue
        figs = [r.figures() for r in runs]
        mems = [f["peak_step_memory_bytes"] for f in figs if f["peak_step_memory_bytes"] is not None]
        rows.append({
            "method": m["method"], "estimator": m["estimator"], "lr": m["lr"], "lr_source": m["lr_source"],
            "seeds": len(runs), "completed": sum(not r.failed for r in runs),
            "skipped_steps": sum(r.skipped_steps for r in runs),
            "test_acc_mean": _mean([f["test_acc"] for f in figs]), "test_acc_std": _std([f["test_acc"] for f in figs]),
            "train_loss_mean": _mean([f["train_loss"] for f in figs]),
            "time_per_epoch_s": _mean([f["time_per_epoch_s"] for f in figs]),
            "examples_per_s": _mean([f["examples_per_s"] for f in figs]),
            "peak_step_memory_bytes": max(mems) if mems else None,
        })
    return rows


def fairness(exp: Experiment) -> dict[str, bool]:
    """Whether, for every seed, all methods started from the same weights and saw the same batch order."""
    same_init = same_order = True
    for seed in {r.seed for r in exp.runs}:
        runs = [r for r in exp.runs if r.seed == seed]
        same_init &= len({r.init_digest for r in runs}) == 1
        full = [r for r in runs if r.epochs_completed == exp.config.epochs]
        same_order &= len({r.order_digest for r in full}) <= 1
    return {"same_initial_weights_per_seed": same_init, "same_batch_order_per_seed": same_order}


def versions() -> dict[str, str]:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "fwdgrad": fwdgrad.__version__,
            "numpy": numpy.__version__}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _jsonable(x: Any) -> Any:
    """NaN/Inf → None (strict JSON), tuples → lists, other objects → str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, bool | int | str):
        return x
    return str(x)


def results_dict(exp: Experiment, name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The content of ``results.json``."""
    return _jsonable({
        "format": RESULTS_FORMAT, "name": name, "command": exp.command,
        "argv": list(sys.argv if argv is None else argv),
        "started_at": exp.started_at, "finished_at": exp.finished_at,
        "versions": versions(), "machine": machine(), "config": exp.config.to_dict(),
        "dataset": exp.splits_info, "model": exp.model_info, "methods": exp.methods,
        "skipped_methods": exp.skipped_methods, "fairness": fairness(exp), "summary": summarize(exp),
        "notes": {"memory": MEMORY_NOTE, "time": TIME_NOTE},
        "complete": exp.current is None and bool(exp.finished_at),
        # seed-sharing parallelism: processes and mode (None: the ordinary estimator); each run records its
        # measured bytes_per_step
        "world": max((r.world for r in exp.all_runs), default=1), "mode": exp.config.parallel,
        "runs": [r.to_dict() for r in exp.all_runs],
    })


# --- markdown -------------------------------------------------------------------------------------------
def _fmt_mem(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_loss(x: float) -> str:
    """Four decimals for ordinary losses, scientific notation for huge or tiny ones.

    >>> [_fmt_loss(v) for v in (0.12345, 2e30, 3e-7, 0.0, float("nan"))]
    ['0.1235', '2.000e+30', '3.000e-07', '0.0000', 'n/a']
    """
    if x is None or not math.isfinite(x):
        return "n/a"
    return format(x, ".3e") if x != 0 and not 1e-3 <= abs(x) < 1e5 else format(x, ".4f")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table in GitHub markdown."""
    head = ("| method | lr | test acc (mean ± std) | seeds | final train loss | time / epoch | examples / s "
            "| peak step memory |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        std = _fmt(100 * r["test_acc_std"], ".2f") if math.isfinite(r["test_acc_std"]) else "—"
        acc = f"{_fmt(100 * r['test_acc_mean'], '.2f')} ± {std} %" if math.isfinite(r["test_acc_mean"]) else "n/a"
        stopped = r["seeds"] - r["completed"]
        seeds = f"{r['seeds']}" + (f" ({stopped} stopped)" if stopped else "")
        if r.get("skipped_steps"):
            seeds += f", {r['skipped_steps']} steps skipped"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {acc} | {seeds} | {_fmt_loss(r['train_loss_mean'])} "
            f"| {_fmt(r['time_per_epoch_s'], '.3f')} s | {_fmt(r['examples_per_s'], ',.0f')} "
            f"| {_fmt_mem(r['peak_step_memory_bytes'])} |"
        )
    return head + "\n".join(lines) + "\n"


def results_markdown(exp: Experiment, name: str, command_line: str) -> str:
    """The content of ``results.md``."""
    c, d, m = exp.config, exp.splits_info, exp.model_info
    fair = fairness(exp)
    opt = f"{c.optimizer}" + (f" (momentum {c.momentum:g})" if c.optimizer == "sgd" else "")
    seeds = f"{c.seed}" if c.seeds == 1 else f"{c.seed}–{c.seed + c.seeds - 1}"
    v, mach = versions(), machine()
    lrs = "; ".join(f"{x['method']} {x['lr']:g} ({x['lr_source']})" for x in exp.methods)
    model_options = ", ".join(f"{k}={v}" for k, v in m["options"].items())
    header = [
        f"# {name}\n",
        f"`{command_line}`\n",
        f"- data: **{d['name']}** ({d['source']}); train {d['train']} / validation {d['val']} / test {d['test']}",
        f"- model: **{m['name']}**{f' ({model_options})' if model_options else ''}, "
        f"{m['num_parameters']:,} parameters",
        f"- budget: {c.epochs} epochs" + (f", at most {c.time_budget:g} s of training" if c.time_budget else "")
        + f", batch {c.batch_size}, optimizer {opt}, weight decay {c.weight_decay:g}; seeds {seeds}",
        f"- machine: {mach['processor']}, {mach['cpu_count']} CPUs, {mach['torch_threads']} torch threads; "
        f"python {v['python']}, torch {v['torch']}, fwdgrad {v['fwdgrad']}",
        "",
        markdown_table(summarize(exp)),
    ]
    notes = [
        "Test accuracy is measured after the last epoch (no epoch is picked on the test set); "
        "± is the sample standard deviation over seeds (— with a single seed).",
        f"Learning rates: {lrs}.",
        f"Fairness: same initial weights for every method of a seed: "
        f"{'yes' if fair['same_initial_weights_per_seed'] else 'NO'}; same batch order: "
        f"{'yes' if fair['same_batch_order_per_seed'] else 'NO'} (SHA-256 digests in results.json).",
        TIME_NOTE[0].upper() + TIME_NOTE[1:],
        MEMORY_NOTE[0].upper() + MEMORY_NOTE[1:],
    ]
    notes += [f"Skipped {s['method']}: {s['reason']}" for s in exp.skipped_methods]
    notes += [f"Run {r.method} seed {r.seed}: {r.message}" for r in exp.all_runs if r.message]
    notes += [f"Run {r.method} seed {r.seed}: {n}." for r in exp.all_runs for n in r.notes]
    notes += [f"Run {r.method} seed {r.seed} skipped {r.skipped_steps} of its {r.steps + r.skipped_steps} steps "
              "on a non-finite loss (--on-nonfinite skip)." for r in exp.all_runs if r.skipped_steps]
    if exp.current is not None or not exp.finished_at:
        notes.insert(0, "**Incomplete**: this experiment was interrupted; `--resume` continues it.")
    return "\n".join(header) + "\n" + "\n\n".join(notes) + "\n"


# --- csv ------------------------------------------------------------------------------------------------
CSV_COLUMNS = ("epoch", "complete", "steps", "examples", "train_loss", "train_time_s", "val_loss", "val_acc",
               "test_loss", "test_acc", "skipped_steps")


def safe_filename(text: str) -> str:
    """``fg-w:num_directions=8`` → ``fg-w_num_directions-8``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text.replace("=", "-")).strip("_") or "method"


def run_csv(run: RunResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in run.history:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buf.getvalue()


def write_run_csv(out: str | Path, run: RunResult) -> Path:
    """Write (atomically) ``logs/<method>_seed<k>.csv`` of ``run`` under ``out``: its epochs so far."""
    return write_atomic(Path(out) / "logs" / f"{safe_filename(run.method)}_seed{run.seed}.csv", run_csv(run))


# --- plots ----------------------------------------------------------------------------------------------
def _curves(runs: list[RunResult], key: str, x_key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean x, mean y, min y, max y over seeds at each epoch reached by every run."""
    n = min(len(r.history) for r in runs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        ys = [r.history[i][key] for r in runs]
        xs.append(statistics.fmean(r.history[i][x_key] for r in runs))
        vals = _finite(ys)
        mean.append(statistics.fmean(vals) if vals else math.nan)
        lo.append(min(vals) if vals else math.nan)
        hi.append(max(vals) if vals else math.nan)
    return xs, mean, lo, hi


def plot_png(exp: Experiment, x_key: str, title: str) -> bytes:
    """A PNG with two panels (test accuracy, train loss) against ``x_key`` ("epoch" or "train_time_s")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for i, m in enumerate(exp.methods):
        runs = [r for r in exp.all_runs if r.method == m["method"] and r.history]
        if not runs:
            continue
        # ten colours, then the same colours dashed with squares, dotted with triangles: no two methods alike
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[i // 10 % 3],
                 "marker": ("o", "s", "^")[i // 10 % 3]}
        for ax, key in zip(axes, ("test_acc", "train_loss")):
            xs, mean, lo, hi = _curves(runs, key, x_key)
            (line,) = ax.plot(xs, mean, markersize=3, label=m["method"], **style)
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    xlabel = "epoch" if x_key == "epoch" else "training time (s, evaluation excluded)"
    axes[0].set(xlabel=xlabel, ylabel="test accuracy", title="test accuracy")
    axes[1].set(xlabel=xlabel, ylabel="train loss (epoch mean)", title="train loss", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) > 8:  # a legend inside the panel would cover the curves: beside the figure instead
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    else:
        axes[0].legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --- everything -----------------------------------------------------------------------------------------
def write_results_json(exp: Experiment, out: Path, name: str, argv: list[str] | None = None) -> Path:
    return write_atomic(out / "results.json", json.dumps(results_dict(exp, name, argv), indent=2) + "\n")


def write_report(
    exp: Experiment, out: str | Path, name: str, command_line: str, *, plots: bool = True,
    argv: list[str] | None = None,
) -> dict[str, Path]:
    """Write every report file under ``out``; returns ``{kind: path}``. Without matplotlib, plots are
    skipped with a note in results.md instead of failing the run."""
    out = Path(out)
    files = {"json": write_results_json(exp, out, name, argv)}
    md = results_markdown(exp, name, command_line)
    for run in exp.all_runs:
        files[f"csv:{run.method}:{run.seed}"] = write_run_csv(out, run)
    if plots:
        try:
            title = f"{exp.splits_info['name']} · {exp.model_info['name']} · {exp.config.seeds} seed(s)"
            files["plot_epoch"] = write_atomic(out / "curves_epoch.png", plot_png(exp, "epoch", title))
            files["plot_time"] = write_atomic(out / "curves_time.png", plot_png(exp, "train_time_s", title))
            md += "\n![curves vs epoch](curves_epoch.png)\n\n![curves vs time](curves_time.png)\n"
        except ModuleNotFoundError:
            md += "\nPlots skipped: matplotlib is not installed (pip install 'fwdgrad[plots]').\n"
    files["md"] = write_atomic(out / "results.md", md)
    return files
