"""Seed sharing across ranks, in one process: a world of threads whose collectives meet at a barrier (a few
milliseconds, no gloo), so these checks run in the default suite. Shards of unequal size weighted by their
share of the batch give the whole batch's step; a NaN, or an error, inside one rank's estimator stops every
rank at once (within the barrier's timeout: a rank left waiting in the collective fails the test) with the
same error naming that rank; a plain ``train_run`` takes the seed-shared steps of a world of one."""

from __future__ import annotations

import itertools
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad import NonFiniteError, cli
from fwdgrad.distributed import DistributedError, LocalComm, SeedSharingSGD, shard_bounds
from fwdgrad.training.config import MethodSpec, RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")
Tensor = torch.Tensor
WAIT_S = 20.0  # a rank still waiting in a collective after this long is a hang


class ThreadWorld:
    """The collectives of ``world`` threads: each call puts this rank's tensor in a slot and meets the others
    at a barrier (which breaks, failing the test, when a rank does not arrive within ``WAIT_S``)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world, timeout=WAIT_S)

    def comm(self, rank: int) -> Any:
        return _RankComm(self, rank)


class _RankComm(LocalComm):
    def __init__(self, shared: ThreadWorld, rank: int) -> None:
        super().__init__()
        self.shared, self.rank, self.world = shared, rank, shared.world
        self.calls = 0

    def _meet(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self.shared.slots[self.rank] = tensor.clone()
        self.shared.barrier.wait()
        every = list(self.shared.slots)
        self.shared.barrier.wait()
        return every

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        every = self._meet(tensor)
        out = every[0].clone()
        for t in every[1:]:
            out += t
        return out

    def all_reduce_min(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        return torch.stack(self._meet(tensor)).min(dim=0).values

    def all_gather(self, tensor: torch.Tensor, what: str = "all_gather") -> torch.Tensor:
        return torch.stack(self._meet(tensor))


_ESTIMATE = threading.Lock()


def _shared(model: nn.Module, method: str, **kwargs: Any) -> SeedSharingSGD:
    """A SeedSharingSGD whose estimator's step runs under one lock: forward-mode AD keeps its dual levels in
    process-global state, so two threads must not be inside a JVP at once (real ranks are processes). The
    collectives run outside the lock, as between processes."""
    shared = SeedSharingSGD(model, method, **kwargs)
    for name in ("step", "shared_step"):
        inner = getattr(shared.estimator, name, None)
        if inner is not None:
            def locked(*args: Any, _inner: Callable[..., Any] = inner, **kw: Any) -> Any:
                with _ESTIMATE:
                    return _inner(*args, **kw)

            setattr(shared.estimator, name, locked)
    return shared


def _run_ranks(world: int, body: Callable[[int, Any], Any]) -> list[Any]:
    """``body(rank, comm)`` on ``world`` threads; each rank's return value or raised exception, by rank."""
    shared = ThreadWorld(world)
    out: list[Any] = [None] * world

    def run(rank: int) -> None:
        try:
            out[rank] = body(rank, shared.comm(rank))
        except BaseException as exc:  # the test inspects it
            out[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    assert not any(isinstance(o, threading.BrokenBarrierError) for o in out), f"a rank was left waiting: {out}"
    return out


def _model() -> nn.Module:
    """The same initial weights on every rank (built under a lock: the initialisation draws from torch's
    global generator, which the threads share)."""
    with _ESTIMATE:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("method,n", [("fg-w", 5), ("fg-w", 1), ("zo", 7)])
def test_unequal_shards_weighted_by_size_give_the_whole_batch_step(method: str, n: int) -> None:
    """A batch of 5 over 2 ranks: shards of 3 and 2, weights 3/5 and 2/5 (of 1: one rank has none and calls no
    loss); the exchanged loss and derivatives, hence ``.grad``, are those of one process on the whole batch."""
    x, y = _batch(n)
    options = {"num_directions": 3}
    whole = _model()
    one = SeedSharingSGD(whole, method, seed=11, **options)
    loss_one = one.accumulate(lambda m: F.cross_entropy(m(x), y))

    def rank_body(rank: int, comm: Any) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        model = _model()
        shared = _shared(model, method, seed=11, comm=comm, **options)
        lo, hi = shard_bounds(n, rank, comm.world)
        xs, ys = x[lo:hi], y[lo:hi]

        def loss_fn(m: nn.Module) -> torch.Tensor:
            assert hi > lo, "an empty shard's loss is never evaluated"
            return F.cross_entropy(m(xs), ys)

        loss = shared.accumulate(loss_fn, weight=(hi - lo) / n)
        return loss, {k: p.grad.clone() for k, p in model.named_parameters()}, shared.last_scalars

    results = _run_ranks(2, rank_body)
    for loss, grads, scalars in results:
        torch.testing.assert_close(scalars, one.last_scalars, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loss, loss_one, rtol=1e-12, atol=0)
        for k, p in whole.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["fg-w", "zo"])
