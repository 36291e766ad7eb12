r"""``fwdgrad bench``: step time and extra step memory of forward gradients against backprop.

**Timing** (default: round-robin in one process). All configurations of one model (method × tangents × K
× update) run in one fresh worker process on one shared model: after a warm-up step each, every round
runs one step of every configuration, the first one rotating from round to round. Load from other
processes on a shared machine then falls on every method alike, so the ratios to backprop hold even where
absolute times move by ±40 % between runs (what fresh-process timings showed on a shared 2-core VM).
``--fresh`` times each configuration alone in its own process instead. Each step is timed with
``time.perf_counter`` (and the process CPU time) on the CPU, and with a pair of CUDA events on a GPU.

**Memory** (always in a fresh process per configuration):

0. run two steps of the same configuration on a tiny model of the same kind (``tiny-mlp`` or
   ``tiny-cnn``) and drop it: PyTorch loads much on first use (forward-AD rules, ``torch.func``, the
   decompositions behind them), and that one-time cost is not the memory of a step;
1. build the model and one batch of data (fixed seeds); run the warm-up step, which allocates ``.grad``
   (kept between steps: ``zero_grad(set_to_none=False)``), then ``gc.collect()``;
2. read ``VmRSS`` from ``/proc/self/status`` → ``rss_before``; reset the peak by writing ``5`` to
   ``/proc/self/clear_refs`` (Linux ≥ 4.0 sets ``VmHWM`` to the current RSS);
3. run one step;
4. read ``VmHWM`` → ``peak``; the **extra step memory** is ``peak − rss_before``: what a step adds beyond
   the model, its ``.grad``, the data and the imported libraries. Where ``clear_refs`` cannot be written,
   ``ru_maxrss`` replaces ``VmHWM``; the peak then includes the set-up, which the report marks. The
   process runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so every block of 64 KiB or more is returned to the
   system when freed and RSS follows the memory the step really holds. On CUDA the figure is
   ``torch.cuda.max_memory_allocated() − memory_allocated()`` after ``reset_peak_memory_stats()``.

The report names the device (the GPU's name, or the CPU model).

The step time is the median of the timed steps. The report gives each as a ratio to backprop on the same
model in the same run: ``time / time(bp)`` and ``extra memory / extra memory(bp)``.

Methods:
    ``forward``     one forward pass under ``torch.no_grad`` (a floor for the memory of any step).
    ``bp``          ``loss.backward()`` + ``torch.optim.SGD`` (the baseline).
    ``jvp-naive``   ``torch.func.jvp`` through ``functional_call`` with Gaussian tangents drawn for the whole
                    model, ``.grad = d·v``, ``torch.optim.SGD``: what one writes without fwdgrad.
    ``fg-w``        :class:`fwdgrad.ForwardGradient` (``tangents``, ``K``) + ``torch.optim.SGD``, or, with
                    ``fused``, :meth:`~fwdgrad.ForwardGradient.sgd_step`.

The package by concern: :mod:`~fwdgrad.bench.models` (the models and configurations),
:mod:`~fwdgrad.bench.steps` (the measured steps), :mod:`~fwdgrad.bench.timing`, :mod:`~fwdgrad.bench.memory`,
:mod:`~fwdgrad.bench.workers` (the fresh processes) and :mod:`~fwdgrad.bench.report`; here the entry points.

Example:
    >>> from fwdgrad.bench import Config, quick_configs
    >>> Config(model="mlp8", method="fg-w", tangents="rank1", k=4).label
    'fg-w rank1 K=4'
    >>> all(c.model.startswith("tiny") for c in quick_configs())
    True
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fwdgrad.bench.memory import LIVE_MEMORY_ENV, measure
from fwdgrad.bench.models import METHODS, MODEL_BATCH, Config, Result, build, full_configs, quick_configs
from fwdgrad.bench.report import k_scaling_lines, load_results, markdown_table, plot, report
from fwdgrad.bench.steps import make_step
from fwdgrad.bench.timing import device_name, measure_round_robin
from fwdgrad.bench.workers import round_robin_in_subprocess, run_in_subprocess, worker

__all__ = [
    "LIVE_MEMORY_ENV",
    "METHODS",
    "MODEL_BATCH",
    "Config",
    "Result",
    "add_arguments",
    "build",
    "device_name",
    "full_configs",
    "k_scaling_lines",
    "load_results",
    "main",
    "make_step",
    "markdown_table",
    "measure",
    "measure_round_robin",
    "output_folder",
    "plot",
    "quick_configs",
    "report",
    "round_robin_in_subprocess",
    "run_benchmark",
    "run_from_args",
    "run_in_subprocess",
]


def run_benchmark(
    configs: Sequence[Config], out_dir: Path | str, *, steps: int = 5, warmup: int = 1, threads: int | None = None,
    device: str = "cpu", timeout: float = 900.0, command: str = "fwdgrad bench",
    log: Callable[[str], None] | None = print, previous: Sequence[Result] = (), earlier: Sequence[str] = (),
    fresh: bool = False, memory: bool = True,
) -> list[Result]:
    """Measure every configuration and write the report into ``out_dir`` (after the ``previous`` results
    whose configuration is not measured again).

    Timing: by default the configurations of each model run round-robin in one worker process
    (:func:`measure_round_robin`); ``fresh``: each in its own process (:func:`measure`). Memory: always one
    fresh process per configuration (one warm-up step, one measured step, ``.grad`` kept); ``memory=False``
    skips it."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"fwdgrad.bench.run_benchmark: steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    start = time.perf_counter()
    timed: dict[Config, Result] = {}
    if fresh:
        for cfg in configs:
            timed[cfg] = run_in_subprocess(cfg, steps=steps, warmup=warmup, threads=threads, device=device,
                                           timeout=timeout)
    else:
        for model in dict.fromkeys(c.model for c in configs):
            group = [c for c in configs if c.model == model]
            for res in round_robin_in_subprocess(group, steps=steps, warmup=warmup, threads=threads, device=device,
                                                 timeout=timeout):
                timed[res.config] = res
    results = []
    for i, cfg in enumerate(configs, 1):
        res = timed[cfg]
        res.extra_default_mb, res.extra_mb = (res.extra_mb if fresh else math.nan), math.nan
        if not res.error and memory:
            live = run_in_subprocess(cfg, steps=1, warmup=1, threads=threads, device=device, timeout=timeout,
                                     env=None if device.startswith("cuda") else LIVE_MEMORY_ENV)
            res.extra_mb = live.extra_mb if not live.error else math.nan
            res.memory_method = live.memory_method + ("" if device.startswith("cuda") else f" with {LIVE_MEMORY_ENV}")
        elif not res.error:
            res.memory_method = "not measured (--no-memory)"
        res.timing = "fresh process" if fresh else "round-robin"
        results.append(res)
        if log is not None:
            what = res.error or f"{res.median_ms:9.1f} ms  {res.extra_mb:8.1f} MB"
            log(f"[{i}/{len(configs)}] {cfg.model:9s} {cfg.label:32s} {what}")
    measured = {r.config for r in results}
    merged = [r for r in previous if r.config not in measured] + results
    report(merged, Path(out_dir), command=command, wall_s=time.perf_counter() - start,
           earlier=earlier if previous else ())
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fwdgrad bench`` (shared by the CLI and ``benchmarks/speed_memory.py``)."""
    parser.add_argument("--quick", action="store_true", help="tiny models, a few configurations (< 60 s)")
    parser.add_argument("--models", default="mlp8,mlp32,cnn",
                        help="comma-separated: mlp8 (8x1024, batch 512), mlp32 (32x1024, 2048), mlp8x4096 (4096), "
                             "mlp4x128 (batch 64), cnn, tiny-mlp, tiny-cnn")
    parser.add_argument("--ks", default="1,4,16", help="comma-separated numbers of directions")
    parser.add_argument("--tangents", default="gaussian,rademacher,rank1", help="comma-separated samplers for fg-w")
    parser.add_argument("--fused", choices=("both", "no", "yes"), default="both",
                        help="fg-w through .grad + torch.optim.SGD (no), the fused sgd_step (yes), or both")
    parser.add_argument("--baselines", default="forward,bp,jvp-naive", help="comma-separated: forward, bp, jvp-naive")
    parser.add_argument("--chunk-size", type=int, default=None, help="fg-w chunk_size for K > 1")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="time only (skip the fresh memory process of each configuration)")
    parser.add_argument("--fresh", action="store_true",
                        help="time each configuration in its own process (default: a model's methods round-robin "
                             "in one process)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in each worker (0: torch's default; one thread by default, so the "
                             "ratios do not move with other processes on shared cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA events, allocator peaks)")
    parser.add_argument("--out", default=None,
                        help="directory for the .md, .json and .png (default: runs/bench, or runs/bench-quick with "
                             "--quick; the committed reports in benchmarks/results are written only when named, "
                             "and never by --quick)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--append", action="store_true",
                        help="keep the results already in OUT/speed_memory.json (a configuration run again replaces "
                             "its old row) and report them together")


def output_folder(out: str | None, quick: bool) -> Path:
    """Where ``fwdgrad bench`` writes: ``out``, else ``runs/bench`` (``runs/bench-quick`` with ``--quick``).
    A quick run refuses a folder that holds a report of a full run (``speed_memory.json`` whose command has
    no ``--quick``, e.g. the committed ``benchmarks/results``): its tiny models would replace the measured grid."""
    folder = Path(out) if out is not None else Path("runs") / ("bench-quick" if quick else "bench")
    report = folder / "speed_memory.json"
    if quick and report.is_file():
        try:
            command = str(json.loads(report.read_text()).get("command", ""))
        except (OSError, ValueError, AttributeError):
            command = ""
        if "--quick" not in command.split():
            raise ValueError(f"fwdgrad bench: --quick would overwrite the report of a full run in {folder} "
                             f"({command or 'unreadable'!r}); give another --out")
    return folder


def run_from_args(args: argparse.Namespace, command: str) -> int:
    """Run ``fwdgrad bench`` from parsed arguments; returns the exit code."""
    if args.quick:
        configs, steps, warmup = quick_configs(), 2, 1
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in MODEL_BATCH]
        if bad:
            raise ValueError(f"fwdgrad bench: unknown model {bad[0]!r}; choose from {sorted(MODEL_BATCH)}")
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
        if not ks or min(ks) < 1:
            raise ValueError(f"fwdgrad bench: --ks must list ints >= 1, got {args.ks!r}")
        names = [t.strip() for t in args.tangents.split(",") if t.strip()]
        from fwdgrad.directions import check_sampler_name

        for name in names:
            check_sampler_name("fwdgrad bench --tangents", name)
        baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
        bad = [b for b in baselines if b not in METHODS or b == "fg-w"]
        if bad:
            raise ValueError(f"fwdgrad bench: unknown baseline {bad[0]!r}; choose from forward, bp, jvp-naive")
        if args.chunk_size is not None and args.chunk_size < 1:
            raise ValueError(f"fwdgrad bench: --chunk-size must be >= 1, got {args.chunk_size}")
        fused = {"both": (False, True), "no": (False,), "yes": (True,)}[args.fused]
        configs = full_configs(models, ks, names, fused, args.chunk_size, baselines)
        steps, warmup = args.steps, args.warmup
    args.out = str(output_folder(args.out, args.quick))
    previous = load_results(Path(args.out) / "speed_memory.json") if args.append else []
    earlier: list[str] = []
    if previous:
        data = json.loads((Path(args.out) / "speed_memory.json").read_text())
        earlier = [*data.get("earlier_commands", []), data.get("command", "?")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"fwdgrad bench: --device {args.device} but torch.cuda.is_available() is False")
    results = run_benchmark(configs, args.out, steps=steps, warmup=warmup, threads=args.threads, device=args.device,
                            timeout=args.timeout, command=command, previous=previous, earlier=earlier,
                            fresh=args.fresh, memory=args.memory)
    print(f"wrote {Path(args.out) / 'speed_memory.md'}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fwdgrad.bench [options]`` (``--worker SPEC`` is the internal per-configuration mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="fwdgrad bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, "fwdgrad bench " + " ".join(argv))
