"""ZO-Bench on a CPU budget: fine-tune a small pretrained ViT with FO, forward-gradient and zeroth-order methods.

Zhang et al. (2024), "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark",
compare FO-SGD, FO-Adam, Forward-Grad, ZO-SGD, ZO-SGD-MMT, ZO-SGD-Sign, ZO-SGD-Cons and ZO-Adam on LLMs.
Pretrained weights and GLUE cannot be downloaded here, so this script

1. pretrains a ViT-style classifier (7×7 patches, 16 tokens + [CLS], about 1 M parameters) with backprop and
   Adam on MNIST (``--pretrain-steps``), and saves it (``<out>/vit_mnist.pt``, reused when present);
2. fine-tunes a copy on Fashion-MNIST with each method under the same budget of forward passes
   (``--budget``; a loss evaluation counts one, a JVP pass one, a backward none) and the same wall-clock cap
   (``--cap`` seconds), whichever ends first, batch ``--batch``, constant learning rate;
3. measures, each in a fresh process, the peak extra memory (above what exists before the step: the model,
   the data, and whatever the method keeps between steps, reported apart as "held") and the median time of
   one step on one batch
   (``VmHWM − VmRSS`` after resetting the peak through ``/proc/self/clear_refs``, with
   ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave RSS), and the same for one
   ``torch.no_grad()`` forward: the ratios of the issue's targets;
4. writes ``<out>/results.json``, ``<out>/table.md`` and ``<out>/finetune.png``.

Methods (all registered estimators of fwdgrad, or backprop):

============  ============================================================  ==================
label         step                                                           forward passes
============  ============================================================  ==================
FO-SGD        ``loss.backward()`` + ``torch.optim.SGD``                      1
FO-Adam       ``loss.backward()`` + ``torch.optim.Adam``                     1
Forward-Grad  ``fg-w`` fused ``sgd_step`` (K = 1, math attention)            1 (a JVP pass)
ZO-SGD        ``zo`` fused ``sgd_step`` (MeZO)                              2
ZO-SGD-MMT    ``zo`` → ``.grad`` + SGD(momentum=0.9)                         2
ZO-SGD-Sign   ``zo-sign`` fused ``sgd_step``                                2
ZO-SGD-Cons   ``zo-cons`` fused ``sgd_step``                                5
ZO-Adam       ``zo`` → ``.grad`` + Adam                                      2
============  ============================================================  ==================

Example (what docs/zeroth-order.md reports; about 25 minutes on 1 thread of a shared 2-core machine)::

    python benchmarks/zo_finetune.py --data-dir ../shared/data --out benchmarks/results/zo_finetune
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.data import load_dataset
from fwdgrad.derivatives.attention import forward_mode_attention

METHODS = ["FO-SGD", "FO-Adam", "Forward-Grad", "ZO-SGD", "ZO-SGD-MMT", "ZO-SGD-Sign", "ZO-SGD-Cons", "ZO-Adam"]
FORWARDS = {"FO-SGD": 1, "FO-Adam": 1, "Forward-Grad": 1, "ZO-SGD": 2, "ZO-SGD-MMT": 2, "ZO-SGD-Sign": 2,
            "ZO-SGD-Cons": 5, "ZO-Adam": 2}
# Learning rates. Every parameter ("all"): FO from common practice (not swept); the zeroth-order methods and
# Forward-Grad are the choices of the sweep in docs/zeroth-order.md (`--sweep 1e-6,1e-5,1e-4,1e-3,1e-2`, then
# 0.1 for the two methods whose best was 1e-2; 200 forward passes per run, chosen on 5000 held-out training
# examples; <out>/sweep.md). Head only: not swept (for n ≈ 1.5 k the SPSA step can be a thousand times larger
# than for n ≈ 1 M; sign and Adam move each entry by about lr).
DEFAULT_LR = {
    "all": {"FO-SGD": 0.05, "FO-Adam": 1e-3, "Forward-Grad": 1e-3, "ZO-SGD": 1e-3, "ZO-SGD-MMT": 1e-4,
            "ZO-SGD-Sign": 1e-2, "ZO-SGD-Cons": 1e-2, "ZO-Adam": 1e-3},
    "head": {"FO-SGD": 0.1, "FO-Adam": 1e-3, "Forward-Grad": 1e-3, "ZO-SGD": 1e-3, "ZO-SGD-MMT": 1e-4,
             "ZO-SGD-Sign": 1e-3, "ZO-SGD-Cons": 1e-3, "ZO-Adam": 1e-3},
}
EPS = 1e-3
# Tensors of the trainable parameters' size that a method keeps between steps (.grad, momentum, Adam's two
# moments); the fused steps keep none. The step's extra memory is measured above them (they exist before it).
HELD = {"FO-SGD": 1, "FO-Adam": 3, "Forward-Grad": 0, "ZO-SGD": 0, "ZO-SGD-MMT": 2, "ZO-SGD-Sign": 0,
        "ZO-SGD-Cons": 0, "ZO-Adam": 3}


class ViT(nn.Module):
    """Patches of ``patch × patch`` pixels → linear embedding, a [CLS] token and learned positions, ``depth``
    pre-norm ``nn.TransformerEncoderLayer`` blocks (GELU, no dropout), LayerNorm, linear head on [CLS]."""

    def __init__(self, patch: int = 7, dim: int = 128, depth: int = 5, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)  # [B, 16, 49]
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``x, y``; NaN loss for a model with non-finite weights."""
    model.eval()
    right, total = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        right += int((logits.argmax(1) == y[i : i + batch]).sum())
        total += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    model.train()
    return right / len(y), total / len(y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    return evaluate(model, x, y, batch)[0]


def set_trainable(model: nn.Module, which: str) -> None:
    """``all``: every parameter; ``head``: the final LayerNorm and the linear head only (a linear probe)."""
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or name.startswith(("norm.", "head.")))


