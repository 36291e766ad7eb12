"""The training loop behind ``fwdgrad train`` and ``fwdgrad compare``: plain, and fair across methods.

One step of every method is the same three lines; only the estimator differs::

    opt.zero_grad()
    loss = est(model, lambda m: F.cross_entropy(m(x), y))   # writes the gradient (estimate) into .grad
    opt.step()

Fairness, for a given seed: every method starts from the same initial weights (built under
``torch.manual_seed(derived_seed(seed, "init"))``), sees the same batches in the same order (a
``torch.Generator`` per epoch seeded from ``(seed, epoch)``), and gets the same budget (``epochs``, and
``time_budget`` seconds of training when set). Each run records a SHA-256 digest of its initial weights
and of its batch order, so a report shows that the guarantee held.

Learning rates: the method's own ``lr=``, else ``--lr``, else the best of ``--lr-sweep`` on a validation
split carved from the training set (never the test set), else the default of the estimator's recipe
(:func:`fwdgrad.estimators.default_lr`), measured on the default task.

A NaN/Inf loss or estimate raises :class:`fwdgrad.NonFiniteError` inside the estimator before any
gradient is written; the run then stops with a message (``on_nonfinite="stop"``) or skips that step
(``"skip"``). Weights are checked after every optimizer step too; should they become non-finite, the
weights of the start of the epoch are restored and the run stops. No NaN ever stays in the weights.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad._procmem import reset_peak_rss, status_kib
from fwdgrad.config import MethodSpec, RunConfig
from fwdgrad.errors import NonFiniteError
from fwdgrad.estimators import Estimator, available_estimators, estimator, estimator_options
from fwdgrad.estimators import default_lr as recipe_default_lr
from fwdgrad.models import build_model, num_parameters

Tensor = torch.Tensor
Log = Callable[[str], None]

class DatasetLike(Protocol):
    """What the loop needs from a :class:`fwdgrad.data.Dataset`."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]: ...


@dataclass
class Splits:
    """Train / validation / test tensors. The validation split is carved from the training set."""

    name: str
    source: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (``"init"``, ``"order:3"``…) from the run seed, stable across processes.

    >>> derived_seed(0, "init") == derived_seed(0, "init") != derived_seed(1, "init")
    True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:7], "little")


def split_dataset(dataset: DatasetLike, val_fraction: float, train_subset: int | None, seed: int) -> Splits:
    """Hold out ``round(val_fraction · N)`` training examples for validation (seeded permutation), then keep
    the first ``train_subset`` of the rest (all when ``None``). The test set is passed through untouched."""
    n = len(dataset.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, "split")))
    n_val = round(val_fraction * n)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    train_idx = train_idx.sort().values
    if len(train_idx) == 0:
        raise ValueError(f"fwdgrad.train: no training example left after the validation split of {n}")
    return Splits(
        name=dataset.name, source=str(dataset.source), num_classes=int(dataset.num_classes),
        input_shape=tuple(dataset.input_shape),
        x_train=dataset.x_train[train_idx], y_train=dataset.y_train[train_idx],
        x_val=dataset.x_train[val_idx], y_val=dataset.y_train[val_idx],
        x_test=dataset.x_test, y_test=dataset.y_test,
    )


