"""Seed-sharing training of the default task (MNIST-1D, mlp) on several processes, with a replay log.

One process, or N started here, or under torchrun::

    PYTHONPATH=src python examples/distributed_mnist1d.py --out runs/dist1
    PYTHONPATH=src python examples/distributed_mnist1d.py --nproc 2 --parallel data --out runs/dist2
    torchrun --nproc-per-node 2 examples/distributed_mnist1d.py --parallel tangent --out runs/dist2t

Rank 0 writes OUT/init.pt, OUT/model.pt, OUT/replay.log and OUT/results.json (world size, mode, bytes
exchanged per step, test accuracy); ``fwdgrad replay OUT/replay.log --init OUT/init.pt --out M.pt`` rebuilds
OUT/model.pt bit for bit. This is the hook the training loop needs (docs/distributed.md, "Wiring").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fwdgrad.data import load_dataset
from fwdgrad.distributed import LocalComm, ReplayLog, SeedSharingSGD, init_from_env, shard, spawn_local
from fwdgrad.models import build_model


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=1, help="start this many processes on this machine")
    ap.add_argument("--parallel", choices=["data", "tangent"], default="data")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--directions", type=int, default=4, help="K per rank")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/distributed")
    args = ap.parse_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
        codes = spawn_local(args.nproc, [sys.executable, __file__, *rest], timeout_s=3600)
        return 0 if codes == [0] * args.nproc else 1
    torch.set_num_threads(1)
    comm = init_from_env() if "RANK" in os.environ else LocalComm()
    out = Path(args.out)
    data = load_dataset("mnist1d")
    torch.manual_seed(args.seed)
    model = build_model("mlp", tuple(data.x_train.shape[1:]), 10, width=256, depth=2)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "init.pt")
    opt = SeedSharingSGD(model, "fg-w", seed=args.seed, mode=args.parallel, comm=comm,
                         num_directions=args.directions, tangents="rademacher")
    opt.log = ReplayLog(out / "replay.log", opt) if comm.rank == 0 else None
    began = time.perf_counter()
    n = data.x_train.shape[0] - data.x_train.shape[0] % args.batch  # full batches only: equal shards
    for epoch in range(args.epochs):
        order = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(args.seed + epoch))[:n]
        for i in range(0, n, args.batch):
            x, y = data.x_train[order[i:i + args.batch]], data.y_train[order[i:i + args.batch]]
            if args.parallel == "data":
                x, y = shard(x, comm.rank, comm.world), shard(y, comm.rank, comm.world)
            opt.step(lambda m, x=x, y=y: F.cross_entropy(m(x), y), lr=args.lr, momentum=args.momentum)
    seconds = time.perf_counter() - began
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    if comm.rank == 0:
        opt.log.close()
        torch.save(model.state_dict(), out / "model.pt")
        results = {"world": comm.world, "mode": args.parallel, "bytes_per_step": opt.bytes_per_step,
                   "steps": opt.step_count, "seconds": seconds, "test_accuracy": acc,
                   "weights_digest": f"{opt.weights_digest():016x}", "args": vars(args)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
