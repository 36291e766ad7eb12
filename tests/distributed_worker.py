"""One rank of the distributed tests (tests/test_distributed.py), run as ``python distributed_worker.py
SCENARIO OUTDIR`` with RANK/WORLD_SIZE/MASTER_* set by :func:`fwdgrad.distributed.spawn_local`.

Also imported by the tests for the problem (:func:`problem`) and the single-process autograd reference
(:func:`reference`), so that both sides build exactly the same model and data."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

K, LR, WORLD_STEPS = 2, 0.05, 5


def problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny float64 MLP and a batch of 8 (divisible by 2 and 4)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, x, y


def reference(mode: str, world: int, steps: int, tangents: str = "gaussian", seed: int = 7) -> list[torch.Tensor]:
    """The parameters after ``steps`` plain SGD steps with the forward gradient of the *whole* batch, formed
    by torch.autograd: ``ĝ = (1/S) Σ_j ⟨∇L, v_j⟩ v_j`` over the step's directions (data: stream 0's K;
    tangent: streams 0..world-1, K each, rank-major)."""
    from fwdgrad.distributed import step_source

    model, x, y = problem()
    params = list(model.parameters())
    streams = range(world) if mode == "tangent" else range(1)
    for t in range(steps):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        blocks = [step_source(tangents, [p.detach() for p in params], K, seed, t, s).materialise() for s in streams]
        tang = [torch.cat([b[i] for b in blocks]) for i in range(len(params))]  # [S, *shape] per tensor
        d = sum((g.unsqueeze(0) * v).flatten(1).sum(1) for g, v in zip(grads, tang, strict=True))
        with torch.no_grad():
            for p, v in zip(params, tang, strict=True):
                p -= LR * torch.tensordot(d, v, dims=1) / d.numel()
    return [p.detach().clone() for p in params]


#: The zeroth-order runs of the 2- and 4-process scenarios: (estimator, mode, options).
ZO_RUNS = [
    ("zo", "data", {"tangents": "gaussian"}),
    ("zo-sign", "data", {"tangents": "rademacher"}),
    ("zo", "tangent", {"tangents": "sphere", "one_sided": True}),
    ("zo-sign", "tangent", {"tangents": "gaussian", "eps": 1e-4}),
]


def zo_reference(name: str, mode: str, world: int, steps: int, seed: int = 7, **options: Any) -> list[torch.Tensor]:
    """The parameters after ``steps`` plain SGD steps of one process on the *whole* batch with the SPSA
    estimate over the step's directions, formed here from :class:`Perturbation` draws and
    :func:`spsa_directional_derivatives` directly (no seed-sharing code): data: stream 0's K; tangent: the K
    of streams 0..world-1, rank-major, ``ĝ = (1/S) Σ_j d_j z_j``; ``zo-sign`` steps along ``sign(ĝ)``."""
    from fwdgrad.derivatives.finite_difference import Perturbation, spsa_directional_derivatives
    from fwdgrad.distributed import step_seed

    tangents, eps = options.get("tangents", "gaussian"), options.get("eps", 1e-3)
    model, x, y = problem()
    params = list(model.parameters())
    streams = range(world) if mode == "tangent" else range(1)
    for t in range(steps):
        ds, blocks = [], []
        for s in streams:
            pert = Perturbation(tangents, params, K, torch.Generator().manual_seed(step_seed(seed, t, s)))
            _, d = spsa_directional_derivatives(model, lambda m: F.cross_entropy(m(x), y), params, pert, eps=eps,
                                                one_sided=options.get("one_sided", False), restore="snapshot")
            ds.append(d)
            blocks.append(pert.materialise())
        d = torch.cat(ds)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = torch.tensordot(d, torch.cat([b[i] for b in blocks]), dims=1) / d.numel()
                p -= LR * (g.sign() if name == "zo-sign" else g)
    return [p.detach().clone() for p in params]


def zo_runs(comm: Any, out: Path, result: dict[str, Any]) -> None:
    """:data:`ZO_RUNS` for ``WORLD_STEPS`` steps each, then 20 data-parallel zo-sign steps with momentum, weight
    decay, a weight check every 5 steps and a fused-SGD replay log written by rank 0."""
    from fwdgrad.distributed import ReplayLog, SeedSharingSGD, shard

    rank, world = comm.rank, comm.world
    for name, mode, options in ZO_RUNS:
        model, x, y = problem()
        opt = SeedSharingSGD(model, name, seed=7, mode=mode, comm=comm, num_directions=K, **options)
        run(opt, x, y, WORLD_STEPS, rank, world, mode)
        torch.save([p.detach() for p in model.parameters()], out / f"{name}_{mode}_{rank}.pt")
        result[f"{name}_{mode}_bytes_per_step"] = opt.bytes_per_step
    model, x, y = problem()
    if rank == 0:
        torch.save(model.state_dict(), out / "zo_init.pt")
    opt = SeedSharingSGD(model, "zo-sign", seed=5, mode="data", comm=comm, num_directions=K, check_every=5)
    opt.log = ReplayLog(out / "zo_run.log", opt) if rank == 0 else None
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    for t in range(20):
        opt.step(lambda m: F.cross_entropy(m(xs), ys), lr=0.01 / (1 + t), weight_decay=1e-3, momentum=0.9)
    if opt.log is not None:
        opt.log.close()
    torch.save(model.state_dict(), out / f"zo_long_{rank}.pt")


def run(opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int, rank: int, world: int, mode: str,
        momentum: float = 0.0) -> None:
    from fwdgrad.distributed import shard

    xs, ys = (shard(x, rank, world), shard(y, rank, world)) if mode == "data" else (x, y)
    for _ in range(steps):
        opt.step(lambda m: F.cross_entropy(m(xs), ys), lr=LR, momentum=momentum)


def adam_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, comm: Any) -> list[torch.Tensor]:
    """5 data-parallel steps of the shared estimate into ``.grad`` + ``torch.optim.Adam`` (comm=None: one
    process on the whole batch)."""
    from fwdgrad.distributed import SeedSharingSGD, shard

    opt = SeedSharingSGD(model, "fg-w", seed=7, mode="data", comm=comm, num_directions=K)
    rank, world = opt.comm.rank, opt.comm.world
    xs, ys = shard(x, rank, world), shard(y, rank, world)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(WORLD_STEPS):
        adam.zero_grad()
        opt.accumulate(lambda m: F.cross_entropy(m(xs), ys))
        adam.step()
    return list(model.parameters())


def mismatch(comm: Any, result: dict[str, Any]) -> None:
    """Rank 1 with another base seed, then with a weight moved by 1e-12: both ranks must refuse to start."""
    from fwdgrad.distributed import ReplicaMismatchError, SeedSharingSGD

    for what in ("seed", "init", "eps"):
        model, _, _ = problem()
        seed = 7 + (comm.rank if what == "seed" else 0)
        if what == "init" and comm.rank == comm.world - 1:
            with torch.no_grad():
                next(model.parameters())[0, 0] += 1e-12
        try:
            if what == "eps":  # zo's finite-difference step given on the last rank only (the others: default)
                extra = {"eps": 1e-4} if comm.rank == comm.world - 1 else {}
                SeedSharingSGD(model, "zo", seed=seed, mode="data", comm=comm, num_directions=K, **extra)
            else:
                SeedSharingSGD(model, "fg-w", seed=seed, mode="data", comm=comm, num_directions=K)
        except ReplicaMismatchError as exc:
            result[f"mismatch_{what}"] = str(exc)


def kill(comm: Any, victim: int, result: dict[str, Any], out: Path, sig: int = signal.SIGKILL) -> None:
    """Rank ``victim`` sends itself ``sig`` at step 5 of a data-parallel run (SIGKILL: it dies; SIGSTOP: it
    hangs); the survivor records its error."""
    from fwdgrad.distributed import RankLostError, SeedSharingSGD

    rank, world = comm.rank, comm.world
    if rank == victim:  # what it has to say, before it dies
        (out / f"result_{rank}.json").write_text(json.dumps(result))
    model, x, y = problem()
    opt = SeedSharingSGD(model, "fg-w", seed=7, mode="data", comm=comm, num_directions=K)
    try:
        for t in range(1000):
            if t == 5 and rank == victim:
                os.kill(os.getpid(), sig)
            began = time.monotonic()
            run(opt, x, y, 1, rank, world, "data")
    except RankLostError as exc:
        result["error"], result["lost"] = str(exc), exc.lost
        result["seconds_to_error"] = time.monotonic() - began


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    from fwdgrad.distributed import ReplayLog, SeedSharingSGD, init_from_env

    timeout = float(os.environ.get("FWDGRAD_TEST_TIMEOUT", "20"))
    comm = init_from_env(timeout_s=timeout, probe_s=2.0)
    rank, world = comm.rank, comm.world
    result: dict[str, Any] = {}
    if scenario in ("equal", "basic"):
        if scenario == "equal":
            mismatch(comm, result)
        for mode in ("data", "tangent"):
            model, x, y = problem()
            opt = SeedSharingSGD(model, "fg-w", seed=7, mode=mode, comm=comm, num_directions=K)
            run(opt, x, y, WORLD_STEPS, rank, world, mode)
            torch.save([p.detach() for p in model.parameters()], out / f"{mode}_{rank}.pt")
            result[f"{mode}_bytes_per_step"] = opt.bytes_per_step
        # .grad path: the shared estimate accumulated, then torch.optim.Adam (data mode)
        model, x, y = problem()
        torch.save([p.detach() for p in adam_run(model, x, y, comm)], out / f"adam_{rank}.pt")
        # 100 steps with momentum and rank-1 tangents in tangent mode, a replay log, a checkpoint at step 50
        model, x, y = problem()
        if rank == 0:
            torch.save(model.state_dict(), out / "init.pt")
        opt = SeedSharingSGD(model, "fg-w", seed=3, mode="tangent", comm=comm, num_directions=K, check_every=10,
                             tangents="rank1")
        opt.log = ReplayLog(out / "run.log", opt) if rank == 0 else None
        run(opt, x, y, 50, rank, world, "tangent", momentum=0.9)
        ckpt = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        run(opt, x, y, 50, rank, world, "tangent", momentum=0.9)
        torch.save(model.state_dict(), out / f"long_{rank}.pt")
        result["long_bytes_per_step"] = opt.bytes_per_step
        # resume from the step-50 checkpoint in a fresh optimizer: the same weights at step 100
        model2, _, _ = problem()
        model2.load_state_dict(ckpt[0])
        opt2 = SeedSharingSGD(model2, "fg-w", seed=3, mode="tangent", comm=comm, num_directions=K,
                              check_every=10, tangents="rank1")
        opt2.load_state_dict(ckpt[1])
        run(opt2, x, y, 50, rank, world, "tangent", momentum=0.9)
        torch.save(model2.state_dict(), out / f"resumed_{rank}.pt")
        zo_runs(comm, out, result)
        if scenario == "equal":  # last: rank 1 is killed mid-run; rank 0 must stop with an error naming it
            kill(comm, 1, result, out)
    elif scenario in ("kill0", "kill1"):
        kill(comm, int(scenario[-1]), result, out)
    elif scenario == "hang1":
        kill(comm, 1, result, out, signal.SIGSTOP)
    (out / f"result_{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # no teardown handshake with a peer that may be gone


if __name__ == "__main__":
    main()
