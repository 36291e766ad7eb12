"""Seed-sharing on torch.distributed: bytes exchanged per step and throughput with 1 and 2 processes.

Every figure comes from processes started here (gloo on 127.0.0.1) by :func:`fwdgrad.distributed.spawn_local`;
bytes are those counted by :class:`fwdgrad.distributed.Comm` around each collective (the logical payload:
what the call fills on the rank), beside data-parallel backprop's one float32 all-reduce of the gradient,
``4·n`` bytes. See docs/distributed.md for the results and the communication/compute model built from them::

    PYTHONPATH=src .venv/bin/python benchmarks/distributed.py            # -> benchmarks/results/distributed.json
    PYTHONPATH=src .venv/bin/python benchmarks/distributed.py --quick    # smoke run, small models, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fwdgrad.distributed import SeedSharingSGD, init_from_env, shard, spawn_local
from fwdgrad.models import build_model, num_parameters

#: name -> (registered model, input shape, classes, options)
MODELS: dict[str, tuple[str, tuple[int, ...], int, dict[str, Any]]] = {
    "mlp": ("mlp", (40,), 10, {"width": 256, "depth": 2}),  # the default task's model (MNIST-1D)
    "localmixer": ("localmixer-m1-16", (1, 28, 28), 10, {}),
    "mlp-100m": ("mlp", (10000,), 10, {"widths": "10000"}),  # 10000·10000 + 10000 + 10·10000 + 10 weights
}


def _batch(spec: dict[str, Any], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape, classes, _ = MODELS[spec["model"]]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)


def collectives(spec: dict[str, Any], out: Path) -> None:
    """One rank of the all-reduce timing: float32 tensors of the given byte sizes, a barrier before each call
    so that only the exchange is timed; rank 0 writes the median seconds per size."""
    import torch.distributed as dist

    rows = []
    for label, nbytes, reps in spec["sizes"]:
        t = torch.zeros(max(1, nbytes // 4))
        times = []
        for i in range(reps + 1):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(t)
            if i:  # the first call sets up the buffers
                times.append(time.perf_counter() - began)
        rows.append({"collective": "all_reduce", "label": label, "bytes": t.numel() * 4, "reps": reps,
                     "median_s": sorted(times)[len(times) // 2], "world": dist.get_world_size()})
    if dist.get_rank() == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    os._exit(0)


def worker(spec: dict[str, Any], out: Path) -> None:
    """One rank: for each (mode, K) of ``spec``, ``warmup + steps`` steps; rank 0 writes the figures."""
    torch.set_num_threads(1)
    comm = init_from_env(timeout_s=300)
    if spec.get("kind") == "collectives":
        collectives(spec, out)
    name, shape, classes, options = MODELS[spec["model"]]
    torch.manual_seed(0)
    model = build_model(name, shape, classes, **options)
    x, y = _batch(spec, spec["batch"])
    rows = []
    for mode in spec["modes"]:
        for k in spec["ks"]:
            xs, ys = (shard(x, comm.rank, comm.world), shard(y, comm.rank, comm.world)) if mode == "data" else (x, y)
            opt = SeedSharingSGD(model, "fg-w", seed=1, mode=mode, comm=comm, num_directions=k,
                                 tangents=spec["tangents"], check_every=spec["check_every"])
            for _ in range(spec["warmup"]):
                opt.step(lambda m, xs=xs, ys=ys: F.cross_entropy(m(xs), ys), lr=1e-6)
            opt.load_state_dict(opt.state_dict())  # restart the counters after the warm-up
            began = time.perf_counter()
            for _ in range(spec["steps"]):
                opt.step(lambda m, xs=xs, ys=ys: F.cross_entropy(m(xs), ys), lr=1e-6)
            wall = time.perf_counter() - began
            rows.append({"model": spec["model"], "n": num_parameters(model), "mode": mode, "K": k,
                         "world": comm.world, "batch": spec["batch"], "steps": spec["steps"],
                         "bytes_per_step": opt.bytes_per_step, "backprop_bytes": 4 * num_parameters(model),
                         "target": 8 * k * comm.world + 64, "s_per_step": wall / spec["steps"],
                         "phase_s_per_step": {p: v / spec["steps"] for p, v in opt.seconds.items()}})
    if comm.rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    os._exit(0)


def launch(spec: dict[str, Any], nproc: int, timeout_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        codes = spawn_local(nproc, [sys.executable, __file__, "--worker", json.dumps(spec), tmp],
                            timeout_s=timeout_s, env=env)
        if codes != [0] * nproc:
            raise RuntimeError(f"benchmarks/distributed.py: ranks exited with {codes} for {spec}")
        return json.loads((Path(tmp) / "rows.json").read_text())


def paper_model(rows: list[dict[str, Any]], worlds: tuple[int, ...] = (2, 8, 64, 1024)) -> str:
    r"""A markdown table: per-step time and exchange at ``worlds`` ranks, from the measured constants.

    Constants (all measured by this script on this machine): ``α`` = median time of a 16-byte all-reduce;
    ``β`` = bytes per second of the largest backprop all-reduce (ring: ``m/β`` at two ranks); ``t_est``,
    ``t_upd`` = the one-process step's estimate and update phases (mlp, batch 128, K = 4). Per rank and step:

    * data parallel: ``t_est/W + t_upd + log2(W)·α`` (the update is replicated: Amdahl's serial part);
    * tangent parallel (K per rank, K·W in all): ``t_est + W·t_upd + log2(W)·α + (W−1)·8K/β``, compared by
      directions per second with one process;
    * backprop's exchange: ring all-reduce ``2(W−1)/W · 4n/β + 2(W−1)·α`` (compute not modelled).
    """
    import math

    col = [r for r in rows if "collective" in r]
    alpha = min(r["median_s"] for r in col if r["bytes"] <= 128)
    big = max(col, key=lambda r: r["bytes"])
    beta = big["bytes"] / big["median_s"]
    one = next(r for r in rows if r.get("world") == 1 and "phase_s_per_step" in r)
    t_est, t_upd, k = one["phase_s_per_step"]["estimate"], one["phase_s_per_step"]["update"], one["K"]
    n_big = max(r["backprop_bytes"] for r in rows if "backprop_bytes" in r) // 4
    lines = [f"α = {alpha * 1e3:.3f} ms, β = {beta / 1e9:.3f} GB/s, t_est = {t_est * 1e3:.2f} ms, "
             f"t_upd = {t_upd * 1e3:.2f} ms (mlp, batch 128, K = {k}, one process)", "",
             "| W | data: ms/step | data speed-up | tangent: ms/step | tangent speed-up (directions/s) | "
             "seed-sharing bytes (data / tangent) | backprop bytes | backprop exchange, n = 100 M (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for w in worlds:
        lg = math.log2(w)
        data = t_est / w + t_upd + lg * alpha
        tan = t_est + w * t_upd + lg * alpha + (w - 1) * 8 * k / beta
        bp = 2 * (w - 1) / w * 4 * n_big / beta + 2 * (w - 1) * alpha
        lines.append(f"| {w} | {data * 1e3:.1f} | {(t_est + t_upd) / data:.2f} | {tan * 1e3:.1f} | "
                     f"{w * (t_est + t_upd) / tan:.2f} | {8 * (k + 1)} / {8 * k * w} | {4 * n_big:,} | "
                     f"{bp * 1e3:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models and few steps (smoke run)")
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    ap.add_argument("--parts", default="bytes,throughput,collectives", help="which parts to run (comma-separated)")
    ap.add_argument("--model", nargs="+", metavar="JSON", help="print the paper model from result files and stop")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return 0
    if args.model:
        print(paper_model([r for f in args.model for r in json.loads(Path(f).read_text())["rows"]]))
        return 0
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    quick, parts = args.quick, set(args.parts.split(","))
    # bytes per step: every model, both modes, K = 1 and 8, two processes (counted; few steps suffice)
    for model in (["mlp", "localmixer"] if quick else list(MODELS)) if "bytes" in parts else []:
        big = model == "mlp-100m"
        spec = {"model": model, "modes": ["data", "tangent"], "ks": [1, 8], "batch": 4 if big else 16,
                "tangents": "rank1", "warmup": 1, "steps": 2 if (big or quick) else 5, "check_every": 0}
        rows += launch(spec, 2, 600)
        print(f"bytes: {model} done ({time.perf_counter() - began:.0f} s)", flush=True)
    # throughput: the default task's MLP, batch 128, K = 4 rademacher, 1 process against 2 (data, tangent)
    steps = 20 if quick else 300
    spec = {"model": "mlp", "ks": [4], "batch": 128, "tangents": "rademacher", "warmup": 20, "steps": steps,
            "check_every": 100}
    if "throughput" in parts:
        rows += launch({**spec, "modes": ["data"]}, 1, 600)
        rows += launch({**spec, "modes": ["data", "tangent"]}, 2, 600)
        print(f"throughput done ({time.perf_counter() - began:.0f} s)", flush=True)
    # the exchange alone: seed sharing's all_reduce of 8·(K+1) bytes against backprop's 4·n, gloo, 2 processes
    sizes = [["seed sharing K=1", 16, 200], ["seed sharing K=8", 72, 200]]
    for model in (["mlp", "localmixer"] if quick else list(MODELS)):
        name, shape, classes, options = MODELS[model]
        n = num_parameters(build_model(name, shape, classes, **options))
        sizes.append([f"backprop {model}", 4 * n, 3 if n > 10**7 else 20])
    if "collectives" in parts:
        rows += launch({"kind": "collectives", "sizes": sizes}, 2, 600)
        print(f"collectives done ({time.perf_counter() - began:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "benchmarks/distributed.py " + " ".join(argv), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": time.perf_counter() - began}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out)
    for r in rows:
        if "collective" in r:
            print(f"all_reduce {r['label']:<22} {r['bytes']:>12,} bytes  median {r['median_s'] * 1e3:.3f} ms")
            continue
        ph = " ".join(f"{p}={v * 1e3:.2f}ms" for p, v in r["phase_s_per_step"].items())
        print(f"{r['model']:<10} n={r['n']:>11,} {r['mode']:<7} K={r['K']:<2} W={r['world']} "
              f"bytes/step={r['bytes_per_step']:>7.1f} (target {r['target']}, backprop {r['backprop_bytes']:,}) "
              f"step={r['s_per_step'] * 1e3:.2f}ms [{ph}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
