"""Where the time of a fused ZO-SGD step goes, on the ViT of ``zo_finetune.py`` (1 thread).

A ``zo`` fused step (K = 1, two-point, ``restore="regenerate"``) is two no-grad forwards plus three passes over
the parameters, each of which draws every tensor's Gaussian direction again from its seed and adds a multiple
of it (``+εz``, ``−2εz``, then the update with the last ``+εz`` folded in). This script times, the pieces taking
turns in one process (so a busy machine slows them alike), median over ``--rounds``:

- ``forward``: one ``torch.no_grad()`` forward; ``step``: one fused ``zo`` step (Gaussian, then Rademacher);
- ``pass``: one redraw+add pass over the parameters, drawing into one reused buffer
  (``fwdgrad.directions.draw_direction(..., out=)``, what the estimator does) or into a fresh tensor per
  tensor (before);
- ``normal_ 1 buffer``: one ``normal_`` over a buffer with as many entries as the model: the cost of the
  Gaussian numbers themselves; ``uniform_`` the same for the uniforms it is made from (the Mersenne
  twister's part); ``pass of tiny tensors``: the same loop over as many 16-entry tensors: the per-tensor
  overhead of a pass.

Both wall-clock and this thread's CPU time are printed (``time.thread_time``; with 1 torch thread every op
runs on this thread), each also as a ratio to the forward.

Example::

    python benchmarks/zo_step_profile.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.directions import draw_direction, scratch_size, tensor_seeds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zo_finetune import ViT


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ViT()
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    params = [q for q in model.parameters()]
    n = sum(q.numel() for q in params)
    seeds = tensor_seeds(len(params), torch.Generator().manual_seed(0))
    buf = torch.empty(max(scratch_size(q) for q in params))
    tiny = [torch.zeros(16) for _ in params]
    tiny_buf = torch.empty(16)
    big = torch.empty(n)
    gen = torch.Generator().manual_seed(1)
    gauss = fwdgrad.estimator("zo", eps=1e-3, seed=1)
    rad = fwdgrad.estimator("zo", eps=1e-3, seed=1, tangents="rademacher")

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    def forward():
        with torch.no_grad():
            model(x)

    def pass_scratch(tensors=params, out=buf):
        with torch.no_grad():
            for q, s in zip(tensors, seeds):
                q.add_(draw_direction("gaussian", q, s, 0, out=out), alpha=0.0)

    def pass_fresh():
        with torch.no_grad():
            for q, s in zip(params, seeds):
                q.add_(draw_direction("gaussian", q, s, 0), alpha=0.0)

    pieces = {
        "forward": forward,
        "step (gaussian)": lambda: gauss.sgd_step(model, loss_fn, lr=0.0),
        "step (rademacher)": lambda: rad.sgd_step(model, loss_fn, lr=0.0),
        "pass, reused buffer": pass_scratch,
        "pass, fresh tensors": pass_fresh,
        f"normal_ 1 buffer ({n:,})": lambda: big.normal_(generator=gen),
        f"uniform_ 1 buffer ({n:,})": lambda: big.uniform_(generator=gen),
        f"pass of {len(params)} tiny tensors": lambda: pass_scratch(tiny, tiny_buf),
    }
    for f in pieces.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in pieces}
    cpu: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(args.rounds):
        for k, f in pieces.items():
            t, c = time.perf_counter(), time.thread_time()
            f()
            cpu[k].append(time.thread_time() - c)
            wall[k].append(time.perf_counter() - t)
    fw, fc = statistics.median(wall["forward"]), statistics.median(cpu["forward"])
    print(f"ViT, {len(params)} tensors, {n:,} parameters, batch {args.batch}, {args.threads} thread(s), "
          f"{args.rounds} rounds, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| piece | wall ms | / forward | CPU ms | / forward |\n|---|---|---|---|---|")
    for k in pieces:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {k} | {1e3 * w:.2f} | {w / fw:.3f} | {1e3 * c:.2f} | {c / fc:.3f} |")


if __name__ == "__main__":
    main()
