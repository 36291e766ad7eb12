r"""Seed-sharing SGD: ranks exchange K scalars per step, never a gradient or a parameter.

A forward-gradient step is fully described by the seed of its directions and its K directional
derivatives ``d_k = ⟨∇L, v_k⟩``; the update ``θ ← θ − (lr/K) Σ_k d_k v_k`` can be applied by anyone who can
draw ``v_k`` again. :class:`SeedSharingSGD` runs one such step per call on every rank:

* **data parallel** (``mode="data"``): every rank draws the *same* directions (stream 0 of
  :func:`~fwdgrad.distributed.seeds.step_seed`) and evaluates them on *its shard* of the batch; one
  ``all_reduce`` of ``[loss, d_1..d_K]`` (``8·(K+1)`` bytes, float64) and a division by the world size give
  the mean over shards. With a mean-reduced loss and shards of equal size ``B/W``,
  ``L = (1/W) Σ_r L_r`` and, ``d_k`` being linear in ``L``, ``d_k = (1/W) Σ_r d_k^{(r)}``: the step equals the
  single-process step on the whole batch up to rounding (float64: ~1e-16 relative). With unequal shards or a
  sum-reduced loss it does not (:func:`shard` refuses unequal shards); nor with batch statistics
  (BatchNorm in training mode), which differ per shard.
* **tangent parallel** (``mode="tangent"``): every rank evaluates the *same* batch along *its own* K
  directions (stream = rank); one ``all_gather`` of the K scalars (``8·K·W`` bytes) and every rank
  regenerates every rank's directions: the step is that of one process with ``K·W`` directions, direction
  ``j = r·K + k`` being rank ``r``'s ``k``-th (:class:`~fwdgrad.distributed.seeds.ConcatSource`).

Every rank applies the same update to the same parameters, so the replicas stay identical with no
broadcast. Floating-point determinism makes this hold bit for bit on identical hardware and software; a
digest check every ``check_every`` steps (one ``all_reduce`` of 16 bytes) turns a silent divergence into
:class:`~fwdgrad.distributed.comm.ReplicaMismatchError`, and the constructor compares the configuration
and the initial weights of all ranks (one ``all_gather`` of 16 bytes per rank).

Which estimators: those whose step yields an :class:`~fwdgrad.estimators.gradient.ImplicitGradient`
drawing its tangents as ``TangentSource(tangents, primals, K, generator)`` from the generator they are given
(``fg-w``; checked on the first step), and those that offer the seed-sharing hooks (``zo``, ``zo-sign``):

* ``shared_step(model, loss_fn, params)``: the step's implicit gradient (loss, the K scalars, the source);
* ``shared_source(primals, generator)``: the same directions drawn again from the generator's state (another
  rank's, a replayed step's), checked against the step's own on the first step;
* ``shared_config()``: what the ranks must agree on (compared at start-up; an option given that contradicts
  it is refused);
* ``post_exchange(grad)``: the update from the exchanged estimate (``zo-sign``: its entry-wise sign, taken
  after the exchange so that it is the sign of the whole batch's or of all ``K·W`` directions' estimate);
* ``unshareable``: why the steps cannot be rebuilt from scalars (``zo-cons``), refused at construction.

This is the scheme of MeZO's distributed pull request (zeroth order, K = 1), with K directions, tangent
parallelism and a replay, carried over to forward gradients.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.distributed import SeedSharingSGD
    >>> model = torch.nn.Linear(4, 2)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> opt = SeedSharingSGD(model, "fg-w", seed=0, num_directions=2)  # one process: LocalComm
    >>> loss = opt.step(lambda m: F.cross_entropy(m(x), y), lr=0.01)
    >>> opt.bytes_per_step  # nothing to exchange in a world of one
    0.0
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fwdgrad.distributed.comm import DistributedError, LocalComm, ReplicaMismatchError
from fwdgrad.distributed.seeds import ConcatSource, after_exchange, digest, shared_source, step_seed
from fwdgrad.errors import NonFiniteError
from fwdgrad.estimators import Gradient, ImplicitGradient, estimator, estimator_options
from fwdgrad.estimators.base import check_rate, eager_module, trainable_parameters

Tensor = torch.Tensor
MODES = ("data", "tangent")


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` examples: the first ``n mod world`` ranks
    take ``⌈n/world⌉``, the others ``⌊n/world⌋`` (some none when ``n < world``), as ``torch.tensor_split``.
    With ``weight = (stop − start) / n`` per rank, ``Σ_r weight_r · L_r`` is the whole batch's mean loss.

    >>> [shard_bounds(5, r, 2) for r in range(2)], [shard_bounds(1, r, 2) for r in range(2)]
    ([(0, 3), (3, 5)], [(0, 1), (1, 1)])
    """
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (1 if rank < extra else 0)


