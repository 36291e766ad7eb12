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

Example:
    >>> from fwdgrad.bench import Config, quick_configs
    >>> Config(model="mlp8", method="fg-w", tangents="rank1", k=4).label
    'fg-w rank1 K=4'
    >>> all(c.model.startswith("tiny") for c in quick_configs())
    True
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad._io import write_atomic
from fwdgrad._procmem import reset_peak_rss, status_kib

#: Model name → (builder, batch size). The MLPs are ``depth × Linear(width, width) + ReLU`` and a head of 10.
MODEL_BATCH = {"mlp8": 512, "mlp32": 2048, "mlp8x4096": 4096, "mlp4x128": 64, "cnn": 128, "tiny-mlp": 32,
               "tiny-cnn": 8}
METHODS = ("forward", "bp", "jvp-naive", "fg-w")
#: The environment of the memory worker: glibc returns every freed block of 64 KiB or more at once.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
LR = 1e-4


@dataclass(frozen=True)
class Config:
    """One benchmark configuration; ``label`` names it in the table."""

    model: str
    method: str
    tangents: str = "gaussian"
    k: int = 1
    fused: bool = False
    chunk_size: int | None = None

    @property
    def label(self) -> str:
        if self.method != "fg-w":
            return self.method
        text = f"fg-w {self.tangents} K={self.k}"
        if self.chunk_size is not None:
            text += f" chunk={self.chunk_size}"
        return text + (" fused" if self.fused else "")


@dataclass
class Result:
    """The measurement of one configuration (``error`` set when the worker failed)."""

    config: Config
    median_ms: float = math.nan
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: float = math.nan
    extra_mb: float = math.nan
    extra_default_mb: float = math.nan
    memory_method: str = ""
    threads: int = 0
    device: str = "cpu"
    timing: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------------------------
# Models and data


