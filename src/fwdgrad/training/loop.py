"""One run: one method, one seed, ``epochs`` epochs. Every method's step is the same three lines; only the
estimator differs::

    opt.zero_grad()
    loss = est(model, lambda m: F.cross_entropy(m(x), y))   # writes the gradient (estimate) into .grad
    opt.step()

A NaN/Inf loss or estimate raises :class:`fwdgrad.NonFiniteError` inside the estimator before any
gradient is written; the run then stops with a message (``on_nonfinite="stop"``) or skips that step
(``"skip"``), and fails once it has skipped more than ``max_skip_fraction`` of its planned steps. Weights
are checked after every optimizer step too; should they become non-finite, the weights of the start of the
epoch are restored and the run stops. No NaN ever stays in the weights.

At the end of every epoch ``on_epoch_end(result, state)`` receives the run's checkpoint state (see
:mod:`fwdgrad.training.checkpoint`); ``train_run(..., resume=state)`` continues from such a state and gives
the same weights and figures, bit for bit, as the run that was not interrupted (same torch threads).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.errors import NonFiniteError
from fwdgrad.estimators import Estimator, estimator, estimator_options
from fwdgrad.models import num_parameters
from fwdgrad.training.checkpoint import estimator_state, rng_state, set_estimator_state, set_rng_state
from fwdgrad.training.config import MethodSpec, RunConfig
from fwdgrad.training.fairness import Splits, derived_seed, epoch_order, initial_model, order_digest, weights_digest
from fwdgrad.training.lr import make_scheduler
from fwdgrad.training.memory import peak_memory_probe
from fwdgrad.training.parallel import make_shared, seed_shared_mode

Tensor = torch.Tensor
Log = Callable[[str], None]

COMPLETED, TIME_BUDGET, INTERRUPTED = "completed", "time budget", "interrupted"
STOPPED_NONFINITE = "stopped (non-finite)"
FAILED_SKIPS = "failed (too many skipped steps)"
FAILED = (STOPPED_NONFINITE, FAILED_SKIPS)


def make_estimator(spec: MethodSpec, seed: int) -> Estimator:
    """Build the estimator of ``spec``. Unless the spec sets ``seed`` or ``generator``, an estimator that
    accepts ``generator`` (else ``seed``) gets one derived from ``seed``, so its random tangents are
    reproducible."""
    where = f"fwdgrad: method {spec.display!r}"
    known = estimator_options(spec.name)
    options = dict(spec.options)
    if known is not None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{where}: estimator {spec.name!r} has no option {unknown[0]!r}; options: {sorted(known)}")
        if "seed" not in options and "generator" not in options:
            if "generator" in known:
                options["generator"] = torch.Generator().manual_seed(derived_seed(seed, "estimator"))
            elif "seed" in known:
                options["seed"] = derived_seed(seed, "estimator")
    try:
        return estimator(spec.name, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def make_optimizer(config: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``; ``(nan, nan)`` for an empty set."""
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(dim=1) == yb).sum().item()
    model.train(was_training)
    return total_loss / len(y), correct / len(y)