def epoch_order(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The permutation of the training set for ``epoch`` (1-based): a function of ``(seed, epoch)`` only,
    so every method sees the same batches in the same order."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(derived_seed(seed, f"order:{epoch}")))


def initial_model(config: RunConfig, splits: Splits, seed: int) -> nn.Module:
    """The model with the initial weights of ``seed`` (the global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "init"))
        model = build_model(config.model, splits.input_shape, splits.num_classes, **config.model_options)
    return model.to(config.device)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def default_lr(name: str, optimizer: str) -> tuple[float, str]:
    """The default learning rate of method ``name`` and where it comes from: the estimator recipe's
    (:func:`fwdgrad.estimators.default_lr`)."""
    return recipe_default_lr(name, optimizer)


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


# --- peak memory of one step -------------------------------------------------------------------------
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def peak_memory_probe() -> Callable[[], int | None] | None:
    """Start measuring the peak resident memory of what runs next; call the result to get the growth in
    bytes. Linux only (``None`` elsewhere, or when ``/proc/self/clear_refs`` is not writable).

    How: collect garbage and return freed heap to the OS (``malloc_trim``), read the resident set size,
    reset the kernel's high-water mark (write ``5`` to ``/proc/self/clear_refs``), run, then read the
    high-water mark ``VmHWM``. The difference is the extra resident memory the step needed at its peak:
    activations, tangents, gradients and optimizer temporaries, whoever allocated them (torch, BLAS).
    """
    if _LIBC is None:
        return None
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    before = status_kib("VmRSS")
    if not reset_peak_rss() or before is None:
        return None

    def stop() -> int | None:
        peak = status_kib("VmHWM")
        return None if peak is None else max(0, peak - before) * 1024

    return stop


# --- one run --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One method, one seed: the per-epoch history and the figures of the report."""

    method: str
    estimator: str
    options: dict[str, Any]
    seed: int
    lr: float
    lr_source: str
    status: str = "completed"  # completed | time budget | stopped (non-finite)
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

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

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
        }

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["figures"] = self.figures()
        return out


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
) -> RunResult:
    """Train one method from the seed's initial weights for ``epochs`` (default ``config.epochs``),
    evaluating on the validation and test sets after every epoch.

    ``model``: train this module (in place) instead of a fresh :func:`initial_model` — for callers that
    want the trained weights. ``heartbeat_s``: without a progress bar, ``log`` an epoch line at most this
    often (for long runs written to a file).
    """
    epochs = config.epochs if epochs is None else epochs
    device, bs = config.device, config.batch_size
    torch.manual_seed(derived_seed(seed, "global"))  # for anything that draws from torch's global RNG
    model = initial_model(config, splits, seed) if model is None else model
    est = make_estimator(spec, seed)
    opt = make_optimizer(config, model, lr)
    reduction = "none" if est.per_example_loss else "mean"
    result = RunResult(
        method=spec.display, estimator=spec.name, options=dict(spec.options), seed=seed, lr=lr,
        lr_source=lr_source, num_parameters=num_parameters(model), init_digest=weights_digest(model),
    )
    x_train, y_train = splits.x_train, splits.y_train
    n = len(y_train)
    steps_per_epoch = math.ceil(n / bs)
    result.steps_per_epoch = steps_per_epoch
    order_hash = hashlib.sha256()
    bar = _progress(epochs * steps_per_epoch, f"{spec.display} seed {seed}", progress)
    last_acc = math.nan
    last_beat = time.perf_counter()
    stop = False
    for epoch in range(1, epochs + 1):
        order = epoch_order(n, seed, epoch)
        order_hash.update(order.numpy().tobytes())
        snapshot = copy.deepcopy(model.state_dict())
        model.train()
        losses: list[float] = []
        skipped = 0
        for step in range(steps_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            probe = peak_memory_probe() if result.steps == min(1, steps_per_epoch * epochs - 1) else None
            t0 = time.perf_counter()
            x, y = x_train[idx].to(device), y_train[idx].to(device)

            def loss_fn(m: nn.Module, x: Tensor = x, y: Tensor = y) -> Tensor:
                return F.cross_entropy(m(x), y, reduction=reduction)

            opt.zero_grad()
            try:
                loss = est(model, loss_fn)
            except NonFiniteError as exc:
                result.train_time_s += time.perf_counter() - t0
                if config.on_nonfinite == "skip":
                    skipped += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                result.status = "stopped (non-finite)"
                result.message = (
                    f"non-finite loss at epoch {epoch}, step {step + 1}: {exc}. The weights are those before "
                    f"that step. Try a smaller lr (it was {lr:g}) or --on-nonfinite skip."
                )
                stop = True
                break
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            opt.step()
            result.train_time_s += time.perf_counter() - t0
            if probe is not None:
                result.peak_step_memory_bytes = probe()
            if not _params_finite(model):
                model.load_state_dict(snapshot)
                result.status = "stopped (non-finite)"
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
                result.status = "time budget"
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
            "skipped_steps": skipped,
        })
        if bar is not None:
            bar.set_postfix(epoch=f"{epoch}/{epochs}", acc=f"{last_acc:.3f}")
        elif heartbeat_s is not None and log is not None and time.perf_counter() - last_beat >= heartbeat_s:
            last_beat = time.perf_counter()
            h = result.history[-1]
            log(f"{spec.display} seed {seed} epoch {epoch}/{epochs}: train loss {h['train_loss']:.4f}, "
                f"test acc {test_acc:.4f}, {result.train_time_s:.1f} s of training")
        if stop:
            break
    if bar is not None:
        bar.close()
    result.order_digest = order_hash.hexdigest()[:16]
    assert _params_finite(model), "fwdgrad.train: internal error, non-finite weights survived"
    if log is not None and result.message:
        log(f"{spec.display} seed {seed}: {result.message}")
    return result


