r"""The collective calls of seed sharing, wrapped: every byte exchanged is counted, and a failed call names
the rank that was lost instead of hanging or surfacing a transport error.

Bytes are counted as the *logical payload* of each call on this rank: the buffer a collective fills here
(``all_reduce``: the tensor; ``all_gather``: ``world`` times the tensor). That is the figure the issue's
target ``8·K·world + 64`` and data-parallel backprop's ``4·n`` (one ``float32`` all-reduce of the gradient)
are both stated in; the bytes on the wire depend on the algorithm (a ring all-reduce moves about
``2·(world−1)/world`` times the payload per rank), equally for both.

:class:`LocalComm` is the world of one process (no ``torch.distributed``): the same interface, nothing
exchanged, zero bytes. :class:`Comm` wraps an initialised default process group (gloo on CPU, NCCL on GPU).

Example:
    >>> import torch
    >>> from fwdgrad.distributed.comm import LocalComm
    >>> comm = LocalComm()
    >>> comm.all_gather(torch.tensor([1.0, 2.0])).tolist(), comm.bytes_total
    ([[1.0, 2.0]], 0)
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


class DistributedError(RuntimeError):
    """Base of the errors of :mod:`fwdgrad.distributed`."""


class RankLostError(DistributedError):
    """A collective failed because a rank went away (killed, crashed) or stopped answering; ``.lost`` lists
    the ranks found missing (empty when they could not be identified)."""

    def __init__(self, message: str, lost: Sequence[int]) -> None:
        super().__init__(message)
        self.lost = list(lost)


class ReplicaMismatchError(DistributedError):
    """Ranks disagree on what must be identical: configuration, seeds, initial weights, or (later) weights."""


class LocalComm:
    """A world of one process: collectives return their input, nothing is exchanged or counted."""

    rank = 0
    world = 1

    def __init__(self) -> None:
        self.bytes_total = 0
        self.calls = 0
        self.seconds = 0.0

    def all_reduce_sum(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        """The sum over ranks of ``tensor`` (a new tensor)."""
        return tensor.clone()

    def all_reduce_min(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        """The entry-wise minimum over ranks of ``tensor`` (a new tensor)."""
        return tensor.clone()

    def all_gather(self, tensor: Tensor, what: str = "all_gather") -> Tensor:
        """``[world, *tensor.shape]``: every rank's ``tensor``, by rank."""
        return tensor.unsqueeze(0).clone()


class Comm(LocalComm):
    """The default process group's collectives, counted and guarded.

    Args:
        store: the ``torch.distributed`` store the group was built on (:func:`fwdgrad.distributed.launch.
            init_from_env` passes it). After a failed collective the surviving ranks mark themselves
            present in it and the ranks that do not appear within ``probe_s`` seconds are named as lost; a
            store that no longer answers means its host (rank 0, unless an agent such as ``torchrun`` hosts
            it) is gone. Without a store the lost rank is named only in a world of two.
        probe_s: how long survivors wait for each other after a failure.

    Attributes:
        bytes_total: bytes of every collective so far (see the module docstring for what is counted).
        calls: number of collective calls.
        seconds: wall-clock time spent inside collective calls (waiting for peers included).
    """

    def __init__(self, store: object | None = None, probe_s: float = 3.0) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fwdgrad.distributed.Comm: torch.distributed has no initialised process group")
        super().__init__()
        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._store, self._probe_s = store, probe_s
        # NCCL exchanges CUDA tensors only: scalars are moved there and back (a few bytes)
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _run(self, what: str, call: object, nbytes: int) -> None:
        self.calls += 1
        began = time.perf_counter()
        try:
            call()  # type: ignore[operator]
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, ...)
            lost = self._lost_ranks(self.calls)
            who = f"rank {lost[0]}" if len(lost) == 1 else (f"ranks {lost}" if lost else "an unidentified rank")
            raise RankLostError(
                f"fwdgrad.distributed: {who} was lost during {what} (call {self.calls}; this is rank {self.rank} "
                f"of {self.world}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", lost
            ) from exc
        self.bytes_total += nbytes
        self.seconds += time.perf_counter() - began

    def _lost_ranks(self, call: int) -> list[int]:
        others = [r for r in range(self.world) if r != self.rank]
        if self._store is None:
            return others if len(others) == 1 else []
        store = self._store
        key = f"fwdgrad/alive/{call}/"
        try:
            store.set(key + str(self.rank), "1")  # type: ignore[attr-defined]
            deadline = time.monotonic() + self._probe_s
            missing = list(others)
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([key + str(r)])]  # type: ignore[attr-defined]
                if missing:
                    time.sleep(0.05)
            return missing
        except Exception:  # the store's host is gone with its rank
            return [0] if self.rank != 0 else others

    def leave(self, finished: bool, wait_s: float = 10.0) -> None:
        """Tear down the process group in an order that lets no rank close its connections (rank 0: the
        store too) while a peer still uses them. After a finished run: a barrier; every rank then waits, in
        the store, until all ranks are out of it (no collective data is in flight any more); each destroys its
        process group and says so in the store; rank 0, which hosts the store, returns once all have. Without
        this a rank could return from the last collective and exit while a peer was still receiving its data,
        and the peer's gloo thread aborted that process (seen once in CI after a successful 2-process run:
        ``terminate called without an active exception``, exit -6). A run that did not finish only destroys
        its group: its peers may be gone. Each wait gives up after ``wait_s`` seconds (then this rank leaves)."""
        if not self._dist.is_initialized():
            return
        store = self._store if finished and self.world > 1 else None
        if store is not None:
            with contextlib.suppress(Exception):  # a peer lost after its own last step: its exit code says so
                self._dist.barrier()
            self._meet(store, "fwdgrad/left-barrier", wait_s)
        self._dist.destroy_process_group()
        if store is not None:
            self._meet(store, "fwdgrad/left-group", wait_s if self.rank == 0 else 0.0)

    def _meet(self, store: object, key: str, wait_s: float) -> None:
        """Count this rank in ``key`` and wait (at most ``wait_s``) until every rank has counted itself."""
        with contextlib.suppress(Exception):  # the store's host is gone: nothing left to wait for
            count = store.add(key, 1)  # type: ignore[attr-defined]
            deadline = time.monotonic() + wait_s
            while count < self.world and time.monotonic() < deadline:
                time.sleep(0.01)
                count = store.add(key, 0)  # type: ignore[attr-defined]

    def all_reduce_sum(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        out = tensor.to(self.device, copy=True)
        self._run(what, lambda: self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM),
                  out.numel() * out.element_size())
        return out.to(tensor.device)

    def all_reduce_min(self, tensor: Tensor, what: str = "all_reduce") -> Tensor:
        out = tensor.to(self.device, copy=True)
        self._run(what, lambda: self._dist.all_reduce(out, op=self._dist.ReduceOp.MIN),
                  out.numel() * out.element_size())
        return out.to(tensor.device)

    def all_gather(self, tensor: Tensor, what: str = "all_gather") -> Tensor:
        mine = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._run(what, lambda: self._dist.all_gather(parts, mine),
                  self.world * tensor.numel() * tensor.element_size())
        return torch.stack(parts).to(tensor.device)


def default_timeout(seconds: float) -> datetime.timedelta:
    """``seconds`` as the ``timedelta`` torch.distributed takes."""
    return datetime.timedelta(seconds=seconds)
