"""Files of a diagnosis: ``diagnose.json``, ``diagnose.md`` (tables) and ``diagnose.png`` (bars per method)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fwdgrad._io import write_atomic
from fwdgrad.diagnostics.output import markdown_table, pyplot, save_figure, write_json

HEADER = ["method", "cosine", "rel. bias", "bias noise", "tr Var", "E‖ĝ‖²", "± s.e.", "theory", "ratio", "SNR",
          "ms/estimate", "MB/estimate"]


def _row(label: str, s: dict[str, Any], time_ms: float | None = None, mem: float | None = None) -> list[Any]:
    def opt(v: Any) -> Any:
        return "n/a" if v is None else v

    return [label, s["cosine"], s["rel_bias"], s["rel_bias_noise"], s["variance"], s["second_moment"],
            s["second_moment_se"], opt(s["second_moment_theory"]), opt(s["second_moment_ratio"]), s["snr"],
            "" if time_ms is None else time_ms, "" if mem is None else opt(mem)]


def markdown(report: dict[str, Any], title: str = "") -> str:
    """The overall table, one per-layer table per method, and the skipped methods."""
    lines = [f"# {title or 'Estimator diagnostics'}", "",
             f"{report['samples']} estimates per method; {report['num_parameters']} parameters; batch of "
             f"{report['batch_size']}. Reference: the autograd gradient of the mean loss. `rel. bias` = ‖mean − "
             "true‖/‖true‖; `bias noise` = the value it takes for an unbiased estimator with this many samples; "
             "`ratio` = measured E‖ĝ‖² / theory.", "", "## Overall", ""]
    rows = [_row(m["method"], m["overall"], m["time_ms"], m["memory_mb"]) for m in report["methods"]]
    lines.append(markdown_table(HEADER, rows))
    for m in report["methods"]:
        lines += [f"## {m['method']} per parameter", ""]
        lines.append(markdown_table(["parameter", *HEADER[1:-2]],
                                    [_row(n, s)[:-2] for n, s in m["layers"].items()]))
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['method']}: {s['reason']}" for s in report["skipped"]] + [""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None or not report["methods"]:
        return None
    names = [m["method"] for m in report["methods"]]
    o = [m["overall"] for m in report["methods"]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 0.45 * len(names) + 2))
    panels = [("cosine to the true gradient", [s["cosine"] for s in o], False),
              ("E‖ĝ‖² / theory", [s["second_moment_ratio"] or math.nan for s in o], False),
              ("SNR ‖a‖²/E‖ĝ−a‖²", [min(s["snr"], 1e12) for s in o], True),
              ("ms per estimate", [m["time_ms"] for m in report["methods"]], False)]
    for ax, (title, vals, log) in zip(axes, panels):
        ax.barh(range(len(names)), vals, color="tab:blue")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    axes[1].axvline(1.0, color="k", lw=0.8)
    return save_figure(fig, path)


def write_report(report: dict[str, Any], out: Path, title: str = "", plots: bool = True) -> list[Path]:
    """Write ``diagnose.json``, ``diagnose.md`` and (with matplotlib) ``diagnose.png`` into ``out``."""
    paths = [write_json(out / "diagnose.json", report), write_atomic(out / "diagnose.md", markdown(report, title))]
    if plots:
        p = plot(report, out / "diagnose.png")
        if p is not None:
            paths.append(p)
    return paths
