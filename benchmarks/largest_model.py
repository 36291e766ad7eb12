"""The largest causal LM one machine trains, per method: peak memory and step time of OPT-style models of growing size.

MeZO (Malladi et al., NeurIPS 2023) trains OPT-30B on one 80 GB GPU where backprop with Adam fits 2.7B: a
zeroth-order step needs the memory of inference. This script measures the same claim on the machine it runs
on. For each size of :data:`SIZES` (OPT-style: learned positions, LayerNorm, ReLU feed-forward, tied
embeddings, vocabulary 50,272; random weights from :func:`fwdgrad.models.hf.causal_lm_config`) and each
method of :data:`METHODS`, a **fresh process**

1. caps its own memory (``RLIMIT_AS``: the address space it has at start plus ``--memory-cap`` GB, so a
   method that needs more fails with an allocation error instead of taking the machine down; on CUDA
   ``torch.cuda.set_per_process_memory_fraction``);
2. builds the model in the method's dtype (bfloat16 weights are built in bfloat16, never through a float32
   copy), times ``--forwards`` no-grad forward passes of the next-token loss on one batch of ``--batch``
   random sequences of ``--seq`` tokens, then runs ``--steps`` training steps (after one warm-up step; the
   losses the steps return are kept);
3. reports its peak memory (CPU: the kernel's resident high-water mark ``VmHWM`` of the whole process —
   weights, optimizer state, activations, everything; CUDA: ``torch.cuda.max_memory_allocated``), the median
   step time as a ratio to the median forward, and the loss before and after.

A method stops growing after its first size that fails or peaks above the cap; sizes whose estimated
memory (bytes per parameter of :data:`BYTES_PER_PARAMETER`) already exceeds the cap are not started.

============  ===================================================================  =================
method        step                                                                 held per parameter
============  ===================================================================  =================
adam-fp32     ``loss.backward()`` + ``torch.optim.Adam`` (how HF trains by default)  16 B
sgd-fp32      ``loss.backward()`` + ``torch.optim.SGD``                              8 B
fgw-fp32      ``fg-w`` fused ``sgd_step`` (one JVP pass, math attention)             4 B + tangents
zo-fp32       ``zo`` fused ``sgd_step`` (MeZO)                                       4 B
zo-bf16       ``zo`` fused ``sgd_step``, weights in bfloat16                        2 B
zo-lora-bf16  ``zo`` fused on LoRA adapters (r = 8, q/v projections), bf16 base      2 B + adapters
============  ===================================================================  =================

Writes ``results.json``, ``table.md`` and ``memory.png`` (parameters vs peak memory per method) to
``--out`` (default ``runs/largest_model``; the committed table is in ``benchmarks/results/largest_model``).

Examples::

    python benchmarks/largest_model.py --quick                      # smoke test: two tiny sizes, seconds
    python benchmarks/largest_model.py --memory-cap 10 --out benchmarks/results/largest_model
    python benchmarks/largest_model.py --device cuda --memory-cap 80   # coded, not run here (no GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fwdgrad
from fwdgrad._io import write_atomic
from fwdgrad._procmem import status_kib
from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.estimators import estimator_options
from fwdgrad.models.hf import causal_lm_config, load_causal_lm, next_token_loss

GB = 2**30
#: name -> (hidden, layers, heads); OPT-style with OPT's vocabulary. The names are the parameter counts.
SIZES = {
    "11m": (192, 4, 3), "30m": (384, 6, 6), "51m": (512, 8, 8), "125m": (768, 12, 12), "354m": (1024, 24, 16),
    "757m": (1536, 24, 16), "1.3b": (2048, 24, 32), "2.7b": (2560, 32, 32), "3.8b": (3072, 32, 32),
    "6.7b": (4096, 32, 32), "13b": (5120, 40, 40),
}
VOCAB = 50272
#: ``--quick``: two tiny sizes with a small vocabulary (a smoke test of every code path, seconds).
QUICK_SIZES = {"tiny-a": (32, 2, 4), "tiny-b": (64, 2, 4)}
QUICK_VOCAB = 128
METHODS = ["adam-fp32", "sgd-fp32", "fgw-fp32", "zo-fp32", "zo-bf16", "zo-lora-bf16"]
#: What a method holds per parameter between steps (weights, .grad, optimizer state): the estimate that
#: decides whether a size is started at all (activations and tangents come on top).
BYTES_PER_PARAMETER = {"adam-fp32": 16, "sgd-fp32": 8, "fgw-fp32": 4, "zo-fp32": 4, "zo-bf16": 2,
                       "zo-lora-bf16": 2}
#: Learning rates: small enough that a few steps on random weights stay finite (not tuned: the script
#: measures memory and time; the loss is reported only to show that the parameters moved sanely).
LR = {"adam-fp32": 1e-5, "sgd-fp32": 1e-4, "fgw-fp32": 1e-6, "zo-fp32": 1e-6, "zo-bf16": 1e-6,
      "zo-lora-bf16": 1e-4}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def config_of(size: str, quick: bool, seq: int):  # -> transformers.OPTConfig
    hidden, layers, heads = (QUICK_SIZES if quick else SIZES)[size]
    return causal_lm_config("opt", hidden=hidden, layers=layers, heads=heads, vocab=QUICK_VOCAB if quick else VOCAB,
                            positions=max(seq, 64))


def count_parameters(config) -> int:
    """The model's parameter count, from a build on the meta device (no memory, no initialisation)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# -- the worker: one (size, method) in its own process ----------------------------------------------------