def make_step(label: str, model: nn.Module, lr: float, seed: int):
    """``step(x, y) -> loss``: one update of ``model``'s trainable parameters by method ``label``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if label in ("FO-SGD", "FO-Adam"):
        opt = (torch.optim.SGD if label == "FO-SGD" else torch.optim.Adam)(trainable, lr=lr)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step
    if label == "Forward-Grad":
        est = fwdgrad.estimator("fg-w", seed=seed)

        def step(x, y):
            with forward_mode_attention(model):
                return est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=lr)

        return step
    fused = {"ZO-SGD": "zo", "ZO-SGD-Sign": "zo-sign", "ZO-SGD-Cons": "zo-cons"}
    if label.startswith("ZO-SGD[") and label.endswith("]"):  # timing variants: ZO-SGD[rademacher], ZO-SGD[snapshot]
        variant = label[7:-1]
        options = {"restore": "snapshot"} if variant == "snapshot" else {"tangents": variant}
        est = fwdgrad.estimator("zo", eps=EPS, seed=seed, **options)
        return lambda x, y: est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=lr)
    if label in fused:
        est = fwdgrad.estimator(fused[label], eps=EPS, seed=seed)
        return lambda x, y: est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=lr)
    est = fwdgrad.estimator("zo", eps=EPS, seed=seed)
    if label == "ZO-SGD-MMT":
        opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(trainable, lr=lr)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = est(model, lambda m: F.cross_entropy(m(x), y))
        opt.step()
        return loss

    return step


def pretrain(args, out: Path) -> tuple[nn.Module, dict]:
    path = out / "vit_mnist.pt"
    torch.manual_seed(0)
    model = ViT()
    mnist = load_dataset("mnist", args.data_dir)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state"])
        return model, saved["info"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.pretrain_steps):
        idx = torch.randint(0, len(mnist.y_train), (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(mnist.x_train[idx]), mnist.y_train[idx]).backward()
        opt.step()
    info = {"steps": args.pretrain_steps, "batch": args.batch, "optimizer": "Adam lr=1e-3",
            "seconds": time.perf_counter() - start,
            "mnist_test_accuracy": accuracy(model, mnist.x_test, mnist.y_test),
            "parameters": sum(p.numel() for p in model.parameters())}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    torch.save({"state": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)
    return model, info


def finetune(args, base: nn.Module, data, label: str, lr: float | None = None, budget: int | None = None,
             cap: float | None = None) -> dict:
    """Fine-tune a copy of ``base`` on ``data.x_train`` with method ``label``; evaluate on ``data.x_test``
    (the test set for the table, the held-out part of the training set for the sweep). A step that raises
    :class:`fwdgrad.NonFiniteError` (or leaves non-finite weights) ends the run as ``diverged``."""
    model = copy.deepcopy(base)
    model.train()
    set_trainable(model, args.trainable)
    if lr is None:
        lr = args.lr.get(label, DEFAULT_LR[args.trainable][label])
    budget = args.budget if budget is None else budget
    cap = args.cap if cap is None else cap
    step = make_step(label, model, lr, seed=1)
    g = torch.Generator().manual_seed(2)  # the same batches for every method
    steps = budget // FORWARDS[label]
    pool = getattr(data, "train_index", None)  # the sweep trains on a subset of the training set
    curve, losses, start, done, stopped = [], [], time.perf_counter(), 0, "budget"
    for i in range(steps):
        if time.perf_counter() - start > cap:
            stopped = "wall-clock cap"
            break
        idx = torch.randint(0, len(data.y_train if pool is None else pool), (args.batch,), generator=g)
        if pool is not None:
            idx = pool[idx]
        try:
            loss = float(step(data.x_train[idx], data.y_train[idx]))
        except fwdgrad.NonFiniteError:
            stopped = "diverged"
            break
        if not math.isfinite(loss):
            stopped = "diverged"
            break
        losses.append(loss)
        done = i + 1
        if args.log_every and done % args.log_every == 0:
            curve.append((done * FORWARDS[label], time.perf_counter() - start,
                          statistics.fmean(losses[-args.log_every:])))
    seconds = time.perf_counter() - start
    if stopped != "diverged" and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        stopped = "diverged"
    acc, eval_loss = evaluate(model, data.x_test, data.y_test) if stopped != "diverged" else (math.nan, math.nan)
    return {"label": label, "lr": lr, "steps": done, "forward_passes": done * FORWARDS[label], "seconds": seconds,
            "stopped_by": stopped, "curve": curve,
            "final_train_loss": statistics.fmean(losses[-20:]) if losses else math.nan,
            "test_accuracy": acc, "test_loss": eval_loss}


# -- the learning-rate sweep on a held-out part of the training set ---------------------------------------


def holdout_split(data, holdout: int):
    """The training set split for the sweep: a fixed permutation (seed 3), the last ``holdout`` examples
    held out (``x_test, y_test``: what the sweep evaluates on), the others the pool it trains on
    (``train_index`` into ``x_train``). The test set is not touched."""
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(3))
    keep, held = perm[:-holdout], perm[-holdout:]
    return SimpleNamespace(x_train=data.x_train, y_train=data.y_train, train_index=keep,
                           x_test=data.x_train[held], y_test=data.y_train[held])


#: A sweep run whose held-out loss ends above this multiple of the start's counts as diverged (its weights
#: exploded even if no NaN appeared), and is not chosen.
BLOWUP = 10.0


def exploded(run: dict, start_loss: float) -> bool:
    return run["stopped_by"] == "diverged" or not run["test_loss"] <= BLOWUP * start_loss


def choose(runs: list[dict], start_loss: float) -> dict:
    """The sweep's choice for one method: the highest held-out accuracy, ties to the lower held-out loss;
    diverged or exploded runs (:func:`exploded`) are not chosen unless every run is."""
    def key(r: dict) -> tuple[bool, float, float]:
        return (exploded(r, start_loss), -r["test_accuracy"], r["test_loss"])

    return min(runs, key=key)


def sweep(args, base: nn.Module, fashion, out: Path) -> dict:
    """For each method of ``--methods`` and each learning rate of ``--sweep``: fine-tune for ``--sweep-budget``
    forward passes (cap ``--sweep-cap`` s) on the training set minus ``--holdout`` examples, and evaluate on
    those. Results are merged into ``<out>/sweep.json`` run by run (so a sweep can be resumed or extended),
    and ``<out>/sweep.md`` lists every run and the choice per method."""
    path = out / f"{args.sweep_file}.json"
    res = json.loads(path.read_text()) if path.exists() else {"runs": []}
    split = holdout_split(fashion, args.holdout)
    settings = {"budget": args.sweep_budget, "cap": args.sweep_cap, "holdout": args.holdout, "batch": args.batch,
                "threads": args.threads, "trainable": args.trainable}
    if res.get("settings", settings) != settings:
        raise SystemExit(f"{path} was swept with {res['settings']}, not {settings}: use another --out")
    res["settings"] = settings
    if "start" not in res:
        acc, loss = evaluate(base, split.x_test, split.y_test)
        res["start"] = {"accuracy": acc, "loss": loss}
    grid = [float(v) for v in args.sweep.split(",")]
    for label in args.methods.split(","):
        for lr in grid:
            if any(r["label"] == label and r["lr"] == lr for r in res["runs"]):
                continue
            run = finetune(args, base, split, label, lr=lr, budget=args.sweep_budget, cap=args.sweep_cap)
            run.pop("curve")
            run["uptime"] = os.getloadavg()[0]
            print("sweep", run, flush=True)
            res["runs"].append(run)
            _write_sweep(out, args.sweep_file, res)
    _write_sweep(out, args.sweep_file, res)
    return res


def _write_sweep(out: Path, name: str, res: dict) -> None:
    res["chosen"] = {m: choose([r for r in res["runs"] if r["label"] == m], res["start"]["loss"])["lr"]
                     for m in dict.fromkeys(r["label"] for r in res["runs"])}
    write_atomic(out / f"{name}.json", json.dumps(res, indent=1))
    write_atomic(out / f"{name}.md", sweep_table(res))


def sweep_table(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"Learning-rate sweep: {s['budget']} forward passes (cap {s['cap']:g} s) per run, batch {s['batch']}, "
        f"{s['threads']} thread(s), trainable: {s['trainable']}; trained on Fashion-MNIST's training set minus "
        f"{s['holdout']} held-out examples, evaluated on those (not the test set). Start: "
        f"{100 * res['start']['accuracy']:.2f} % held-out accuracy, loss {res['start']['loss']:.3f}. "
        "Chosen (**bold**): highest held-out accuracy, ties to the lower loss, among the runs that neither "
        f"diverged nor ended with a held-out loss above {BLOWUP:g}× the start's (marked *exploded*).",
        "",
        "| method | lr | steps | stopped by | held-out acc % | held-out loss | last train loss | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(res["runs"], key=lambda r: (METHODS.index(r["label"]) if r["label"] in METHODS else 99, r["lr"])):
        mark = "**" if res["chosen"].get(r["label"]) == r["lr"] else ""
        stopped = r["stopped_by"] + (" (exploded)" if r["stopped_by"] != "diverged" and exploded(
            r, res["start"]["loss"]) else "")
        lines.append(
            f"| {r['label']} | {mark}{r['lr']:g}{mark} | {r['steps']} | {stopped} | "
            f"{100 * r['test_accuracy']:.2f} | {r['test_loss']:.4g} | {r['final_train_loss']:.4g} | "
            f"{r.get('uptime', math.nan):.2f} |"
        )
    return "\n".join(lines) + "\n"


# -- memory and time of one step, each in a fresh process -------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _measure(label: str, batch: int, steps: int, trainable: str) -> dict:
    torch.manual_seed(0)
    model = ViT()
    set_trainable(model, trainable)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if label == "forward":
        def step(x, y):
            with torch.no_grad():
                return model(x)
    else:
        step = make_step(label, model, DEFAULT_LR[trainable][label], seed=1)
    step(x, y)  # first-use costs (kernels, forward-AD rules) are not a step's memory
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t)
    return {"label": label, "extra_mb": (_status_kib("VmHWM") - before) / 1024, "ms": 1e3 * statistics.median(times)}


def measure_in_subprocess(label: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    spec = json.dumps({"label": label, "batch": args.batch, "steps": args.measure_steps, "threads": args.threads,
                       "trainable": args.trainable})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env,
                          check=False, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker for {label} failed:\n{proc.stderr[-2000:]}")


def _no_grad_forward(model: nn.Module):
    def step(x, y):
        with torch.no_grad():
            return model(x)

    return step


def interleaved_times(args) -> dict:
    """Median step time of every method over ``args.interleaved`` rounds, the methods taking turns in one
    process on one batch (so a busy machine slows them alike), as ratios to a no-grad forward."""
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    steps = {}
    for label in ["forward", *args.methods.split(",")]:
        model = ViT()
        set_trainable(model, args.trainable)
        if label == "forward":
            steps[label] = _no_grad_forward(model)
        else:
            lr = DEFAULT_LR[args.trainable].get(label, DEFAULT_LR[args.trainable]["ZO-SGD"])
            steps[label] = make_step(label, model, lr, seed=1)
        steps[label](x, y)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.interleaved):
        for label, step in steps.items():
            t, c = time.perf_counter(), time.thread_time()
            step(x, y)
            cpu[label].append(time.thread_time() - c)
            times[label].append(time.perf_counter() - t)
    fwd, fwd_cpu = statistics.median(times["forward"]), statistics.median(cpu["forward"])
    # wall-clock time, and this thread's CPU time (time.thread_time: what the step itself computed, less
    # sensitive to other processes on a shared machine; with 1 torch thread every op runs on this thread)
    return {k: {"ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / fwd,
                "cpu_ms": 1e3 * statistics.median(cpu[k]), "cpu_ratio": statistics.median(cpu[k]) / fwd_cpu,
                "load": os.getloadavg()[0]}
            for k, v in times.items()}


def report(out: Path, res: dict) -> None:
    fwd = res["memory"]["forward"]
    lines = [
        f"Pretrained on MNIST: {res['pretrain']['steps']} Adam steps, batch {res['pretrain']['batch']}, "
        f"MNIST test accuracy {100 * res['pretrain']['mnist_test_accuracy']:.2f} %; "
        f"{res['pretrain']['parameters']:,} parameters.",
        f"Fine-tuned on Fashion-MNIST: budget {res['args']['budget']} forward passes, cap {res['args']['cap']} s, "
        f"batch {res['args']['batch']}, {res['args']['threads']} thread(s), trainable: {res['args']['trainable']}. "
        "Start (MNIST weights): "
        f"{100 * res['start_accuracy']:.2f} % Fashion-MNIST test accuracy.",
        f"One no-grad forward (batch {res['args']['batch']}): {fwd['ms']:.1f} ms, {fwd['extra_mb']:.1f} MB extra.",
        "",
        "| method | lr | steps | forward passes | stopped by | test acc % | step ms | step / forward time "
        "| step extra MB | step extra / forward | held between steps MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_mb = res["trainable_parameters"] * 4 / 2**20
    for r in res["runs"]:
        m = res["memory"][r["label"]]
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['steps']} | {r['forward_passes']} | {r['stopped_by']} | "
            f"{100 * r['test_accuracy']:.2f} | {m['ms']:.1f} | {m['ms'] / fwd['ms']:.2f} | {m['extra_mb']:.1f} | "
            f"{m['extra_mb'] / fwd['extra_mb']:.2f} | {HELD[r['label']] * n_mb:.1f} |"
        )
    write_atomic(out / "table.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in res["runs"]:
        if r["curve"]:
            fp, _, loss = zip(*r["curve"])
            a.plot(fp, loss, label=r["label"])
    a.set_xlabel("forward passes")
    a.set_ylabel("training loss (Fashion-MNIST)")
    a.legend(fontsize=8)
    labels = [r["label"] for r in res["runs"]]
    step = [res["memory"][k]["extra_mb"] / fwd["extra_mb"] for k in labels]
    held = [HELD[k] * n_mb / fwd["extra_mb"] for k in labels]
    b.bar(labels, step, label="peak during the step")
    b.bar(labels, held, bottom=step, label="held between steps (.grad, optimizer state)")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_ylabel("memory / extra memory of a no-grad forward")
    b.legend(fontsize=8)
    b.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    tmp = out / "finetune.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out / "finetune.png")


def _count_trainable(which: str) -> int:
    model = ViT()
    set_trainable(model, which)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/zo_finetune")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--budget", type=int, default=1000, help="forward passes per method")
    p.add_argument("--cap", type=float, default=100.0, help="wall-clock seconds per method")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--trainable", choices=["all", "head"], default="all", help="fine-tune every parameter or the head")
    p.add_argument("--lr", action="append", default=[], help="METHOD=LR, repeatable")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--measure-steps", type=int, default=5)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rewrite table and plot from <out>/results.json")
    p.add_argument("--interleaved", type=int, default=0,
                   help="only time the methods taking turns in one process, this many rounds; print JSON")
    p.add_argument("--memory-only", action="store_true",
                   help="only measure each method's step memory and time (a fresh process each); print JSON")
    p.add_argument("--sweep", default=None, metavar="LR,LR,...",
                   help="only run the learning-rate sweep of --methods over this grid (held-out split, <out>/sweep.md)")
    p.add_argument("--sweep-budget", type=int, default=200, help="forward passes per sweep run")
    p.add_argument("--sweep-cap", type=float, default=120.0, help="wall-clock seconds per sweep run")
    p.add_argument("--holdout", type=int, default=5000, help="training examples held out for the sweep")
    p.add_argument("--lr-from-sweep", action="store_true",
                   help="take each method's lr from <out>/<sweep-file>.json's choice (--lr still overrides)")
    p.add_argument("--sweep-file", default="sweep",
                   help="the sweep's results are <out>/NAME.json and NAME.md (one name per sweep budget)")
    args = p.parse_args(argv)
    if args.interleaved:
        torch.set_num_threads(args.threads)
        print(json.dumps(interleaved_times(args), indent=1))
        return
    if args.report_only:
        res = json.loads((Path(args.out) / "results.json").read_text())
        res.setdefault("trainable_parameters", _count_trainable(res["args"].get("trainable", "all")))
        report(Path(args.out), res)
        print((Path(args.out) / "table.md").read_text())
        return
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        result = _measure(spec["label"], spec["batch"], spec["steps"], spec["trainable"])
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.memory_only:
        memory = {label: measure_in_subprocess(label, args) for label in ["forward", *args.methods.split(",")]}
        for m in memory.values():
            m["extra_over_forward"] = m["extra_mb"] / memory["forward"]["extra_mb"]
        print(json.dumps(memory, indent=1))
        return
    torch.set_num_threads(args.threads)
    args.lr = {k: float(v) for k, v in (s.split("=") for s in args.lr)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        base, info = pretrain(args, out)
        print("pretrain", info, flush=True)
        print(sweep_table(sweep(args, base, load_dataset("fashion-mnist", args.data_dir), out)))
        return
    if args.lr_from_sweep:
        args.lr = {**json.loads((out / f"{args.sweep_file}.json").read_text())["chosen"], **args.lr}
    methods = args.methods.split(",")
    res: dict = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": [], "memory": {}}
    res["memory"]["forward"] = measure_in_subprocess("forward", args)
    for label in methods:
        res["memory"][label] = measure_in_subprocess(label, args)
        print("memory", res["memory"][label], flush=True)
    res["trainable_parameters"] = _count_trainable(args.trainable)
    base, res["pretrain"] = pretrain(args, out)
    print("pretrain", res["pretrain"], flush=True)
    fashion = load_dataset("fashion-mnist", args.data_dir)
    res["start_accuracy"] = accuracy(base, fashion.x_test, fashion.y_test)
    for label in methods:
        run = finetune(args, base, fashion, label)
        print({k: v for k, v in run.items() if k != "curve"}, flush=True)
        res["runs"].append(run)
        write_atomic(out / "results.json", json.dumps(res, indent=1))
    report(out, res)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