# --- learning rates and methods -------------------------------------------------------------------------
def sweep_lr(config: RunConfig, spec: MethodSpec, splits: Splits, log: Log | None = None) -> tuple[float, list[dict]]:
    """Train ``sweep_epochs`` epochs (first seed) with each lr of ``config.lr_sweep``; return the lr with the
    best validation accuracy (a stopped trial ranks last) and every trial."""
    assert config.lr_sweep is not None
    trials = []
    for lr in config.lr_sweep:
        r = train_run(config, spec, lr, splits, config.seed, epochs=config.sweep_epochs)
        val_acc = r.final.get("val_acc", math.nan)
        ok = r.status != "stopped (non-finite)" and not math.isnan(val_acc)
        trials.append({"lr": lr, "val_acc": val_acc, "val_loss": r.final.get("val_loss", math.nan), "status": r.status})
        if log is not None:
            log(f"  lr sweep {spec.display}: lr {lr:g} → val acc {val_acc:.4f} ({r.status})")
        if not ok:
            trials[-1]["val_acc"] = -1.0
    best = max(trials, key=lambda t: t["val_acc"])
    return best["lr"], trials


def choose_lr(config: RunConfig, spec: MethodSpec, splits: Splits, log: Log | None = None) -> dict[str, Any]:
    """The lr of ``spec`` and its source: the spec's ``lr``, ``config.lr``, the sweep, or the default."""
    if spec.lr is not None:
        return {"lr": spec.lr, "lr_source": "method option lr="}
    if config.lr is not None:
        return {"lr": float(config.lr), "lr_source": "--lr"}
    if config.lr_sweep:
        lr, trials = sweep_lr(config, spec, splits, log)
        return {"lr": lr, "lr_source": f"sweep on the validation split ({config.sweep_epochs} epochs)", "sweep": trials}
    lr, source = default_lr(spec.name, config.optimizer)
    return {"lr": lr, "lr_source": source}


def check_methods(config: RunConfig) -> None:
    """Fail fast, before any data is read: every method name is registered (or ``all``), its options are
    accepted by the estimator, and the model name and options exist."""
    from fwdgrad.models import model_builder, model_options

    model_builder(config.model)
    unknown = sorted(set(config.model_options) - set(model_options(config.model)))
    if unknown:
        raise ValueError(f"fwdgrad: model {config.model!r} has no option {unknown[0]!r}; "
                         f"options: {sorted(model_options(config.model))}")
    for spec in config.methods:
        if spec.name == "all":
            continue
        if spec.name not in available_estimators():
            raise ValueError(f"fwdgrad: unknown method {spec.name!r}; available: {available_estimators()}")
        make_estimator(spec, config.seed)


def check_method_suits(config: RunConfig, spec: MethodSpec, splits: Splits) -> None:
    """Raise if ``spec`` cannot take one step on the model: builds it and estimates a gradient on two
    training examples, on a throwaway copy of the model (no optimizer step)."""
    model = initial_model(config, splits, config.seed)
    est = make_estimator(spec, config.seed)
    x, y = splits.x_train[:2].to(config.device), splits.y_train[:2].to(config.device)
    reduction = "none" if est.per_example_loss else "mean"
    est(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))