def cap_memory(cap_gb: float, device: str) -> None:
    """Make an allocation beyond ``cap_gb`` GB of new memory fail (CPU: ``RLIMIT_AS``; CUDA: a memory fraction)."""
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GB / total))
        return
    size_kib = status_kib("VmSize")
    if size_kib is None:
        return
    limit = size_kib * 1024 + int(cap_gb * GB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return (status_kib("VmHWM") or 0) * 1024


def build(method: str, config, device: str) -> torch.nn.Module:
    dtype = torch.bfloat16 if method.endswith("bf16") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = load_causal_lm(config, dtype=dtype)
    if method == "zo-lora-bf16":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()
    return model


def make_step(method: str, model: torch.nn.Module, loss_fn):
    """``step() -> loss`` of ``method`` on ``model``."""
    lr = LR[method]
    if method in ("adam-fp32", "sgd-fp32"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr) if method == "adam-fp32" else torch.optim.SGD(params, lr=lr)

        def backprop() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            return loss.detach()

        return backprop
    if method == "fgw-fp32":
        est = fwdgrad.estimator("fg-w", seed=1)

        def forward_gradient() -> torch.Tensor:
            with forward_mode_attention(model, quiet=True):
                return est.sgd_step(model, loss_fn, lr=lr)

        return forward_gradient
    est = fwdgrad.estimator("zo", seed=1)  # the estimator's default eps for the weights' dtype
    return lambda: est.sgd_step(model, loss_fn, lr=lr)


def _median_seconds(fn, reps: int, device: str) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(spec: dict) -> dict:
    """One (size, method): build, time forwards and steps, read the peak. The result is JSON data."""
    device = spec["device"]
    config = config_of(spec["size"], spec["quick"], spec["seq"])
    model = build(spec["method"], config, device)
    weights = (status_kib("VmRSS") or 0) * 1024 if device == "cpu" else torch.cuda.memory_allocated()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (spec["batch"], spec["seq"]), generator=g).to(device)
    loss_fn = lambda m: next_token_loss(m, ids)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return loss_fn(model)

    start: list[float] = []
    losses: list[float] = []
    # the first call of each is a warm-up (first-use costs are in the peak, not in the time) unless
    # --forwards / --steps is 0: then the first call itself is timed (big sizes, where those costs are small)
    first_forward = _median_seconds(lambda: start.append(float(forward())), 1, device)
    forward_s = _median_seconds(forward, spec["forwards"], device) if spec["forwards"] else first_forward
    step = make_step(spec["method"], model, loss_fn)
    first_step = _median_seconds(lambda: losses.append(float(step())), 1, device)
    step_s = first_step
    if spec["steps"]:
        step_s = _median_seconds(lambda: losses.append(float(step())), spec["steps"], device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zo = estimator_options("zo") or {}
    code = {"zo_eps": zo.get("eps"), "zo_restore": zo.get("restore")} if spec["method"].startswith("zo") else {}
    return {**code, "size": spec["size"], "method": spec["method"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": trainable, "peak_bytes": peak_bytes(device), "after_build_bytes": weights,
            "forward_s": forward_s, "step_s": step_s, "step_over_forward": step_s / forward_s,
            "loss_start": start[0], "step_losses": losses,
            "timed": {"forwards": spec["forwards"], "steps": spec["steps"]}, "status": "ok"}


def run_worker(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    cap_memory(spec["cap_gb"], spec["device"])
    try:
        result = measure(spec)
    except (MemoryError, RuntimeError) as e:  # an allocation beyond the cap
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        result = {"size": spec["size"], "method": spec["method"], "status": f"failed: {first[:160]}",
                  "peak_bytes": peak_bytes(spec["device"])}
    print("RESULT " + json.dumps(result), flush=True)


def in_subprocess(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2",
           "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"size": spec["size"], "method": spec["method"], "status": f"failed: over {timeout:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"size": spec["size"], "method": spec["method"], "status": f"failed: exit {proc.returncode}: {tail[:160]}"}


# -- the driver ------------------------------------------------------------------------------------------


def run_all(args) -> dict:
    sizes = list(QUICK_SIZES if args.quick else SIZES)
    if args.sizes:
        sizes = [s for s in sizes if s in args.sizes.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"largest_model.py: unknown method {unknown[0]!r}; choose from {METHODS}")
    res: dict = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": [],
                 "load_avg_start": os.getloadavg()[0], "torch": torch.__version__}
    previous = Path(args.out) / "results.json"
    if args.resume and previous.exists():
        res["runs"] = json.loads(previous.read_text())["runs"]
    done = {(r["size"], r["method"]) for r in res["runs"]}
    stopped = {r["method"] for r in res["runs"] if r["status"] != "ok"}
    for size in sizes:
        n = count_parameters(config_of(size, args.quick, args.seq))
        for method in methods:
            if method in stopped or (size, method) in done:
                continue
            estimate = n * BYTES_PER_PARAMETER[method]
            if estimate > args.memory_cap * GB:
                r = {"size": size, "method": method, "parameters": n,
                     "status": f"not started: estimate {estimate / GB:.1f} GB > cap"}
            else:
                spec = {"size": size, "method": method, "quick": args.quick, "seq": args.seq, "batch": args.batch,
                        "steps": args.steps, "forwards": args.forwards, "threads": args.threads,
                        "device": args.device, "cap_gb": args.memory_cap}
                r = in_subprocess(spec, args.timeout)
                r.setdefault("parameters", n)
                if r["status"] == "ok" and r["peak_bytes"] > args.memory_cap * GB:
                    r["status"] = "over cap"
            r["load_avg"] = os.getloadavg()[0]
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
            if r["status"] != "ok":
                stopped.add(method)
            write_results(Path(args.out), res)
    res["largest"] = largest(res)
    write_results(Path(args.out), res)
    return res


def largest(res: dict) -> dict:
    """Per method, the parameter count of the largest size that trained under the cap (``0``: none did)."""
    best = dict.fromkeys(res["args"]["methods"].split(","), 0)
    for r in res["runs"]:
        if r["status"] == "ok":
            best[r["method"]] = max(best[r["method"]], r["parameters"])
    return best


def table(res: dict) -> str:
    a = res["args"]
    where = "CUDA allocator peak" if a["device"] == "cuda" else "peak resident memory (VmHWM) of the process"
    methods = a["methods"].split(",")
    lines = [
        f"Memory cap {a['memory_cap']:g} GB, device {a['device']}, batch {a['batch']} × {a['seq']} tokens, "
        f"{a['threads']} thread(s), torch {res['torch']}; load average at start {res['load_avg_start']:.1f} (a "
        f"shared machine: the times are noisy). Each cell: {where} in GB (2³⁰ bytes), then the median step time as a "
        "multiple of one no-grad forward on the same batch (timed after one warm-up step and forward; sizes "
        "marked † time the first step and the first forward themselves, `--steps 0 --forwards 0`). Cells marked "
        "‡ were measured with `zo` before the half-precision fix (eps 1e-3 in every dtype, `regenerate` "
        "restore): their memory is valid, their bfloat16 estimates were not (eps lost to rounding).",
        "",
        "| size | parameters | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    sizes = list(dict.fromkeys(r["size"] for r in res["runs"]))
    for size in sizes:
        runs = {r["method"]: r for r in res["runs"] if r["size"] == size}
        n = next(r["parameters"] for r in runs.values())
        cells = [_cell(runs.get(m)) for m in methods]
        first = any(r.get("timed", {}).get("steps", 1) == 0 for r in runs.values())
        lines.append(f"| {size}{' †' if first else ''} | {n / 1e6:,.1f} M | " + " | ".join(cells) + " |")
    best = res.get("largest") or largest(res)
    base = best.get("adam-fp32", 0)
    lines += ["", "Largest size trained under the cap:", ""]
    for m in methods:
        times = f" ({best[m] / base:.1f}× Adam float32's)" if base and m != "adam-fp32" and best[m] else ""
        lines.append(f"- {m}: {best[m] / 1e6:,.1f} M parameters{times}")
    return "\n".join(lines) + "\n"


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["status"] in ("ok", "over cap"):
        mark = "" if r["status"] == "ok" else " **over cap**"
        if r["method"].startswith("zo") and "zo_restore" not in r:
            mark += " ‡"
        return f"{r['peak_bytes'] / GB:.2f} GB, {r['step_over_forward']:.1f}×{mark}"
    if "can't allocate memory" in r["status"]:  # RLIMIT_AS refused an allocation: the method needs more
        return f"over cap: allocation refused at {r['peak_bytes'] / GB:.2f} GB"
    return r["status"].replace("|", "/")


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in res["args"]["methods"].split(","):
        pts = [(r["parameters"], r["peak_bytes"] / GB) for r in res["runs"]
               if r["method"] == m and r["status"] in ("ok", "over cap")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.axhline(res["args"]["memory_cap"], color="k", lw=0.8, ls="--", label="memory cap")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak memory (GB)")
    ax.set_title(f"OPT-style causal LMs, {res['args']['device']}, batch {res['args']['batch']}×{res['args']['seq']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(res, indent=1))
    write_atomic(out / "table.md", table(res))
    if res.get("largest") is not None:
        plot(res, out / "memory.png")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-cap", type=float, default=16.0, help="GB a (size, method) may use (default 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: coded like the CPU path but not run by the authors (no GPU here)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sizes", default="", help="comma-separated names of SIZES (default: all)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=1,
                   help="timed training steps after one warm-up step (0: time the first step itself)")
    p.add_argument("--forwards", type=int, default=1,
                   help="timed no-grad forwards after one warm-up forward (0: time the first one)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (size, method) runs already in <out>/results.json and run only the others")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds per (size, method) before it counts as failed")
    p.add_argument("--quick", action="store_true", help="two tiny sizes (vocabulary 128): a smoke test")
    p.add_argument("--out", default="runs/largest_model")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rewrite table.md and memory.png from <out>/results.json")
    args = p.parse_args(argv)
    if args.report_only:
        res = json.loads((Path(args.out) / "results.json").read_text())
        res["largest"] = largest(res)
        write_results(Path(args.out), res)
        print(table(res))
        return res
    if args.worker:
        run_worker(json.loads(args.worker))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("largest_model.py: --device cuda but CUDA is not available")
    if not (args.memory_cap > 0 and math.isfinite(args.memory_cap)):
        raise SystemExit(f"largest_model.py: --memory-cap must be a positive number of GB, got {args.memory_cap}")
    res = run_all(args)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
