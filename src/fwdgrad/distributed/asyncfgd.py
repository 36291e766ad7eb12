r"""AsyncFGD: module-wise pipelined forward gradients on stale parameters (Zhao, Zhang, Huo, Gu, NeurIPS 2023).

The model is a chain of M modules ``f_{M-1} ∘ … ∘ f_0`` followed by a loss. Batch ``b`` enters module 0 at
tick ``b``, module ``m`` at tick ``b + m``: each module, in its own worker, receives the pair (activation,
tangent) ``(h, ḣ)`` of batch ``b`` from module ``m − 1``, draws its own tangent ``v_m^b`` (from the seed
``(seed, b, m)``, :func:`~fwdgrad.distributed.seeds.step_seed`), pushes the pair forward

.. math:: (h', ḣ') = \big(f_m(h; θ_m),\ ∂_h f_m\,ḣ + ∂_θ f_m\,v_m^b\big)

(one forward-mode JVP), and hands it to module ``m + 1``. The last module forms the loss and the scalar
``d_b = ⟨∇L, v^b⟩`` (the JVP of the loss), which every module receives at the next tick and applies as
``θ_m ← θ_m − lr · d_b · v_m^b`` (``v_m^b`` drawn again from its seed). Module ``m`` thus runs batch ``b`` on
parameters that miss the last ``M − 1 − m`` updates: the delay decreases with depth, and the last module
is never stale, as in the paper. ``M = 1`` is the synchronous forward-gradient step (FG-W, K = 1).

Each module runs the same operations in the same order in both executions: ``workers=True`` gives every
module its own process (threads cannot overlap forward-mode passes: torch's forward-AD levels are global
to a process), the activations, tangents and scalars travelling through queues; ``workers=False`` runs the
same schedule in the calling process. Both give the same weights bit for bit on one machine.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.distributed.asyncfgd import AsyncFGD
    >>> mods = [torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(8, 3))]
    >>> batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    >>> losses = AsyncFGD(mods, F.cross_entropy, lr=0.01, seed=0).run(batches)
    >>> len(losses)
    3
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.func import jvp

from fwdgrad.derivatives import functional_call_once
from fwdgrad.distributed.seeds import step_source
from fwdgrad.estimators import ImplicitGradient

Tensor = torch.Tensor


class _Stage:
    """Module ``index`` of the chain: its forward pass on (activation, tangent) pairs and its update."""

    def __init__(self, module: nn.Module, index: int, last: bool, criterion: Callable[[Tensor, Tensor], Tensor],
                 lr: float, seed: int, tangents: str) -> None:
        self.module, self.index, self.last, self.criterion = module, index, last, criterion
        self.lr, self.seed, self.tangents = lr, seed, tangents
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def source(self, b: int) -> object:
        return step_source(self.tangents, [p.detach() for p in self.params.values()], 1, self.seed, b, self.index)

    def forward(self, b: int, h: Tensor, hdot: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Batch ``b``: ``(h', ḣ')``, or ``(loss, d_b)`` for the last module."""
        names = list(self.params)
        primals = tuple(p.detach() for p in self.params.values())
        src = self.source(b)
        tangents = tuple(src.dense(i, 0) for i in range(len(names)))  # type: ignore[attr-defined]

        def f(x: Tensor, *ps: Tensor) -> Tensor:
            out = functional_call_once(self.module, dict(zip(names, ps, strict=True)), (x,))
            return self.criterion(out, target) if self.last else out  # type: ignore[arg-type]

        with torch.no_grad():
            out, dout = jvp(f, (h, *primals), (hdot, *tangents))
        return out.detach(), dout.detach()

    def update(self, b: int, loss: Tensor, d: Tensor) -> None:
        """``θ ← θ − lr · d_b · v^b`` with ``v^b`` drawn again."""
        grad = ImplicitGradient(loss, d.reshape(1), self.source(b))  # type: ignore[arg-type]
        grad.sgd_("fwdgrad.distributed.AsyncFGD", list(self.params.values()), self.lr)


def _stage_loop(stage: _Stage, big_m: int, n: int, feed: object, take: object, targets: object,
                scalars: object, scalar_outs: Sequence[object], results: object) -> None:
    """Module ``m`` for batches ``0..n-1``: before batch ``b`` it applies ``d_{b+m-M}``, as at tick ``b + m``;
    then the updates still due. ``feed``/``take``: input and output queues (``take`` of the last module is
    ``None``); ``scalars``: its queue of ``(b, loss, d)``."""
    m = stage.index
    for b in range(n):
        if b + m - big_m >= 0:
            k, loss, d = scalars.get()  # type: ignore[attr-defined]
            stage.update(k, loss, d)
        h, hdot = feed.get()  # type: ignore[attr-defined]
        target = targets.get() if stage.last else None  # type: ignore[attr-defined]
        out, dout = stage.forward(b, h, hdot, target)
        if stage.last:
            for q in scalar_outs:
                q.put((b, out, dout))  # type: ignore[attr-defined]
            results.put(("loss", b, float(out)))  # type: ignore[attr-defined]
        else:
            take.put((out, dout))  # type: ignore[attr-defined]
    for _ in range(max(0, n + m - big_m), n):
        k, loss, d = scalars.get()  # type: ignore[attr-defined]
        stage.update(k, loss, d)


