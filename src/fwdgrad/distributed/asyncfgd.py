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

Ticks are separated by a barrier, and within a tick the modules read only what the previous tick wrote, so
the threaded run (``threads=True``, one thread per module) computes exactly what the sequential run
computes, bit for bit; the threads only overlap the modules' work in time.

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

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp

from fwdgrad.distributed.seeds import step_source
from fwdgrad.estimators import ImplicitGradient

Tensor = torch.Tensor


class AsyncFGD:
    """Pipelined forward-gradient training of a chain of modules (see the module docstring).

    Args:
        modules: the M modules, applied in order; every one must have a trainable parameter.
        criterion: ``criterion(output, target)`` → scalar loss (mean-reduced).
        lr: the SGD learning rate.
        seed: the base seed of the tangents.
        tangents: ``"gaussian"`` or ``"rademacher"`` (drawn per module and batch, regenerated for the update).
        threads: one thread per module (``False``: the same schedule in one thread).
    """

    def __init__(
        self, modules: Sequence[nn.Module], criterion: Callable[[Tensor, Tensor], Tensor], *, lr: float,
        seed: int, tangents: str = "gaussian", threads: bool = True,
    ) -> None:
        where = "fwdgrad.distributed.AsyncFGD"
        if not modules:
            raise ValueError(f"{where}: needs at least one module")
        if tangents not in ("gaussian", "rademacher"):
            raise ValueError(f"{where}: tangents must be 'gaussian' or 'rademacher', got {tangents!r}")
        self.modules, self.criterion, self.lr, self.seed = list(modules), criterion, float(lr), seed
        self.tangents, self.threads = tangents, threads
        self.params = [{n: p for n, p in m.named_parameters() if p.requires_grad} for m in self.modules]
        for i, ps in enumerate(self.params):
            if not ps:
                raise ValueError(f"{where}: module {i} ({type(self.modules[i]).__name__}) has no trainable parameter")

    def _source(self, m: int, b: int) -> object:
        return step_source(self.tangents, [p.detach() for p in self.params[m].values()], 1, self.seed, b, m)

    def _forward(self, m: int, b: int, h: Tensor, hdot: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Module ``m`` on batch ``b``: ``(h', ḣ')``, or ``(loss, d_b)`` for the last module."""
        mod, names = self.modules[m], list(self.params[m])
        primals = tuple(p.detach() for p in self.params[m].values())
        src = self._source(m, b)
        tangents = tuple(src.dense(i, 0) for i in range(len(names)))  # type: ignore[attr-defined]
        last = m == len(self.modules) - 1

        def f(x: Tensor, *ps: Tensor) -> Tensor:
            out = functional_call(mod, dict(zip(names, ps, strict=True)), (x,))
            return self.criterion(out, target) if last else out

        return jvp(f, (h, *primals), (hdot, *tangents))

    def _update(self, m: int, b: int, d: Tensor, loss: Tensor) -> None:
        params = list(self.params[m].values())
        grad = ImplicitGradient(loss, d.reshape(1), self._source(m, b))  # type: ignore[arg-type]
        grad.sgd_("fwdgrad.distributed.AsyncFGD", params, self.lr)

    def run(self, batches: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
        """Train on ``batches`` (each ``(x, y)``) in order; returns the loss of every batch, in batch order."""
        big_m, n = len(self.modules), len(batches)
        acts: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (module, batch) -> its input pair
        ds: dict[int, tuple[Tensor, Tensor]] = {}  # batch -> (loss, d)
        ticks = n + big_m - 1
        errors: list[BaseException] = []

        def tick(m: int, s: int) -> None:
            if s - big_m >= 0:  # d of batch s − M was formed at tick s − 1
                self._update(m, s - big_m, ds[s - big_m][1], ds[s - big_m][0])
            b = s - m
            if 0 <= b < n:
                x, y = batches[b]
                h, hdot = (x, torch.zeros_like(x)) if m == 0 else acts.pop((m, b))
                with torch.no_grad():
                    out, dout = self._forward(m, b, h, hdot, y)
                if m == big_m - 1:
                    ds[b] = (out.detach(), dout.detach())
                else:
                    acts[(m + 1, b)] = (out.detach(), dout.detach())

        if self.threads and big_m > 1:
            barrier = threading.Barrier(big_m)

            def worker(m: int) -> None:
                try:
                    for s in range(ticks):
                        barrier.wait()
                        tick(m, s)
                except threading.BrokenBarrierError:
                    pass
                except BaseException as exc:  # stop the others, re-raise in the caller
                    errors.append(exc)
                    barrier.abort()

            pool = [threading.Thread(target=worker, args=(m,), name=f"asyncfgd-{m}") for m in range(big_m)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            if errors:
                raise errors[0]
        else:
            for s in range(ticks):
                for m in range(big_m):
                    tick(m, s)
        for b in range(max(0, ticks - big_m), n):  # the updates still in flight at the end
            for m in range(big_m):
                self._update(m, b, ds[b][1], ds[b][0])
        return [float(ds[b][0]) for b in range(n)]