@dataclass
class RunResult:
    """One method, one seed: the per-epoch history and the figures of the report."""

    method: str
    estimator: str
    options: dict[str, Any]
    seed: int
    lr: float
    lr_source: str
    # completed | time budget | interrupted | stopped (non-finite) | failed (too many skipped steps)
    status: str = COMPLETED
    message: str = ""
    epochs_completed: int = 0
    steps: int = 0
    steps_per_epoch: int = 1
    skipped_steps: int = 0
    examples_seen: int = 0
    train_time_s: float = 0.0
    peak_step_memory_bytes: int | None = None
    num_parameters: int = 0
    init_digest: str = ""
    order_digest: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # seed-sharing parallelism (config.parallel): the world size, the mode, and the bytes this rank
    # exchanged per step as counted by the wrapped collectives (since the start or the resume of the run)
    world: int = 1
    mode: str | None = None
    bytes_per_step: float | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def failed(self) -> bool:
        """Whether the run stopped as failed (non-finite, or too many skipped steps)."""
        return self.status in FAILED

    def figures(self) -> dict[str, Any]:
        """Headline figures: final test accuracy and train loss, time per epoch, examples per second."""
        epochs = self.steps / self.steps_per_epoch  # fractional when a run stopped inside an epoch
        return {
            "test_acc": self.final.get("test_acc", math.nan),
            "test_loss": self.final.get("test_loss", math.nan),
            "val_acc": self.final.get("val_acc", math.nan),
            "train_loss": self.final.get("train_loss", math.nan),
            "time_per_epoch_s": self.train_time_s / epochs if epochs > 0 else math.nan,
            "examples_per_s": self.examples_seen / self.train_time_s if self.train_time_s > 0 else math.nan,
            "peak_step_memory_bytes": self.peak_step_memory_bytes,
            "skipped_steps": self.skipped_steps,
        }

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["figures"] = self.figures()
        return out

    def state(self) -> dict[str, Any]:
        """The fields as plain containers (for a checkpoint)."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in state.items() if k in names})


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # tqdm is optional (extra "progress")
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def replay_init_path(log: str | Path) -> Path:
    """Where :func:`train_run` saves the initial state dict of the replay log ``log``: ``NAME.init.pt``."""
    log = Path(log)
    return log.with_name(log.stem + ".init.pt")


def _open_replay_log(
    path: Path, shared: Any, opt: torch.optim.Optimizer, config: RunConfig, model: nn.Module, resumed: bool
) -> Any:
    from fwdgrad.distributed import ReplayLog, save_initial_state

    where = f"fwdgrad: --replay-log {path}"
    try:
        if resumed:
            return ReplayLog(path, shared, resume=shared.step_count, optimizer=opt,
                             clip_grad_norm=config.clip_grad_norm)
        log = ReplayLog(path, shared, optimizer=opt, clip_grad_norm=config.clip_grad_norm)
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('fwdgrad.distributed.ReplayLog: ')}") from None
    save_initial_state(replay_init_path(path), model.state_dict())
    return log


@dataclass
class _Run:
    """The live state of one :func:`train_run`: what its steps, epochs and checkpoints share."""

    config: RunConfig
    spec: MethodSpec
    lr: float
    splits: Splits
    seed: int
    epochs: int
    model: nn.Module
    est: Estimator
    opt: torch.optim.Optimizer
    sched: Any
    result: RunResult
    first_epoch: int
    order_hash: Any
    shared: Any = None  # the seed-shared step (fwdgrad.training.parallel.make_shared), or None
    comm: Any = None
    mode: str | None = None
    rlog: Any = None  # the replay log rank 0 writes, or None
    bar: Any = None
    log: Log | None = None
    heartbeat_s: float | None = None
    on_epoch_end: Callable[[RunResult, dict[str, Any], nn.Module], None] | None = None
    last_acc: float = math.nan
    last_beat: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits.y_train) / self.config.batch_size)

    @property
    def planned_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def reduction(self) -> str:
        return "none" if self.est.per_example_loss else "mean"


@dataclass
class _Epoch:
    """One epoch in progress: the weights to restore, where the replay log stood, the losses and skips."""

    epoch: int
    snapshot: dict[str, Any]
    logged_at_start: int
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    stop: bool = False


def _step_machinery(config: RunConfig, spec: MethodSpec, seed: int, model: nn.Module, comm: Any
                    ) -> tuple[Estimator, Any, Any, str | None]:
    """The estimator, the seed-shared step (or None), the collectives and the seed-sharing mode of a run."""
    mode = seed_shared_mode(config, spec)
    if mode is None:
        return make_estimator(spec, seed), None, comm, None
    # --parallel/--nproc, or a plain run of a method that can be shared by seed
    from fwdgrad.distributed import LocalComm

    comm = LocalComm() if comm is None else comm
    bs = config.batch_size
    if mode == "data" and bs % comm.world:
        raise ValueError(f"fwdgrad: --batch-size {bs} is not a multiple of the world size {comm.world} "
                         "(data parallelism needs shards of equal size)")
    shared = make_shared(spec, seed, model, mode, comm)
    return shared.estimator, shared, comm, mode


def _resume_state(run: _Run, resume: dict[str, Any]) -> None:
    """Load a checkpoint state into the run's model, optimizer, schedule, estimator and RNGs."""
    run.model.load_state_dict(resume["model"])
    run.opt.load_state_dict(resume["optimizer"])
    run.sched.load_state_dict(resume["scheduler"])
    set_estimator_state(run.est, resume["estimator"])
    if run.shared is not None:
        world = resume.get("world", 1)
        if "shared" not in resume or world != run.comm.world:
            raise ValueError(f"fwdgrad: --resume: the checkpoint was written by a run over {world} process(es) "
                             f"and this one has {run.comm.world}; resume with --nproc {world}")
        run.shared.load_state_dict(resume["shared"])
    set_rng_state(resume["rng"])
    run.result = RunResult.from_state(resume["result"])
    run.first_epoch = int(resume["epoch"]) + 1
    run.order_hash = order_digest(len(run.splits.y_train), run.seed, run.first_epoch - 1)