def resolve_methods(
    config: RunConfig, splits: Splits, log: Log | None = None
) -> tuple[list[MethodSpec], list[dict[str, str]]]:
    """Expand ``all`` into every registered estimator not listed explicitly, and check that each method can
    train the model. An explicit method that cannot raises ``ValueError``; one from ``all`` is skipped and
    reported as ``{"method", "reason"}``."""
    explicit = [m for m in config.methods if m.name != "all"]
    for m in config.methods:
        if m.name == "all" and (m.options or m.lr is not None or m.label):
            raise ValueError("fwdgrad: 'all' takes no options; list the method by name to give options")
    listed = {m.name for m in explicit}
    expanded: list[tuple[MethodSpec, bool]] = []
    for m in config.methods:
        if m.name == "all":
            expanded += [(MethodSpec(name), False) for name in available_estimators() if name not in listed]
            listed |= set(available_estimators())
        else:
            expanded.append((m, True))
    chosen, skipped = [], []
    for spec, is_explicit in expanded:
        if spec.name not in available_estimators():
            raise ValueError(f"fwdgrad: unknown method {spec.name!r}; available: {available_estimators()}")
        try:
            check_method_suits(config, spec, splits)
        except NonFiniteError:
            pass  # the method ran; a non-finite loss is the training loop's business
        except Exception as exc:  # any failure means: this method cannot train this model
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if is_explicit:
                raise ValueError(
                    f"fwdgrad: method {spec.display!r} cannot train model {config.model!r}: {reason}"
                ) from exc
            skipped.append({"method": spec.display, "reason": reason})
            if log is not None:
                log(f"skipping {spec.display}: {reason}")
            continue
        chosen.append(spec)
    if not chosen:
        raise ValueError(f"fwdgrad: no method can train model {config.model!r}; skipped: {skipped}")
    return chosen, skipped


# --- a whole experiment ---------------------------------------------------------------------------------
@dataclass
class Experiment:
    """Everything a report shows: the config, the data, the methods with their lrs, and every run."""

    config: RunConfig
    command: str
    splits_info: dict[str, Any]
    model_info: dict[str, Any]
    methods: list[dict[str, Any]] = field(default_factory=list)
    skipped_methods: list[dict[str, str]] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""


def load_data(config: RunConfig) -> DatasetLike:
    """``fwdgrad.data.load_dataset`` for the configured dataset."""
    from fwdgrad.data import load_dataset

    return load_dataset(config.dataset, config.data_dir, download=config.download)


def run_experiment(
    config: RunConfig,
    command: str,
    *,
    dataset: DatasetLike | None = None,
    log: Log | None = None,
    on_run_done: Callable[[Experiment], None] | None = None,
) -> Experiment:
    """Run every method for every seed on one dataset and model; ``on_run_done`` sees the partial
    experiment after each run (the CLI writes ``results.json`` there, so an interrupted run keeps its
    finished runs)."""
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = dataset if dataset is not None else load_data(config)
    splits = split_dataset(data, config.val_fraction, config.train_subset, config.seed)
    probe_model = initial_model(config, splits, config.seed)
    exp = Experiment(
        config=config, command=command,
        splits_info={"name": splits.name, "source": splits.source, "num_classes": splits.num_classes,
                     "input_shape": list(splits.input_shape), **splits.sizes()},
        model_info={"name": config.model, "options": dict(config.model_options),
                    "num_parameters": num_parameters(probe_model), "repr": repr(probe_model)},
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    methods, exp.skipped_methods = resolve_methods(config, splits, log)
    progress = not config.quiet and sys.stderr.isatty()
    for spec in methods:
        choice = choose_lr(config, spec, splits, log)
        exp.methods.append({"method": spec.display, "estimator": spec.name, "options": dict(spec.options), **choice})
        for seed in range(config.seed, config.seed + config.seeds):
            run = train_run(config, spec, choice["lr"], splits, seed, lr_source=choice["lr_source"],
                            progress=progress, log=log, heartbeat_s=None if config.quiet else 10.0)
            exp.runs.append(run)
            if log is not None and not config.quiet:
                f = run.figures()
                log(f"{spec.display:>24} seed {seed}: test acc {f['test_acc']:.4f}, train loss {f['train_loss']:.4f}, "
                    f"{f['time_per_epoch_s']:.2f} s/epoch, lr {choice['lr']:g} [{run.status}]")
            if on_run_done is not None:
                on_run_done(exp)
    exp.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return exp