@pytest.mark.parametrize("mode", ["data", "tangent"])
def test_a_nan_on_one_rank_stops_every_rank_with_one_error_naming_it(method: str, mode: str) -> None:
    x, y = _batch(8)

    def rank_body(rank: int, comm: Any) -> Any:
        model = _model()
        shared = _shared(model, method, seed=3, mode=mode, comm=comm, num_directions=2)
        shared.accumulate(lambda m: F.cross_entropy(m(x), y))  # a good step first

        def loss_fn(m: nn.Module) -> Tensor:
            loss = F.cross_entropy(m(x), y)
            return loss * float("nan") if rank == 1 else loss

        before = {k: p.grad.clone() for k, p in model.named_parameters()}
        try:
            shared.accumulate(loss_fn)
        finally:
            assert all(torch.equal(p.grad, before[k]) for k, p in model.named_parameters())
            assert shared.step_count == 1
        return None

    errors = _run_ranks(3, rank_body)
    assert all(isinstance(e, NonFiniteError) for e in errors), errors
    messages = {str(e) for e in errors}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "of rank 1 (of 3) are not finite at step 1" in message and len(message.splitlines()) == 1


def test_an_error_in_one_ranks_estimator_stops_the_others_naming_it() -> None:
    x, y = _batch(8)

    def rank_body(rank: int, comm: Any) -> Any:
        shared = _shared(_model(), "fg-w", seed=3, comm=comm, num_directions=2)

        def loss_fn(m: nn.Module) -> Tensor:
            if rank == 2:
                raise RuntimeError("out of memory on rank 2")
            return F.cross_entropy(m(x), y)

        return shared.accumulate(loss_fn)

    errors = _run_ranks(3, rank_body)
    assert isinstance(errors[2], RuntimeError) and "out of memory on rank 2" in str(errors[2])
    for e in errors[:2]:
        assert isinstance(e, DistributedError), errors
        assert "rank 2 (of 3) stopped at step 0: its estimator raised an error" in str(e)


def test_shard_bounds_cover_the_batch_once() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_the_plain_run_takes_the_seed_shared_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fwdgrad train` without --parallel and with `--parallel data` (a one-rank seed-shared world, which
    `--nproc N` equals up to rounding): the same weights, bit for bit, the last smaller batch included."""
    import fwdgrad.training.loop as loop

    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "sdata.py").write_text(textwrap.dedent("""
        import torch


        class D:
            name, source, num_classes = "d", "test", 3

            def __init__(self):
                g = torch.Generator().manual_seed(2)
                self.x_train, self.y_train = torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
                self.x_test, self.y_test = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)


        def make_data():
            return D()
    """))
    monkeypatch.syspath_prepend(str(folder))
    args = ["train", "--dataset", "sdata:make_data", "--model", "mlp:width=8,depth=1", "--method",
            "fg-w:num_directions=3", "--batch-size", "16", "--epochs", "2", "--val-fraction", "0", "--lr", "0.05",
            "--threads", "1", "--save-model", "--no-plots", "--quiet", "--out-dir", str(tmp_path)]
    seen: list[str | None] = []
    real = loop.seed_shared_mode
    monkeypatch.setattr(loop, "seed_shared_mode", lambda config, spec: seen.append(real(config, spec)) or seen[-1])
    assert cli.main([*args, "--name", "plain"]) == 0
    assert cli.main([*args, "--name", "shared", "--parallel", "data"]) == 0
    assert seen == ["data", "data"]
    a, b = (torch.load(tmp_path / n / "models" / "fg-w_num_directions-3_seed0.pt", weights_only=True)["state_dict"]
            for n in ("plain", "shared"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a method that seed sharing cannot carry keeps its own generator
    assert real(RunConfig(), MethodSpec("fg-w", {"directions": "momentum"})) is None
    assert real(RunConfig(), MethodSpec("bp")) is None