def _setup_run(config: RunConfig, spec: MethodSpec, lr: float, splits: Splits, seed: int, epochs: int,
               model: nn.Module | None, comm: Any, lr_source: str, resume: dict[str, Any] | None) -> _Run:
    """Model, estimator, optimizer, schedule and result of a new run, or of a resumed one."""
    torch.manual_seed(derived_seed(seed, "global"))  # for anything that draws from torch's global RNG
    model = initial_model(config, splits, seed) if model is None else model
    est, shared, comm, mode = _step_machinery(config, spec, seed, model, comm)
    opt = make_optimizer(config, model, lr)
    steps_per_epoch = math.ceil(len(splits.y_train) / config.batch_size)
    sched = make_scheduler(opt, config.schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                           warmup_epochs=config.warmup_epochs, step_epochs=config.step_epochs,
                           step_gamma=config.step_gamma)
    result = RunResult(
        method=spec.display, estimator=spec.name, options=dict(spec.options), seed=seed, lr=lr,
        lr_source=lr_source, num_parameters=num_parameters(model), init_digest=weights_digest(model),
    ) if resume is None else None
    run = _Run(config=config, spec=spec, lr=lr, splits=splits, seed=seed, epochs=epochs, model=model, est=est,
               opt=opt, sched=sched, result=result,  # type: ignore[arg-type]  # set by _resume_state
               first_epoch=1, order_hash=None, shared=shared, comm=comm, mode=mode)
    if resume is None:
        run.order_hash = order_digest(len(splits.y_train), seed, 0)
    else:
        _resume_state(run, resume)
    run.result.steps_per_epoch = steps_per_epoch
    if config.parallel is not None:
        run.result.world, run.result.mode = comm.world, config.parallel
    return run


def _stop(run: _Run, ep: _Epoch, status: str, message: str) -> None:
    run.result.status, run.result.message = status, message
    ep.stop = True