def _mlp(depth: int, width: int, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _cnn(channels: int, hidden: int) -> nn.Module:
    with contextlib.suppress(Exception):  # the project's CNN, when its module is there
        from fwdgrad.models import build_model

        return build_model("cnn", (1, 28, 28), 10, channels=channels, hidden=hidden)
    return nn.Sequential(  # the same architecture (Baydin et al. 2022)
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


def build(model: str, device: str = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one batch ``(x, y)`` of a benchmark model name, with fixed seeds."""
    torch.manual_seed(0)
    if model == "mlp8":
        net, shape = _mlp(8, 1024), (1024,)
    elif model == "mlp32":
        net, shape = _mlp(32, 1024), (1024,)
    elif model == "mlp8x4096":
        net, shape = _mlp(8, 4096), (4096,)
    elif model == "mlp4x128":
        net, shape = _mlp(4, 128), (128,)
    elif model == "cnn":
        net, shape = _cnn(64, 1024), (1, 28, 28)
    elif model == "tiny-mlp":
        net, shape = _mlp(2, 64), (64,)
    elif model == "tiny-cnn":
        net, shape = _cnn(4, 32), (1, 28, 28)
    else:
        raise ValueError(f"fwdgrad.bench: unknown model {model!r}; choose one of {sorted(MODEL_BATCH)}")
    g = torch.Generator().manual_seed(1)
    batch = MODEL_BATCH[model]
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return net.to(device), x.to(device), y.to(device)


# ------------------------------------------------------------------------------------------------------
# Steps


def _naive_jvp_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: torch.optim.Optimizer,
                    generator: torch.Generator) -> None:
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device).to(p.device)
                for n, p in params.items()}
    _, d = torch.func.jvp(lambda ps: loss_fn_call(model, loss_fn, ps), (params,), (tangents,))
    for (_, p), t in zip(model.named_parameters(), tangents.values()):
        if p.grad is None:
            p.grad = t.mul_(d)
        else:  # .grad kept between steps, as the other methods have it
            p.grad.copy_(t).mul_(d)
    opt.step()


def loss_fn_call(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], params: dict) -> torch.Tensor:
    """``loss_fn(model)`` with ``params`` substituted (``functional_call``)."""
    return torch.func.functional_call(_Wrap(model, loss_fn), {"m." + n: t for n, t in params.items()}, ())


class _Wrap(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.m, self.loss_fn = model, loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.m)


def make_step(cfg: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A closure running one full training step of ``cfg`` (gradient or estimate, then the SGD update)."""
    import fwdgrad

    loss_fn = lambda m: F.cross_entropy(m(x), y)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if cfg.method == "forward":

        def step() -> None:
            with torch.no_grad():
                loss_fn(model)

        return step
    if cfg.method == "bp":

        def step() -> None:
            opt.zero_grad(set_to_none=False)
            loss_fn(model).backward()
            opt.step()

        return step
    if cfg.method == "jvp-naive":
        gen = torch.Generator(device=x.device).manual_seed(0)  # drawn where the model is, as a user would

        def step() -> None:
            _naive_jvp_step(model, loss_fn, opt, gen)

        return step
    if cfg.method != "fg-w":
        raise ValueError(f"fwdgrad.bench: unknown method {cfg.method!r}; choose one of {METHODS}")
    est = fwdgrad.ForwardGradient(num_directions=cfg.k, tangents=cfg.tangents, seed=0, chunk_size=cfg.chunk_size)
    if cfg.fused:
        return lambda: est.sgd_step(model, loss_fn, lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        est(model, loss_fn)
        opt.step()

    return step


# ------------------------------------------------------------------------------------------------------
# The worker (one configuration, in its own process)


class _Timer:
    """Wall time of one call in ms: ``time.perf_counter`` on the CPU; on CUDA a pair of CUDA events around
    the call, read after ``end.synchronize()`` (the GPU's own clock: no host-side launch jitter counted)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], None]) -> tuple[float, float]:
        """``(wall ms, process CPU ms)`` of ``fn()``."""
        start_cpu = time.process_time()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), (time.process_time() - start_cpu) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - start_cpu) * 1e3


def device_name(device: str) -> str:
    """The device in words: the GPU's name for ``cuda``, else the CPU model (from ``/proc/cpuinfo``)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} (cpu, {os.cpu_count()} visible)"
    return f"{platform.processor() or platform.machine()} (cpu, {os.cpu_count()} visible)"


def _prime(cfg: Config, device: str) -> None:
    """Two steps of ``cfg`` on a tiny model of the same kind, dropped: PyTorch loads much on first use
    (forward-AD rules, ``torch.func``, decompositions), a one-time cost that is not a step's."""
    tiny = "tiny-cnn" if "cnn" in cfg.model else "tiny-mlp"
    tiny_model, tiny_x, tiny_y = build(tiny, device)
    tiny_step = make_step(Config(tiny, cfg.method, cfg.tangents, cfg.k, cfg.fused, cfg.chunk_size),
                          tiny_model, tiny_x, tiny_y)
    for _ in range(2):
        tiny_step()


def measure(cfg: Config, steps: int, warmup: int, device: str = "cpu") -> Result:
    """Run ``cfg`` here (call it in a fresh process): median step time and extra peak memory.

    The peak is reset after the warm-up steps, so ``.grad`` (kept between steps) and other first-step
    allocations are not charged to a step: a step is charged only for what it adds."""
    _prime(cfg, device)
    model, x, y = build(cfg.model, device)
    step = make_step(cfg, model, x, y)
    timer = _Timer(device)
    for _ in range(warmup):
        timer(step)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, how = torch.cuda.memory_allocated(), "cuda max_memory_allocated - memory_allocated"
    else:
        before_kb = status_kib("VmRSS")
        how = "VmHWM - VmRSS (clear_refs=5)" if before_kb is not None and reset_peak_rss() else "ru_maxrss - VmRSS"
    times, cpu = [], []
    for _ in range(steps):
        wall, proc = timer(step)
        times.append(wall)
        cpu.append(proc)
    if device.startswith("cuda"):
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_kb = status_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        extra = (peak_kb - (before_kb or 0)) / 1024
    return Result(cfg, median_ms=statistics.median(times), times_ms=times, cpu_ms=statistics.median(cpu),
                  extra_mb=extra, memory_method=how, threads=torch.get_num_threads(), device=device_name(device))


def measure_round_robin(configs: Sequence[Config], steps: int, warmup: int, device: str = "cpu") -> list[Result]:
    """Time every configuration of one model in this process, round-robin: each round runs one step of
    every configuration (the starting one rotating), so a load that comes and goes on a shared machine
    falls on every method alike and the ratios to backprop hold. The methods share one model (the same
    initial weights; ``.grad`` kept between steps). Memory is not measured here (see :func:`measure`)."""
    if len({c.model for c in configs}) != 1:
        raise ValueError("fwdgrad.bench.measure_round_robin: configurations of one model only")
    model, x, y = build(configs[0].model, device)
    timer = _Timer(device)
    results = {c: Result(c, threads=torch.get_num_threads(), device=device_name(device)) for c in configs}
    steps_of: dict[Config, Callable[[], None]] = {}
    for c in configs:
        try:
            _prime(c, device)
            steps_of[c] = make_step(c, model, x, y)
            for _ in range(warmup):
                timer(steps_of[c])
        except Exception as exc:  # reported in its row, the others go on
            steps_of.pop(c, None)
            results[c].error = f"{type(exc).__name__}: {str(exc)[:200]}"
    live = list(steps_of)
    cpu: dict[Config, list[float]] = {c: [] for c in live}
    for r in range(steps):
        for c in live[r % len(live):] + live[: r % len(live)] if live else []:
            wall, proc = timer(steps_of[c])
            results[c].times_ms.append(wall)
            cpu[c].append(proc)
    for c in live:
        results[c].median_ms = statistics.median(results[c].times_ms)
        results[c].cpu_ms = statistics.median(cpu[c])
    return [results[c] for c in configs]


def _worker(argv: Sequence[str]) -> None:
    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec.get("device", "cpu")
    if "configs" in spec:  # round-robin timing of one model's configurations
        res = measure_round_robin([Config(**c) for c in spec["configs"]], int(spec["steps"]), int(spec["warmup"]),
                                  device)
        print("FWDGRAD-BENCH-RESULTS " + json.dumps([asdict(r) for r in res]), flush=True)
        return
    cfg = Config(**spec["config"])
    res1 = measure(cfg, int(spec["steps"]), int(spec["warmup"]), device)
    print("FWDGRAD-BENCH-RESULT " + json.dumps(asdict(res1)), flush=True)


def _result_of(data: dict) -> Result:
    data["config"] = Config(**data["config"])
    return Result(**data)


def _spawn(spec: dict, timeout: float, env: dict[str, str] | None) -> tuple[list[str], str]:
    """Run a worker; ``(stdout lines, error)`` (``error`` empty when it exited normally)."""
    cmd = [sys.executable, "-m", "fwdgrad.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    error = "" if proc.returncode == 0 else f"worker failed (rc={proc.returncode}): {tail[0][:200]}"
    return proc.stdout.splitlines(), error


def run_in_subprocess(
    cfg: Config, *, steps: int, warmup: int, threads: int | None, device: str, timeout: float,
    env: dict[str, str] | None = None,
) -> Result:
    """Measure ``cfg`` in a fresh ``python -m fwdgrad.bench --worker`` process (``env`` added to its
    environment)."""
    spec = {"config": asdict(cfg), "steps": steps, "warmup": warmup, "threads": threads, "device": device}
    lines, error = _spawn(spec, timeout, env)
    for line in lines:
        if line.startswith("FWDGRAD-BENCH-RESULT "):
            return _result_of(json.loads(line.split(" ", 1)[1]))
    return Result(cfg, error=error or "worker failed: no result")


def round_robin_in_subprocess(
    configs: Sequence[Config], *, steps: int, warmup: int, threads: int | None, device: str, timeout: float,
) -> list[Result]:
    """Time ``configs`` (one model) round-robin in one fresh worker process (:func:`measure_round_robin`)."""
    spec = {"configs": [asdict(c) for c in configs], "steps": steps, "warmup": warmup, "threads": threads,
            "device": device}
    lines, error = _spawn(spec, timeout * len(configs), None)
    for line in lines:
        if line.startswith("FWDGRAD-BENCH-RESULTS "):
            return [_result_of(d) for d in json.loads(line.split(" ", 1)[1])]
    return [Result(c, error=error or "worker failed: no result") for c in configs]


# ------------------------------------------------------------------------------------------------------
# Configurations, table and plot


def full_configs(
    models: Sequence[str] = ("mlp8", "mlp32", "cnn"), ks: Sequence[int] = (1, 4, 16),
    tangents: Sequence[str] = ("gaussian", "rademacher", "rank1"), fused: Sequence[bool] = (False, True),
    chunk_size: int | None = None, baselines: Sequence[str] = ("forward", "bp", "jvp-naive"),
) -> list[Config]:
    """The baselines (one forward, backprop, the naive ``torch.func.jvp`` step) and FG-W over tangents × K ×
    fused; ``chunk_size`` applies to K > 1."""
    out = []
    for model in models:
        out += [Config(model, b) for b in baselines]
        for name in tangents:
            for k in ks:
                for f in fused:
                    out.append(Config(model, "fg-w", name, k, f, chunk_size if k > 1 else None))
    return out


def quick_configs() -> list[Config]:
    """A smoke test on tiny models: every method and path once (runs in well under a minute)."""
    return [
        Config("tiny-mlp", "bp"),
        Config("tiny-mlp", "jvp-naive"),
        Config("tiny-mlp", "fg-w", "gaussian", 1),
        Config("tiny-mlp", "fg-w", "rank1", 4, fused=True),
        Config("tiny-cnn", "fg-w", "rank1", 2),
    ]


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
        _worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="fwdgrad bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, "fwdgrad bench " + " ".join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
