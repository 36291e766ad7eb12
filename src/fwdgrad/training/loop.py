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
    epochs = config.epochs if epochs is None else epochs
    device, bs = config.device, config.batch_size
    torch.manual_seed(derived_seed(seed, "global"))  # for anything that draws from torch's global RNG
    model = initial_model(config, splits, seed) if model is None else model
    shared = None
    x_train, y_train = splits.x_train, splits.y_train
    n = len(y_train)
    steps_per_epoch = math.ceil(n / bs)
    mode = seed_shared_mode(config, spec)
    if mode is not None:  # --parallel/--nproc, or a plain run of a method that can be shared by seed
        from fwdgrad.distributed import LocalComm, shard_bounds

        comm = LocalComm() if comm is None else comm
        if mode == "data" and bs % comm.world:
            raise ValueError(f"fwdgrad: --batch-size {bs} is not a multiple of the world size {comm.world} "
                             "(data parallelism needs shards of equal size)")
        shared = make_shared(spec, seed, model, mode, comm)
        est = shared.estimator
    else:
        est = make_estimator(spec, seed)
    opt = make_optimizer(config, model, lr)
    reduction = "none" if est.per_example_loss else "mean"
    sched = make_scheduler(opt, config.schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                           warmup_epochs=config.warmup_epochs, step_epochs=config.step_epochs,
                           step_gamma=config.step_gamma)
    planned_steps = epochs * steps_per_epoch
    max_skips = math.floor(config.max_skip_fraction * planned_steps)
    if resume is None:
        result = RunResult(
            method=spec.display, estimator=spec.name, options=dict(spec.options), seed=seed, lr=lr,
            lr_source=lr_source, num_parameters=num_parameters(model), init_digest=weights_digest(model),
        )
        first_epoch = 1
        order_hash = order_digest(n, seed, 0)
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        set_estimator_state(est, resume["estimator"])
        if shared is not None:
            if "shared" not in resume or resume.get("world", 1) != comm.world:
                raise ValueError(f"fwdgrad: --resume: the checkpoint was written by a run over "
                                 f"{resume.get('world', 1)} process(es) and this one has {comm.world}; resume "
                                 f"with --nproc {resume.get('world', 1)}")
            shared.load_state_dict(resume["shared"])
        set_rng_state(resume["rng"])
        result = RunResult.from_state(resume["result"])
        first_epoch = int(resume["epoch"]) + 1
        order_hash = order_digest(n, seed, first_epoch - 1)
    result.steps_per_epoch = steps_per_epoch
    if config.parallel is not None:
        result.world, result.mode = comm.world, config.parallel
    rlog = None
    if replay_log is not None:
        if shared is None:
            raise ValueError("fwdgrad: a replay log needs seed-shared steps (config.parallel 'data' or 'tangent')")
        if comm.rank == 0:
            rlog = _open_replay_log(Path(replay_log), shared, opt, config, model, resume is not None)
    result.status, result.message = COMPLETED, ""
    if resume is not None and resume["estimator"].get("unsaved"):
        note = (f"resumed after epoch {first_epoch - 1}; the estimator's state {resume['estimator']['unsaved']} "
                "could not be checkpointed (no state_dict), so this run may differ from an uninterrupted one")
        result.notes.append(note)
        if log is not None:
            log(f"{spec.display} seed {seed}: {note}")
    if on_start is not None:
        on_start(result)
    bar = _progress(planned_steps, f"{spec.display} seed {seed}", progress)
    if bar is not None and first_epoch > 1:
        bar.update((first_epoch - 1) * steps_per_epoch)
    last_acc = math.nan
    last_beat = time.perf_counter()
    stop = False
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, epochs + 1):
            order = epoch_order(n, seed, epoch)
            order_hash.update(order.numpy().tobytes())
            snapshot = copy.deepcopy(model.state_dict())
            logged_at_start = shared.step_count if shared is not None else 0
            model.train()
            losses: list[float] = []
            skipped = 0
            for step in range(steps_per_epoch):
                idx = order[step * bs : (step + 1) * bs]
                probe = peak_memory_probe() if result.steps == min(1, planned_steps - 1) else None
                t0 = time.perf_counter()
                x, y = x_train[idx].to(device), y_train[idx].to(device)
                weight = None
                if shared is not None and mode == "data" and comm.world > 1:  # the last batch's shards may differ
                    lo, hi = shard_bounds(len(idx), comm.rank, comm.world)
                    x, y, weight = x[lo:hi], y[lo:hi], (hi - lo) / len(idx)

                def loss_fn(m: nn.Module, x: Tensor = x, y: Tensor = y) -> Tensor:
                    return F.cross_entropy(m(x), y, reduction=reduction)

                opt.zero_grad()
                try:
                    loss = est(model, loss_fn) if shared is None else shared.accumulate(loss_fn, weight=weight)
                except NonFiniteError as exc:
                    result.train_time_s += time.perf_counter() - t0
                    if config.on_nonfinite == "skip":
                        skipped += 1
                        sched.step()  # the schedule follows the position in the data, skipped or not
                        if bar is not None:
                            bar.update(1)
                        if result.skipped_steps + skipped > max_skips:
                            result.status = FAILED_SKIPS
                            result.message = (
                                f"skipped {result.skipped_steps + skipped} steps on a non-finite loss by epoch "
                                f"{epoch}, step {step + 1}: more than {config.max_skip_fraction:.0%} of the "
                                f"{planned_steps} planned steps (--max-skip-fraction); the run failed. "
                                f"Try a smaller lr (it was {lr:g})."
                            )
                            stop = True
                            break
                        continue
                    result.status = STOPPED_NONFINITE
                    result.message = (
                        f"non-finite loss at epoch {epoch}, step {step + 1}: {exc}. The weights are those before "
                        f"that step. Try a smaller lr (it was {lr:g}) or --on-nonfinite skip."
                    )
                    stop = True
                    break
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                opt.step()
                if rlog is not None:
                    assert shared is not None and shared.last_scalars is not None
                    rlog.append_optimizer_step(shared.step_count - 1, opt.param_groups[0]["lr"], loss,
                                               shared.last_scalars)
                sched.step()
                result.train_time_s += time.perf_counter() - t0
                if probe is not None:
                    result.peak_step_memory_bytes = probe()
                if not _params_finite(model):
                    model.load_state_dict(snapshot)
                    if rlog is not None:  # the log ends where the restored weights were
                        rlog.truncate(logged_at_start)
                    result.status = STOPPED_NONFINITE
                    result.message = (
                        f"the weights became non-finite at epoch {epoch}, step {step + 1} (lr {lr:g}); they were "
                        f"restored to the start of epoch {epoch} and the run stopped."
                    )
                    stop = True
                    break
                result.steps += 1
                result.examples_seen += len(idx)
                losses.append(loss.mean().item())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{losses[-1]:.3f}", acc=f"{last_acc:.3f}")
                if config.time_budget is not None and result.train_time_s >= config.time_budget:
                    result.status = TIME_BUDGET
                    result.message = f"time budget of {config.time_budget:g} s reached during epoch {epoch}"
                    stop = True
                    break
            result.skipped_steps += skipped
            # Evaluate after every epoch, a stopped one too (its weights are the last finite ones).
            val_loss, val_acc = evaluate(model, splits.x_val, splits.y_val, config.eval_batch_size, device)
            test_loss, test_acc = evaluate(model, splits.x_test, splits.y_test, config.eval_batch_size, device)
            last_acc = test_acc
            full = not stop
            result.epochs_completed = epoch if full else epoch - 1
            result.history.append({
                "epoch": epoch, "complete": full, "steps": result.steps, "examples": result.examples_seen,
                "train_loss": sum(losses) / len(losses) if losses else math.nan,
                "train_time_s": result.train_time_s,
                "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                "skipped_steps": skipped, "lr": opt.param_groups[0]["lr"],
            })
            if shared is not None and config.parallel is not None:
                result.bytes_per_step = shared.bytes_per_step
            if stop or epoch == epochs:
                result.order_digest = order_hash.hexdigest()[:16]
            if on_epoch_end is not None:
                state = {
                    "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "estimator": estimator_state(est), "rng": rng_state(),
                    "result": result.state(),
                }
                if shared is not None:
                    state["shared"], state["world"] = shared.state_dict(), comm.world
                on_epoch_end(result, state, model)
            if bar is not None:
                bar.set_postfix(epoch=f"{epoch}/{epochs}", acc=f"{last_acc:.3f}")
            elif heartbeat_s is not None and log is not None and time.perf_counter() - last_beat >= heartbeat_s:
                last_beat = time.perf_counter()
                h = result.history[-1]
                log(f"{spec.display} seed {seed} epoch {epoch}/{epochs}: train loss {h['train_loss']:.4f}, "
                    f"test acc {test_acc:.4f}, {result.train_time_s:.1f} s of training")
            if stop:
                break
    except KeyboardInterrupt:
        result.status = INTERRUPTED
        result.message = f"interrupted during epoch {epoch} (after {result.epochs_completed} complete epochs)"
        raise
    finally:
        if bar is not None:
            bar.close()
        if rlog is not None:
            rlog.close()
    assert _params_finite(model), "fwdgrad.training: internal error, non-finite weights survived"
    if log is not None and result.message and not config.quiet:  # a failed run's message is reported at the end
        log(f"{spec.display} seed {seed}: {result.message}")
    return result
