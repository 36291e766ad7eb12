"""The worker processes: ``python -m fwdgrad.bench --worker SPEC`` measures one configuration (or times one
model's configurations round-robin) and prints its result as one JSON line, which the parent reads back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from fwdgrad.bench.memory import measure
from fwdgrad.bench.models import Config, Result
from fwdgrad.bench.timing import measure_round_robin


def worker(argv: Sequence[str]) -> None:
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
