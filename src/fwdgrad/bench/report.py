"""The report of ``fwdgrad bench``: one table per model (ratios to backprop), the K-scaling lines, the plot,
and ``speed_memory.{md,json,png}`` written atomically; :func:`load_results` reads a report back."""

from __future__ import annotations

import io
import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from fwdgrad._io import write_atomic
from fwdgrad.bench.models import MODEL_BATCH, Config, Result


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def markdown_table(results: Sequence[Result]) -> str:
    """One table per model: step time and extra memory, absolute and as a ratio to backprop."""
    lines: list[str] = []
    for model in dict.fromkeys(r.config.model for r in results):
        rows = [r for r in results if r.config.model == model]
        bp = next((r for r in rows if r.config.method == "bp" and not r.error), None)
        lines += [
            f"**{model}** (batch {MODEL_BATCH.get(model, '?')})",
            "",
            "| method | step ms | time / BP | CPU ms | CPU / BP | extra MB | memory / BP "
            "| extra MB, default malloc | / BP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r.error:
                lines.append(f"| {r.config.label} | {r.error} | | | | | | | |")
                continue
            t_ratio = r.median_ms / bp.median_ms if bp else math.nan
            m_ratio = r.extra_mb / bp.extra_mb if bp and bp.extra_mb > 0 else math.nan
            d_ratio = r.extra_default_mb / bp.extra_default_mb if bp and bp.extra_default_mb > 0 else math.nan
            c_ratio = r.cpu_ms / bp.cpu_ms if bp and bp.cpu_ms > 0 else math.nan
            lines.append(
                f"| {r.config.label} | {_fmt(r.median_ms, 1)} | {_fmt(t_ratio)} | {_fmt(r.cpu_ms, 1)} | "
                f"{_fmt(c_ratio)} | {_fmt(r.extra_mb, 0)} | "
                f"{_fmt(m_ratio)} | {_fmt(r.extra_default_mb, 0)} | {_fmt(d_ratio)} |"
            )
        lines.append("")
    return "\n".join(lines)


def k_scaling_lines(results: Sequence[Result]) -> list[str]:
    """``step(K) / (K · step(K=1))`` for every (model, tangents, fused) measured at K = 1 and K > 1."""
    out = []
    by_key = {(r.config.model, r.config.tangents, r.config.fused, r.config.k): r for r in results
              if r.config.method == "fg-w" and not r.error and r.config.chunk_size is None}
    for (model, tangents, fused, k), r in sorted(by_key.items()):
        one = by_key.get((model, tangents, fused, 1))
        if k > 1 and one is not None:
            ratio = r.median_ms / (k * one.median_ms)
            cpu = r.cpu_ms / (k * one.cpu_ms) if one.cpu_ms > 0 else math.nan
            out.append(f"| {model} | {tangents}{' fused' if fused else ''} | {k} | {_fmt(ratio)} | {_fmt(cpu)} |")
    return out


def plot(results: Sequence[Result], path: Path) -> bool:
    """Bars of time / BP and memory / BP per configuration, one panel row per model (PNG, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.config.model for r in results))
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 3.2 + 0.0 * len(models)), squeeze=False)
    fig.set_figheight(max(3.0, 4.0 * len(models)))
    for row, model in enumerate(models):
        rows = [r for r in results if r.config.model == model and not r.error]
        bp = next((r for r in rows if r.config.method == "bp"), None)
        if bp is None:
            continue
        labels = [r.config.label for r in rows]
        for col, (key, base, title) in enumerate(
            (("median_ms", bp.median_ms, "step time / backprop"), ("extra_mb", bp.extra_mb, "extra memory / backprop"))
        ):
            ax = axes[row][col]
            values = [getattr(r, key) / base if base > 0 else math.nan for r in rows]
            ax.bar(range(len(rows)), values, color=["0.5" if r.config.method != "fg-w" else "C0" for r in rows])
            ax.axhline(1.0, color="k", lw=0.8)
            finite = [v for v in values if math.isfinite(v) and v > 0]
            if finite and max(finite) / min(finite) > 20:
                ax.set_yscale("log")
            ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=6)
            ax.set_title(f"{model}: {title}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True


def report(results: Sequence[Result], out_dir: Path, *, command: str, wall_s: float,
           earlier: Sequence[str] = ()) -> Path:
    """Write ``speed_memory.md`` (tables), ``speed_memory.json`` (raw numbers) and ``speed_memory.png``."""
    out_dir = Path(out_dir)
    first = next((r for r in results if not r.error), None)
    head = [
        "# fwdgrad bench: step time and extra step memory, ratios to backprop",
        "",
        "".join(f"Earlier command (kept rows): `{c}`. " for c in earlier)
        + f"Command: `{command}` ({wall_s:.0f} s). torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, {first.threads if first else '?'} torch threads, device "
        f"**{first.device if first else '?'}**. Memory: {first.memory_method if first else '?'}. "
        f"Timing: {first.timing if first and first.timing else '?'} (round-robin: every method of a model in one "
        "process, one step of each per round, so load on a shared machine falls on all alike; fresh process: each "
        "configuration alone). Step = estimate (or backward) + SGD update, `.grad` kept between steps; median of "
        "the timed steps (wall clock, CUDA events on a GPU; CPU = process CPU time). Extra MB: the peak of one step "
        "beyond the memory after a warm-up step, in a fresh process per configuration (CPU: live memory, "
        "MALLOC_MMAP_THRESHOLD_=65536; GPU: allocator peak); default malloc: the fresh-process timing run's peak.",
        "",
    ]
    scaling = k_scaling_lines(results)
    tail = []
    if scaling:
        tail = ["", "K scaling, `step(K) / (K × step(K=1))`:", "", "| model | tangents | K | wall | CPU |",
                "|---|---|---:|---:|---:|", *scaling, ""]
    write_atomic(out_dir / "speed_memory.md", "\n".join(head) + "\n" + markdown_table(results) + "\n".join(tail))
    payload = {"command": command, "earlier_commands": list(earlier), "torch": torch.__version__,
               "results": [asdict(r) for r in results]}
    write_atomic(out_dir / "speed_memory.json", json.dumps(payload, indent=1))
    plot(results, out_dir / "speed_memory.png")
    return out_dir / "speed_memory.md"


def load_results(path: Path | str) -> list[Result]:
    """The results stored in a ``speed_memory.json`` (``[]`` if there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for data in json.loads(path.read_text())["results"]:
        data["config"] = Config(**data["config"])
        out.append(Result(**data))
    return out