def _worker(stage: _Stage, big_m: int, n: int, feed: object, take: object, targets: object, scalars: object,
            scalar_outs: Sequence[object], results: object, done: object) -> None:
    torch.set_num_threads(1)
    try:
        _stage_loop(stage, big_m, n, feed, take, targets, scalars, scalar_outs, results)
        state = {k: v.detach().clone() for k, v in stage.params.items()}
        results.put(("state", stage.index, state))  # type: ignore[attr-defined]
    except BaseException as exc:  # reported to the caller, which stops the others
        results.put(("error", stage.index, f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
    # tensors travel as shared memory handed over by their sender: stay until the caller has everything
    done.wait(600)  # type: ignore[attr-defined]


class AsyncFGD:
    """Pipelined forward-gradient training of a chain of modules (see the module docstring).

    Args:
        modules: the M modules, applied in order; every one must have a trainable parameter.
        criterion: ``criterion(output, target)`` → scalar loss (mean-reduced; picklable for ``workers``).
        lr: the SGD learning rate.
        seed: the base seed of the tangents.
        tangents: ``"gaussian"`` or ``"rademacher"`` (drawn per module and batch, regenerated for the update).
        workers: one process per module (``False``: the same schedule in the calling process).
        timeout_s: with ``workers``, the longest wait for any module's result before giving up.
    """

    def __init__(
        self, modules: Sequence[nn.Module], criterion: Callable[[Tensor, Tensor], Tensor], *, lr: float,
        seed: int, tangents: str = "gaussian", workers: bool = False, timeout_s: float = 600.0,
    ) -> None:
        where = "fwdgrad.distributed.AsyncFGD"
        if not modules:
            raise ValueError(f"{where}: needs at least one module")
        if tangents not in ("gaussian", "rademacher"):
            raise ValueError(f"{where}: tangents must be 'gaussian' or 'rademacher', got {tangents!r}")
        for i, m in enumerate(modules):
            if not any(p.requires_grad for p in m.parameters()):
                raise ValueError(f"{where}: module {i} ({type(m).__name__}) has no trainable parameter")
        self.modules, self.workers, self.timeout_s = list(modules), workers, timeout_s
        self.stages = [_Stage(m, i, i == len(modules) - 1, criterion, float(lr), seed, tangents)
                       for i, m in enumerate(self.modules)]

    def run(self, batches: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
        """Train on ``batches`` (each ``(x, y)``) in order; returns the loss of every batch, in batch order."""
        if self.workers and len(self.stages) > 1:
            return self._run_workers(batches)
        big_m, n = len(self.stages), len(batches)
        acts: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        ds: dict[int, tuple[Tensor, Tensor]] = {}
        for s in range(n + big_m - 1):  # tick s: module m applies d_{s-M}, then runs batch s - m
            for m, stage in enumerate(self.stages):
                if s - big_m >= 0:
                    stage.update(s - big_m, *ds[s - big_m])
                b = s - m
                if 0 <= b < n:
                    x, y = batches[b]
                    h, hdot = (x, torch.zeros_like(x)) if m == 0 else acts.pop((m, b))
                    out, dout = stage.forward(b, h, hdot, y if stage.last else None)
                    if stage.last:
                        ds[b] = (out, dout)
                    else:
                        acts[(m + 1, b)] = (out, dout)
        for b in range(max(0, n - 1), n):  # the update still in flight at the end
            for stage in self.stages:
                stage.update(b, *ds[b])
        return [float(ds[b][0]) for b in range(n)]

    def _run_workers(self, batches: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
        ctx = mp.get_context("spawn")
        big_m, n = len(self.stages), len(batches)
        pipes = [ctx.Queue(maxsize=8) for _ in range(big_m)]  # pipes[m]: module m's input pairs
        targets, results = ctx.Queue(maxsize=8), ctx.Queue()
        scalars = [ctx.Queue() for _ in range(big_m)]
        done = ctx.Event()
        procs = [ctx.Process(target=_worker, name=f"asyncfgd-{m}", daemon=True,
                             args=(stage, big_m, n, pipes[m], pipes[m + 1] if m + 1 < big_m else None, targets,
                                   scalars[m], scalars, results, done))
                 for m, stage in enumerate(self.stages)]
        for p in procs:
            p.start()
        losses: dict[int, float] = {}
        states: dict[int, dict[str, Tensor]] = {}
        try:
            for x, y in batches:  # bounded queues: the feeding keeps pace with module 0
                pipes[0].put((x, torch.zeros_like(x)))
                targets.put(y)
            while len(states) < big_m:
                kind, key, value = results.get(timeout=self.timeout_s)
                if kind == "error":
                    raise RuntimeError(f"fwdgrad.distributed.AsyncFGD: module {key} failed: {value}")
                (losses if kind == "loss" else states)[key] = value
        except queue.Empty as exc:
            raise RuntimeError(f"fwdgrad.distributed.AsyncFGD: no result within {self.timeout_s} s") from exc
        finally:
            done.set()
            for p in procs:
                if p.is_alive():
                    p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        with torch.no_grad():
            for m, stage in enumerate(self.stages):
                for k, v in states[m].items():
                    stage.params[k].copy_(v)
        return [losses[b] for b in range(n)]