def _on_nonfinite_loss(run: _Run, ep: _Epoch, step: int, exc: NonFiniteError) -> None:
    """Skip the step (``on_nonfinite="skip"``, until too many are skipped) or stop the run."""
    config, result, lr = run.config, run.result, run.lr
    if config.on_nonfinite == "skip":
        ep.skipped += 1
        run.sched.step()  # the schedule follows the position in the data, skipped or not
        if run.bar is not None:
            run.bar.update(1)
        if result.skipped_steps + ep.skipped > math.floor(config.max_skip_fraction * run.planned_steps):
            _stop(run, ep, FAILED_SKIPS,
                  f"skipped {result.skipped_steps + ep.skipped} steps on a non-finite loss by epoch "
                  f"{ep.epoch}, step {step + 1}: more than {config.max_skip_fraction:.0%} of the "
                  f"{run.planned_steps} planned steps (--max-skip-fraction); the run failed. "
                  f"Try a smaller lr (it was {lr:g}).")
        return
    _stop(run, ep, STOPPED_NONFINITE,
          f"non-finite loss at epoch {ep.epoch}, step {step + 1}: {exc}. The weights are those before "
          f"that step. Try a smaller lr (it was {lr:g}) or --on-nonfinite skip.")


def _batch(run: _Run, idx: Tensor) -> tuple[Tensor, Tensor, float | None]:
    """The step's inputs and labels on the device; in data mode over several ranks, this rank's shard and
    its weight (the last batch's shards may differ)."""
    device = run.config.device
    x, y = run.splits.x_train[idx].to(device), run.splits.y_train[idx].to(device)
    if run.shared is not None and run.mode == "data" and run.comm.world > 1:
        from fwdgrad.distributed import shard_bounds

        lo, hi = shard_bounds(len(idx), run.comm.rank, run.comm.world)
        return x[lo:hi], y[lo:hi], (hi - lo) / len(idx)
    return x, y, None


def _train_step(run: _Run, ep: _Epoch, step: int, idx: Tensor) -> None:
    """One optimizer step on the examples ``idx``; on a non-finite loss, weights or the time budget it
    records why and sets ``ep.stop``."""
    config, result, model, opt, shared = run.config, run.result, run.model, run.opt, run.shared
    probe = peak_memory_probe() if result.steps == min(1, run.planned_steps - 1) else None
    t0 = time.perf_counter()
    x, y, weight = _batch(run, idx)
    reduction = run.reduction

    def loss_fn(m: nn.Module, x: Tensor = x, y: Tensor = y) -> Tensor:
        return F.cross_entropy(m(x), y, reduction=reduction)

    opt.zero_grad()
    try:
        loss = run.est(model, loss_fn) if shared is None else shared.accumulate(loss_fn, weight=weight)
    except NonFiniteError as exc:
        result.train_time_s += time.perf_counter() - t0
        _on_nonfinite_loss(run, ep, step, exc)
        return
    if config.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
    opt.step()
    if run.rlog is not None:
        assert shared is not None and shared.last_scalars is not None
        run.rlog.append_optimizer_step(shared.step_count - 1, opt.param_groups[0]["lr"], loss, shared.last_scalars)
    run.sched.step()
    result.train_time_s += time.perf_counter() - t0
    if probe is not None:
        result.peak_step_memory_bytes = probe()
    if not _params_finite(model):
        model.load_state_dict(ep.snapshot)
        if run.rlog is not None:  # the log ends where the restored weights were
            run.rlog.truncate(ep.logged_at_start)
        _stop(run, ep, STOPPED_NONFINITE,
              f"the weights became non-finite at epoch {ep.epoch}, step {step + 1} (lr {run.lr:g}); they were "
              f"restored to the start of epoch {ep.epoch} and the run stopped.")
        return
    result.steps += 1
    result.examples_seen += len(idx)
    ep.losses.append(loss.mean().item())
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(epoch=f"{ep.epoch}/{run.epochs}", loss=f"{ep.losses[-1]:.3f}", acc=f"{run.last_acc:.3f}")
    if config.time_budget is not None and result.train_time_s >= config.time_budget:
        _stop(run, ep, TIME_BUDGET, f"time budget of {config.time_budget:g} s reached during epoch {ep.epoch}")


