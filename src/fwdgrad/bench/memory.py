"""Extra step memory (and the step time) of one configuration, measured in a fresh process: the peak of a
step beyond the memory after the warm-up steps (``VmHWM − VmRSS`` after ``clear_refs=5`` on Linux, the
allocator's peak on CUDA)."""

from __future__ import annotations

import gc
import resource
import statistics

import torch

from fwdgrad._procmem import reset_peak_rss, status_kib
from fwdgrad.bench.models import Config, Result, build
from fwdgrad.bench.steps import make_step, prime
from fwdgrad.bench.timing import Timer, device_name

#: The environment of the memory worker: glibc returns every freed block of 64 KiB or more at once.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(cfg: Config, steps: int, warmup: int, device: str = "cpu") -> Result:
    """Run ``cfg`` here (call it in a fresh process): median step time and extra peak memory.

    The peak is reset after the warm-up steps, so ``.grad`` (kept between steps) and other first-step
    allocations are not charged to a step: a step is charged only for what it adds."""
    prime(cfg, device)
    model, x, y = build(cfg.model, device)
    step = make_step(cfg, model, x, y)
    timer = Timer(device)
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
