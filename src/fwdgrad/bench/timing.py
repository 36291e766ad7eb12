"""Step times: a wall/CPU timer (CUDA events on a GPU), the device in words, and the round-robin timing of
one model's configurations in one process."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fwdgrad.bench.models import Config, Result, build
from fwdgrad.bench.steps import make_step, prime


class Timer:
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


def measure_round_robin(configs: Sequence[Config], steps: int, warmup: int, device: str = "cpu") -> list[Result]:
    """Time every configuration of one model in this process, round-robin: each round runs one step of
    every configuration (the starting one rotating), so a load that comes and goes on a shared machine
    falls on every method alike and the ratios to backprop hold. The methods share one model (the same
    initial weights; ``.grad`` kept between steps). Memory is not measured here (see :func:`measure`)."""
    if len({c.model for c in configs}) != 1:
        raise ValueError("fwdgrad.bench.measure_round_robin: configurations of one model only")
    model, x, y = build(configs[0].model, device)
    timer = Timer(device)
    results = {c: Result(c, threads=torch.get_num_threads(), device=device_name(device)) for c in configs}
    steps_of: dict[Config, Callable[[], None]] = {}
    for c in configs:
        try:
            prime(c, device)
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