def _train_epoch(run: _Run, epoch: int) -> _Epoch:
    """The steps of one epoch, in the seed's order for that epoch, until the epoch ends or the run stops."""
    bs = run.config.batch_size
    order = epoch_order(len(run.splits.y_train), run.seed, epoch)
    run.order_hash.update(order.numpy().tobytes())
    ep = _Epoch(epoch, snapshot=copy.deepcopy(run.model.state_dict()),
                logged_at_start=run.shared.step_count if run.shared is not None else 0)
    run.model.train()
    for step in range(run.steps_per_epoch):
        _train_step(run, ep, step, order[step * bs : (step + 1) * bs])
        if ep.stop:
            break
    run.result.skipped_steps += ep.skipped
    return ep


def _evaluate_epoch(run: _Run, ep: _Epoch) -> None:
    """Validation and test figures after an epoch (a stopped one too: its weights are the last finite
    ones), appended to the history."""
    config, splits, result = run.config, run.splits, run.result
    val_loss, val_acc = evaluate(run.model, splits.x_val, splits.y_val, config.eval_batch_size, config.device)
    test_loss, test_acc = evaluate(run.model, splits.x_test, splits.y_test, config.eval_batch_size, config.device)
    run.last_acc = test_acc
    full = not ep.stop
    result.epochs_completed = ep.epoch if full else ep.epoch - 1
    result.history.append({
        "epoch": ep.epoch, "complete": full, "steps": result.steps, "examples": result.examples_seen,
        "train_loss": sum(ep.losses) / len(ep.losses) if ep.losses else math.nan,
        "train_time_s": result.train_time_s,
        "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
        "skipped_steps": ep.skipped, "lr": run.opt.param_groups[0]["lr"],
    })
    if run.shared is not None and config.parallel is not None:
        result.bytes_per_step = run.shared.bytes_per_step
    if ep.stop or ep.epoch == run.epochs:
        result.order_digest = run.order_hash.hexdigest()[:16]


def _checkpoint_state(run: _Run, epoch: int) -> dict[str, Any]:
    """The state ``on_epoch_end`` receives and ``train_run(resume=...)`` continues from."""
    state = {
        "epoch": epoch, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(), "estimator": estimator_state(run.est), "rng": rng_state(),
        "result": run.result.state(),
    }
    if run.shared is not None:
        state["shared"], state["world"] = run.shared.state_dict(), run.comm.world
    return state


def _end_epoch(run: _Run, ep: _Epoch) -> None:
    """Evaluate, hand the checkpoint state to ``on_epoch_end``, and show progress (bar or heartbeat line)."""
    _evaluate_epoch(run, ep)
    if run.on_epoch_end is not None:
        run.on_epoch_end(run.result, _checkpoint_state(run, ep.epoch), run.model)
    if run.bar is not None:
        run.bar.set_postfix(epoch=f"{ep.epoch}/{run.epochs}", acc=f"{run.last_acc:.3f}")
    elif (run.heartbeat_s is not None and run.log is not None
          and time.perf_counter() - run.last_beat >= run.heartbeat_s):
        run.last_beat = time.perf_counter()
        h, result = run.result.history[-1], run.result
        run.log(f"{run.spec.display} seed {run.seed} epoch {ep.epoch}/{run.epochs}: train loss "
                f"{h['train_loss']:.4f}, test acc {run.last_acc:.4f}, {result.train_time_s:.1f} s of training")


def _start(run: _Run, resume: dict[str, Any] | None, replay_log: str | Path | None,
           on_start: Callable[[RunResult], None] | None) -> None:
    """Open the replay log, note an estimator state that a resume could not restore, call ``on_start``
    and open the progress bar."""
    result, spec = run.result, run.spec
    if replay_log is not None:
        if run.shared is None:
            raise ValueError("fwdgrad: a replay log needs seed-shared steps (config.parallel 'data' or 'tangent')")
        if run.comm.rank == 0:
            run.rlog = _open_replay_log(Path(replay_log), run.shared, run.opt, run.config, run.model,
                                        resume is not None)
    result.status, result.message = COMPLETED, ""
    if resume is not None and resume["estimator"].get("unsaved"):
        note = (f"resumed after epoch {run.first_epoch - 1}; the estimator's state "
                f"{resume['estimator']['unsaved']} could not be checkpointed (no state_dict), so this run may "
                "differ from an uninterrupted one")
        result.notes.append(note)
        if run.log is not None:
            run.log(f"{spec.display} seed {run.seed}: {note}")
    if on_start is not None:
        on_start(result)