def shard(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s contiguous shard of ``batch`` (first dimension), all shards of equal size.

    A batch whose size is not a multiple of ``world`` raises ``ValueError``: the mean over unequal shards is
    not the whole-batch mean, so data parallelism would silently change the estimate.
    """
    n = batch.shape[0]
    if n % world:
        raise ValueError(f"fwdgrad.distributed.shard: batch size {n} is not a multiple of the world size {world}")
    size = n // world
    return batch[rank * size:(rank + 1) * size]


class SeedSharingSGD:
    """SGD with a seed-sharing forward-gradient estimator on every rank (see the module docstring).

    Args:
        model: the replica on this rank (identical on every rank; checked).
        name: a registered estimator whose step yields an implicit gradient (``"fg-w"``), or one with the
            seed-sharing hooks (``"zo"``, ``"zo-sign"``; see the module docstring).
        seed: the base seed, shared by all ranks (checked).
        mode: ``"data"`` or ``"tangent"``.
        comm: a :class:`~fwdgrad.distributed.comm.Comm` (default: :class:`~fwdgrad.distributed.comm.
            LocalComm`, one process).
        check_every: compare a digest of the weights across ranks every this many steps (0: never).
        log: a :class:`~fwdgrad.distributed.replay.ReplayLog` writer, or ``None``; rank 0 writes it.
        options: estimator options (``num_directions``, ``tangents``, ``chunk_size``, ...); not ``seed`` or
            ``generator``, which this class owns.

    Attributes:
        step_count: steps taken (the next step's number).
        last_scalars: the exchanged scalars of the last :meth:`accumulate` (float64 ``[S]``; ``None`` before).
        comm: the collectives (``comm.bytes_total`` counts what was exchanged).
        seconds: wall-clock seconds spent per phase since start-up: ``estimate`` (this rank's forward passes),
            ``exchange`` (collectives, waiting for peers included), ``update`` (regeneration and update;
            tangent mode: the directions of every rank).
    """

    def __init__(
        self, model: nn.Module, name: str = "fg-w", *, seed: int, mode: str = "data", comm: LocalComm | None = None,
        check_every: int = 100, log: Any = None, **options: Any,
    ) -> None:
        where = "fwdgrad.distributed.SeedSharingSGD"
        if mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"{where}: seed must be an int in [0, 2**63), got {seed!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"{where}: check_every must be an int >= 0, got {check_every!r}")
        for own in ("seed", "generator"):
            if own in options:
                raise ValueError(f"{where}: option {own!r} is set from the base seed; pass seed= only")
        self.model, self.name, self.seed, self.mode = eager_module(model), name, seed, mode  # compiled: its module
        self.comm = comm if comm is not None else LocalComm()
        self.check_every, self.log = check_every, log
        known = estimator_options(name)
        if known is not None and "generator" not in known:
            raise TypeError(f"{where}: estimator {name!r} takes no generator, so it draws no tangents that can be "
                            "regenerated; seed sharing needs one that does (e.g. 'fg-w')")
        self._gen = torch.Generator()
        self.estimator = estimator(name, generator=self._gen, **options)
        why = getattr(self.estimator, "unshareable", None)
        if why:
            raise ValueError(f"{where}: {name} cannot be shared by seed: {why}")
        fixed = getattr(self.estimator, "shared_config", None)
        self._estimator_config = fixed() if fixed is not None else None
        for key, value in (self._estimator_config or {}).items():
            if key in options and options[key] != value:
                raise ValueError(f"{where}: {name} with {key}={options[key]!r} cannot be shared by seed: its "
                                 f"seed-shared step uses {key}={value!r} (every rank, and a replay, must rebuild "
                                 "the parameters bit for bit)")
        # fg-w's choices that seed sharing cannot honour: stateful directions (their state would follow each
        # rank's own derivatives), an exact read-out (an explicit gradient per rank), and in tangent mode a
        # projection (the mean of per-rank projections is not the projection onto all K·W directions)
        refused = [(key, getattr(self.estimator, key)) for key, default in
                   (("directions", "sampled"), ("readout", "perturb"))
                   if getattr(self.estimator, key, default) != default]
        if mode == "tangent" and getattr(self.estimator, "aggregation", "mean") != "mean":
            refused.append(("aggregation", self.estimator.aggregation))  # type: ignore[attr-defined]
        if refused:
            key, value = refused[0]
            raise ValueError(f"{where}: {name} with {key}={value!r} cannot be shared by seed in {mode} mode: "
                             "every rank must be able to regenerate the whole update from the exchanged scalars")
        self.tangents = getattr(self.estimator, "tangents", None)
        self.num_directions = getattr(self.estimator, "num_directions", None)
        if not isinstance(self.tangents, str) or not isinstance(self.num_directions, int):
            raise TypeError(f"{where}: estimator {name!r} draws no tangents (no tangents/num_directions); "
                            "seed sharing needs directions it can regenerate")
        self.params = trainable_parameters(where, model)
        self.step_count = 0
        self.last_scalars: Tensor | None = None
        self._buffers: dict[Tensor, Tensor] = {}
        self._checked_source = False
        self.options = {k: v for k, v in sorted(options.items())}
        self._check_replicas()
        self._startup_bytes, self._counted_steps = self.comm.bytes_total, 0
        self.seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- checks
    def config(self) -> dict[str, Any]:
        """What must be identical on every rank, as JSON-able data."""
        config = {
            "estimator": self.name, "options": {k: repr(v) for k, v in self.options.items()},
            "tangents": self.tangents, "num_directions": self.num_directions, "mode": self.mode,
            "seed": self.seed, "world": self.comm.world,
            "params": [[n, list(p.shape), str(p.dtype)] for n, p in self.params.items()],
        }
        if self._estimator_config is not None:  # the estimator's own settings, defaults included (zo: eps, ...)
            config["estimator_config"] = self._estimator_config
        return config

    def weights_digest(self) -> int:
        """A 63-bit digest of the trainable parameters (names, shapes, dtypes, bytes)."""
        return digest(list(self.params.items()))

    def _check_replicas(self) -> None:
        conf = digest([("config", torch.frombuffer(bytearray(json.dumps(self.config()).encode()), dtype=torch.uint8))])
        mine = torch.tensor([conf, self.weights_digest()], dtype=torch.int64)
        every = self.comm.all_gather(mine, "the start-up check")
        bad_conf = [r for r in range(self.comm.world) if every[r, 0] != every[0, 0]]
        bad_init = [r for r in range(self.comm.world) if every[r, 1] != every[0, 1]]
        if bad_conf:
            raise ReplicaMismatchError(
                f"fwdgrad.distributed: rank(s) {bad_conf} differ from rank 0 in their configuration (estimator, "
                f"options, base seed, mode, world size or parameter shapes); this is rank {self.comm.rank} with "
                f"{self.config()}"
            )
        if bad_init:
            raise ReplicaMismatchError(
                f"fwdgrad.distributed: rank(s) {bad_init} start from initial weights different from rank 0's "
                "(seed the model's initialisation identically, or load the same checkpoint on every rank)"
            )

    def check_identical(self) -> None:
        """Compare the weights of all ranks (one 16-byte ``all_reduce``); raise on a difference."""
        d = self.weights_digest()
        low = self.comm.all_reduce_min(torch.tensor([d, -d], dtype=torch.int64), "the weight check")
        if int(low[0]) != -int(low[1]):
            every = self.comm.all_gather(torch.tensor([d], dtype=torch.int64), "the weight check")
            bad = [r for r in range(self.comm.world) if every[r, 0] != every[0, 0]]
            raise ReplicaMismatchError(
                f"fwdgrad.distributed: after step {self.step_count - 1} the weights of rank(s) {bad} differ "
                "from rank 0's (non-deterministic kernels, different hardware or software, or a modified replica)"
            )

    # ------------------------------------------------------------------------------------------- step
    def _stream(self) -> int:
        return self.comm.rank if self.mode == "tangent" else 0

    def _check_source(self, grad: object, primals: list[Tensor]) -> None:
        where = "fwdgrad.distributed.SeedSharingSGD.step"
        if not isinstance(grad, ImplicitGradient):
            raise TypeError(f"{where}: estimator {self.name!r} returned {type(grad).__name__}; seed sharing "
                            "needs an ImplicitGradient (directions it can regenerate)")
        again = self._source(primals, self.step_count, self._stream())
        last = self.num_directions - 1
        if again.num_directions != grad.source.num_directions or not all(  # type: ignore[attr-defined]
                torch.equal(again.dense(i, k), grad.source.dense(i, k))  # type: ignore[attr-defined]
                for i in (0, len(primals) - 1) for k in (0, last)):
            raise TypeError(f"{where}: estimator {self.name!r} draws its directions differently from "
                            "TangentSource(tangents, primals, K, generator) or its shared_source; they cannot "
                            "be regenerated here")
        self._checked_source = True

    def _source(self, primals: list[Tensor], step: int, stream: int) -> Any:
        return shared_source(self.estimator, self.tangents, primals, self.num_directions, self.seed, step, stream)

    def _own_estimate(self, loss_fn: Callable[[nn.Module], Tensor], weight: float | None
                      ) -> tuple[Gradient | None, BaseException | None]:
        """This rank's estimate, or ``None`` for an empty shard (``weight == 0``: nothing to evaluate), or
        ``(None, error)`` when its estimator raised in a world of several ranks: the error is held until every
        rank has learnt of it through the exchange (else the others would wait in the collective)."""
        if weight == 0.0:
            return None, None
        own = getattr(self.estimator, "shared_step", None)
        try:
            grad = (own(self.model, loss_fn, self.params) if own is not None
                    else self.estimator.step(self.model, loss_fn, self.params, lean=True))
        except Exception as exc:
            if self.comm.world == 1:
                raise
            return None, exc
        return grad, None

    def _shared_gradient(
        self, where: str, loss_fn: Callable[[nn.Module], Tensor], weight: float | None = None
    ) -> tuple[Gradient, Tensor]:
        """This step's estimate on this rank, the exchange, and the gradient every rank will apply:
        ``(gradient, exchanged scalars in float64)``: the implicit gradient of the exchanged scalars, through
        the estimator's ``post_exchange`` when it has one. ``weight`` (data mode): this rank's share of the
        batch, ``|shard| / |batch|`` (:func:`shard_bounds`); the exchanged values are then ``Σ_r weight_r ·
        [L_r, d_r]`` (``None``: equal shards, the plain mean over ranks)."""
        t, comm = self.step_count, self.comm
        clock = time.perf_counter()
        self._gen.manual_seed(step_seed(self.seed, t, self._stream()))
        grad, failure = self._own_estimate(loss_fn, weight)
        primals = [p.detach() for p in self.params.values()]
        if grad is None:  # an empty shard contributes nothing; a failed rank contributes NaN (see _stop_every_rank)
            filler = math.nan if failure is not None else 0.0
            dtype = primals[0].dtype
            own_loss = torch.tensor(filler, dtype=dtype, device=primals[0].device)
            own_dirs = torch.full((self.num_directions,), filler, dtype=dtype, device=primals[0].device)
            own_source: Any = self._source(primals, t, self._stream())
        else:
            if not self._checked_source:
                self._check_source(grad, primals)
            own_loss, own_dirs, own_source = grad.loss, grad.dirs, grad.source  # type: ignore[attr-defined]
        dtype = own_dirs.dtype
        clock = self._tick("estimate", clock)
        if self.mode == "data":
            mine = torch.cat([own_loss.detach().reshape(1).double(), own_dirs.detach().double()])
            payload = mine if weight is None or weight == 1.0 else mine * weight
            if comm.world > 1:
                payload = comm.all_reduce_sum(payload, f"the data-parallel all_reduce of step {t}")
                payload = payload / comm.world if weight is None else payload
            loss, dirs, source = payload[0], payload[1:], own_source
        else:
            mine = own_dirs.detach().double()
            payload = mine.reshape(1, -1)
            if comm.world > 1:
                payload = comm.all_gather(mine, f"the tangent-parallel all_gather of step {t}")
            loss, dirs = own_loss.detach().double(), payload.reshape(-1)
            parts = [own_source if r == comm.rank else self._source(primals, t, r) for r in range(comm.world)]
            source = parts[0] if comm.world == 1 else ConcatSource(parts)
        if comm.world > 1 and not bool(torch.isfinite(payload).all()):
            self._stop_every_rank(where, t, mine, failure)
        self._tick("exchange", clock)
        update: Gradient = ImplicitGradient(loss.to(own_loss.dtype), dirs.to(dtype), source)  # type: ignore[arg-type]
        return after_exchange(self.estimator, update), dirs

    def _stop_every_rank(self, where: str, t: int, mine: Tensor, failure: BaseException | None) -> None:
        """The exchanged values of step ``t`` are not finite: every rank knows it at once (NaN spreads through
        the sum or the gather), so every rank gathers who caused it (one more collective, on this path only) and
        raises alike: :class:`~fwdgrad.errors.NonFiniteError` naming the rank(s) whose loss or derivatives were
        NaN/Inf; on a rank whose estimator raised, that error; on the others a
        :class:`~fwdgrad.distributed.comm.DistributedError` naming that rank. Nothing is written on any rank."""
        code = 2.0 if failure is not None and not isinstance(failure, NonFiniteError) else (
            1.0 if failure is not None or not bool(torch.isfinite(mine).all()) else 0.0)
        codes = self.comm.all_gather(torch.tensor([code], dtype=torch.float64), f"the failure check of step {t}")
        raised = [r for r in range(self.comm.world) if codes[r, 0] == 2.0]
        bad = [r for r in range(self.comm.world) if codes[r, 0] == 1.0]
        world = self.comm.world
        if failure is not None and not isinstance(failure, NonFiniteError):
            raise failure
        if raised:
            raise DistributedError(f"{where}: rank {raised[0]} (of {world}) stopped at step {t}: its estimator "
                                   "raised an error (see that rank's output); every rank stops, nothing was written")
        who = "no rank alone (an overflow of the sum)"
        if bad:
            who = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {bad}"
        raise NonFiniteError(f"{where}: the loss or the directional derivatives of {who} (of {world}) are not finite "
                             f"at step {t}; every rank stops this step, nothing was written")

    def _finish(self) -> None:
        self.step_count += 1
        self._counted_steps += 1
        if self.check_every and self.comm.world > 1 and self.step_count % self.check_every == 0:
            self.check_identical()

    def step(
        self, loss_fn: Callable[[nn.Module], Tensor], lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
        *, weight: float | None = None,
    ) -> Tensor:
        """One step on every rank: ``loss_fn(model)`` is this rank's loss (its shard in data mode, the whole
        batch in tangent mode). Returns the step's loss (data mode: the mean over ranks). ``weight`` (data
        mode): this rank's share of the batch for unequal shards (see :func:`shard_bounds`)."""
        where = "fwdgrad.distributed.SeedSharingSGD.step"
        lr = check_rate(where, "lr", lr, strictly_positive=True)
        weight_decay = check_rate(where, "weight_decay", weight_decay, strictly_positive=False)
        momentum = check_rate(where, "momentum", momentum, strictly_positive=False, below_one=True)
        t = self.step_count
        update, dirs = self._shared_gradient(where, loss_fn, self._weight(where, weight))
        clock = time.perf_counter()
        update.sgd_(where, list(self.params.values()), lr, weight_decay, momentum, self._buffers)
        self._tick("update", clock)
        if self.log is not None and self.comm.rank == 0:
            self.log.append(t, lr, weight_decay, momentum, float(update.loss), dirs)
        self._finish()
        return update.loss

    def accumulate(self, loss_fn: Callable[[nn.Module], Tensor], *, weight: float | None = None) -> Tensor:
        """The shared estimate added into every parameter's ``.grad`` (as ``loss.backward()`` would), for any
        ``torch.optim`` optimizer to step on: every rank holds the same ``.grad`` and the same optimizer
        state, so the replicas stay identical. Counts as one step (directions, weight check). The scalars the
        estimate was formed from are left in :attr:`last_scalars` (float64, what a
        :class:`~fwdgrad.distributed.replay.ReplayLog` of kind ``"optimizer"`` records); ``log=`` (fused SGD
        records) is refused here. ``weight`` (data mode): this rank's share ``|shard| / |batch|`` of a batch
        split into unequal shards (:func:`shard_bounds`; ``0`` for an empty shard, whose ``loss_fn`` is not
        called), so that the exchanged loss and derivatives are those of the whole batch's mean loss.

        A non-finite loss or derivative on any rank, or an error in one rank's estimator, stops the step on
        every rank at once with the same error naming that rank (:class:`fwdgrad.NonFiniteError`), instead of
        leaving the others waiting in the collective.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from fwdgrad.distributed import SeedSharingSGD
            >>> model = torch.nn.Linear(4, 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> shared, adam = SeedSharingSGD(model, seed=0), torch.optim.Adam(model.parameters(), lr=1e-3)
            >>> loss = shared.accumulate(lambda m: F.cross_entropy(m(x), y)); adam.step()
        """
        where = "fwdgrad.distributed.SeedSharingSGD.accumulate"
        if self.log is not None:
            raise ValueError(f"{where}: log= records fused SGD steps only; for accumulate() and an optimizer use "
                             "ReplayLog(path, shared, optimizer=...) and its append_optimizer_step")
        update, dirs = self._shared_gradient(where, loss_fn, self._weight(where, weight))
        clock = time.perf_counter()
        update.accumulate(where, list(self.params.values()), list(self.params))
        self._tick("update", clock)
        self.last_scalars = dirs
        self._finish()
        return update.loss

    def _weight(self, where: str, weight: float | None) -> float | None:
        if weight is None:
            return None
        if self.mode != "data":
            raise ValueError(f"{where}: weight= weighs a rank's shard of the batch (data mode); this is "
                             f"{self.mode} mode")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"{where}: weight must be a number in [0, 1] (this rank's share of the batch), "
                             f"got {weight!r}")
        return float(weight)

    def _tick(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    @property
    def bytes_per_step(self) -> float:
        """Bytes exchanged by this rank per step since start-up or :meth:`load_state_dict` (the start-up check
        excluded, the periodic weight checks included), as counted by the collectives' wrapper."""
        n = self._counted_steps
        return (self.comm.bytes_total - self._startup_bytes) / n if n else 0.0

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The step count and the momentum buffers by parameter name (the directions need nothing else)."""
        names = {p: n for n, p in self.params.items()}
        return {"step": self.step_count, "momentum": {names[p]: b.clone() for p, b in self._buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]`` with its momentum buffers (the parameters are the model's)."""
        self.step_count = int(state["step"])
        self._startup_bytes, self._counted_steps = self.comm.bytes_total, 0
        self.seconds = {}
        self._buffers = {self.params[n]: b.clone() for n, b in state["momentum"].items()}


__all__ = ["MODES", "SeedSharingSGD", "shard", "shard_bounds"]