def train_run(
    config: RunConfig,
    spec: MethodSpec,
    lr: float,
    splits: Splits,
    seed: int,
    *,
    lr_source: str = "",
    epochs: int | None = None,
    progress: bool = False,
    log: Log | None = None,
    model: nn.Module | None = None,
    heartbeat_s: float | None = None,
    on_epoch_end: Callable[[RunResult, dict[str, Any], nn.Module], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_start: Callable[[RunResult], None] | None = None,
    comm: Any = None,
    replay_log: str | Path | None = None,
) -> RunResult:
    """Train one method from the seed's initial weights for ``epochs`` (default ``config.epochs``),
    evaluating on the validation and test sets after every epoch.

    ``model``: train this module (in place) instead of a fresh :func:`initial_model` — for callers that
    want the trained weights. ``heartbeat_s``: without a progress bar, ``log`` an epoch line at most this
    often (for long runs written to a file). ``on_epoch_end(result, state, model)``: called after every
    epoch with the checkpoint state of the run (tensors, plain containers). ``resume``: such a state;
    the run continues after its last complete epoch. ``on_start(result)``: sees the live result first (an
    interrupted run's partial report shows it). ``comm``: the collectives of the world when
    ``config.parallel`` is set (see :mod:`fwdgrad.training.parallel`; default a world of one). A method that
    seed sharing can carry takes seed-shared steps even without ``config.parallel``, in a world of one
    (:func:`~fwdgrad.training.parallel.seed_shared_mode`): the same seed gives the same run with or without
    ``--nproc``. In data mode over several ranks each batch is split by
    :func:`~fwdgrad.distributed.shard_bounds`, each rank weighted by its share (the last batch may be smaller).
    ``replay_log``: with ``config.parallel`` set, rank 0 writes there the replay log of the run's steps
    (:class:`fwdgrad.distributed.ReplayLog`, kind ``"optimizer"``) and, on a new run, the initial state dict
    next to it (``<log>.init.pt`` with the ``.log`` suffix replaced); a resumed run continues the log from its
    checkpoint. ``fwdgrad replay LOG --init INIT.pt`` then rebuilds the trained weights bit for bit.
    """
    run = _setup_run(config, spec, lr, splits, seed, config.epochs if epochs is None else epochs, model, comm,
                     lr_source, resume)
    run.log, run.heartbeat_s, run.on_epoch_end = log, heartbeat_s, on_epoch_end
    _start(run, resume, replay_log, on_start)
    result = run.result
    run.bar = _progress(run.planned_steps, f"{spec.display} seed {seed}", progress)
    if run.bar is not None and run.first_epoch > 1:
        run.bar.update((run.first_epoch - 1) * run.steps_per_epoch)
    run.last_beat = time.perf_counter()
    epoch = run.first_epoch
    try:
        for epoch in range(run.first_epoch, run.epochs + 1):
            ep = _train_epoch(run, epoch)
            _end_epoch(run, ep)
            if ep.stop:
                break
    except KeyboardInterrupt:
        result.status = INTERRUPTED
        result.message = f"interrupted during epoch {epoch} (after {result.epochs_completed} complete epochs)"
        raise
    finally:
        if run.bar is not None:
            run.bar.close()
        if run.rlog is not None:
            run.rlog.close()
    assert _params_finite(run.model), "fwdgrad.training: internal error, non-finite weights survived"
    if log is not None and result.message and not config.quiet:  # a failed run's message is reported at the end
        log(f"{spec.display} seed {seed}: {result.message}")
    return result
