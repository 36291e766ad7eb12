"""A whole experiment: resolve the methods (``all`` expands the registry), choose each method's learning
rate (its own ``lr=``, else ``--lr``, else the best of ``--lr-sweep`` on a validation split carved from the
training set — never the test set —, else :func:`fwdgrad.training.lr.default_lr`), then train every method
for every seed (:func:`fwdgrad.training.loop.train_run`), each run from the same initial weights and batch
order as the other methods of its seed (:mod:`fwdgrad.training.fairness`).

:func:`run_experiment` takes ``resume=`` (a checkpoint, :mod:`fwdgrad.training.checkpoint`): finished runs
are taken from it, the interrupted run continues from its last complete epoch, the rest run as usual.
"""

from __future__ import annotations

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
from fwdgrad.estimators import available_estimators, recipe
from fwdgrad.models import num_parameters
from fwdgrad.training.checkpoint import CHECKPOINT_FORMAT
from fwdgrad.training.config import MethodSpec, RunConfig
from fwdgrad.training.fairness import DatasetLike, Splits, initial_model, split_dataset
from fwdgrad.training.loop import STOPPED_NONFINITE, Log, RunResult, make_estimator, train_run
from fwdgrad.training.lr import default_lr
from fwdgrad.training.parallel import check_shareable


def sweep_lr(
    config: RunConfig, spec: MethodSpec, splits: Splits, log: Log | None = None, comm: Any = None
) -> tuple[float, list[dict]]:
    """Train ``sweep_epochs`` epochs (first seed) with each lr of ``config.lr_sweep``; return the lr with the
    best validation accuracy (a failed trial ranks last) and every trial."""
    assert config.lr_sweep is not None
    trials = []
    for lr in config.lr_sweep:
        r = train_run(config, spec, lr, splits, config.seed, epochs=config.sweep_epochs, comm=comm)
        val_acc = r.final.get("val_acc", math.nan)
        ok = not r.failed and not math.isnan(val_acc)
        trials.append({"lr": lr, "val_acc": val_acc, "val_loss": r.final.get("val_loss", math.nan), "status": r.status})
        if log is not None:
            log(f"  lr sweep {spec.display}: lr {lr:g} → val acc {val_acc:.4f} ({r.status})")
        if not ok:
            trials[-1]["val_acc"] = -1.0
    best = max(trials, key=lambda t: t["val_acc"])
    return best["lr"], trials


def choose_lr(
    config: RunConfig, spec: MethodSpec, splits: Splits, log: Log | None = None, comm: Any = None
) -> dict[str, Any]:
    """The lr of ``spec`` and its source: the spec's ``lr``, ``config.lr``, the sweep, or the default (scaled
    to the model's number of parameters, see :func:`fwdgrad.training.lr.default_lr`)."""
    if spec.lr is not None:
        return {"lr": spec.lr, "lr_source": "method option lr="}
    if config.lr is not None:
        return {"lr": float(config.lr), "lr_source": "--lr"}
    if config.lr_sweep:
        lr, trials = sweep_lr(config, spec, splits, log, comm)
        return {"lr": lr, "lr_source": f"sweep on the validation split ({config.sweep_epochs} epochs)", "sweep": trials}
    n = num_parameters(initial_model(config, splits, config.seed))
    lr, source = default_lr(spec.name, config.optimizer, num_parameters=n)
    return {"lr": lr, "lr_source": source}


def check_methods(config: RunConfig) -> None:
    """Fail fast, before any data is read: every method name is registered (or ``all``), its options are
    accepted by the estimator (and can be shared by seed when ``config.parallel`` is set), and the model
    name (or factory) and options exist."""
    from fwdgrad.training.factories import check_model

    check_model(config.model, config.model_options)
    for spec in config.methods:
        if spec.name == "all":
            continue
        if spec.name not in available_estimators():
            raise ValueError(f"fwdgrad: unknown method {spec.name!r}; available: {available_estimators()}")
        make_estimator(spec, config.seed)
        if config.parallel is not None:
            check_shareable(spec, config.parallel)


def check_method_suits(config: RunConfig, spec: MethodSpec, splits: Splits) -> None:
    """Raise if ``spec`` cannot take one step on the model: builds it and estimates a gradient on two
    training examples, on a throwaway copy of the model (no optimizer step)."""
    model = initial_model(config, splits, config.seed)
    if recipe(spec.name).needs in ("sequence-model", "diagonal-recurrence"):
        from fwdgrad.derivatives.through_time import check_sequence_model

        check_sequence_model(f"fwdgrad: method {spec.display!r}", model)  # bp-tbptt is bp on anything else
    est = make_estimator(spec, config.seed)
    x, y = splits.x_train[:2].to(config.device), splits.y_train[:2].to(config.device)
    reduction = "none" if est.per_example_loss else "mean"
    est(model, lambda m: F.cross_entropy(m(x), y, reduction=reduction))
    if config.parallel is not None:
        check_shareable(spec, config.parallel)


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
            if log is not None and not config.quiet:  # the report lists it either way
                log(f"skipping {spec.display}: {reason}")
            continue
        chosen.append(spec)
    if not chosen:
        raise ValueError(f"fwdgrad: no method can train model {config.model!r}; skipped: {skipped}")
    return chosen, skipped


@dataclass
class Experiment:
    """Everything a report shows: the config, the data, the methods with their lrs, and every run.
    ``current`` is the run in progress (an interrupted experiment's report shows it as such)."""

    config: RunConfig
    command: str
    splits_info: dict[str, Any]
    model_info: dict[str, Any]
    methods: list[dict[str, Any]] = field(default_factory=list)
    skipped_methods: list[dict[str, str]] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""
    current: RunResult | None = None

    @property
    def all_runs(self) -> list[RunResult]:
        """The finished runs, then the one in progress if any."""
        return self.runs + ([self.current] if self.current is not None else [])

    def checkpoint(self, current: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint of this experiment; ``current``: the state of the run in progress."""
        return {
            "format": CHECKPOINT_FORMAT, "command": self.command, "config": self.config.to_dict(),
            "experiment": {"methods": self.methods, "skipped_methods": self.skipped_methods,
                           "runs": [r.state() for r in self.runs], "started_at": self.started_at},
            "current": current,
        }


def load_data(config: RunConfig) -> DatasetLike:
    """The configured dataset: a ``fwdgrad.data`` name, a user factory ``module:function``, or ``sst2`` (GLUE
    SST-2 TSV files in ``data_dir``, tokenised with the tokenizer of the ``hf`` model's folder)."""
    from fwdgrad.training.factories import load_dataset_for

    if config.dataset == "sst2" and config.prompt is not None:
        from fwdgrad.data.prompts import load_prompt_dataset

        if config.data_dir is None:
            raise ValueError("fwdgrad: --prompt needs --data-dir DIR (the task's train.tsv / dev.tsv)")
        return load_prompt_dataset(config.data_dir, config.model_options.get("path", ""), config.prompt)
    if config.dataset == "sst2":
        from pathlib import Path

        from fwdgrad.data.glue import load_sst2

        path = config.model_options.get("path") if config.model == "hf" else None
        if not path or config.data_dir is None:
            raise ValueError("fwdgrad: --dataset sst2 needs --model hf:DIR (a model folder with its tokenizer) and "
                             "--data-dir DIR (the SST-2 train.tsv / dev.tsv)")
        import json

        folder = Path(path)
        folder = folder.parent if folder.suffix == ".json" else folder
        try:  # no longer than the model's positions (64 tokens at most, the default of load_sst2)
            positions = json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 64)
        except (OSError, ValueError):
            positions = 64
        return load_sst2(config.data_dir, folder, max_length=min(64, int(positions)))
    return load_dataset_for(config.dataset, config.data_dir, download=config.download)


EpochHook = Callable[[Experiment, RunResult, dict[str, Any], nn.Module], None]


def run_experiment(
    config: RunConfig,
    command: str,
    *,
    dataset: DatasetLike | None = None,
    log: Log | None = None,
    on_run_done: Callable[[Experiment], None] | None = None,
    on_epoch_end: EpochHook | None = None,
    on_model_trained: Callable[[RunResult, nn.Module], None] | None = None,
    resume: dict[str, Any] | None = None,
    comm: Any = None,
    replay_log: Callable[[str, int], Path] | None = None,
) -> Experiment:
    """Run every method for every seed on one dataset and model.

    ``on_run_done(exp)`` sees the partial experiment after each run (the CLI writes ``results.json`` and
    the checkpoint there, so an interrupted run keeps its finished runs); ``on_epoch_end(exp, run, state,
    model)`` after every epoch of every run (``state``: the run's checkpoint state); ``on_model_trained(run,
    model)`` after each run with its trained model. ``resume``: a checkpoint written from
    :meth:`Experiment.checkpoint` with the same config. ``comm``: the world's collectives when
    ``config.parallel`` is set (:mod:`fwdgrad.training.parallel`); default a world of one.
    ``replay_log(method, seed)``: the path of each run's replay log (see :func:`~fwdgrad.training.loop.
    train_run`); ``None``: no log (the lr sweep's trials never write one).
    """
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    data = dataset if dataset is not None else load_data(config)
    splits = split_dataset(data, config.val_fraction, config.train_subset, config.seed)
    probe_model = initial_model(config, splits, config.seed)
    if config.replay_log:
        from fwdgrad.distributed import check_replayable

        check_replayable("fwdgrad: --replay-log", probe_model)  # before any training (an lr sweep included)
    exp = Experiment(
        config=config, command=command,
        splits_info={"name": splits.name, "source": splits.source, "num_classes": splits.num_classes,
                     "input_shape": list(splits.input_shape), **splits.sizes()},
        model_info={"name": config.model, "options": dict(config.model_options),
                    "num_parameters": num_parameters(probe_model), "repr": repr(probe_model)},
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    done: dict[tuple[str, int], RunResult] = {}
    current = None
    chosen: dict[str, dict[str, Any]] = {}
    if resume is not None:
        saved = resume["experiment"]
        exp.started_at = saved["started_at"]
        chosen = {m["method"]: m for m in saved["methods"]}
        done = {(r.method, r.seed): r for r in map(RunResult.from_state, saved["runs"])}
        current = resume.get("current")
    methods, exp.skipped_methods = resolve_methods(config, splits, log)
    progress = not config.quiet and sys.stderr.isatty()
    for spec in methods:
        choice = chosen.get(spec.display) or choose_lr(config, spec, splits, log, comm)
        exp.methods.append(choice if spec.display in chosen else
                           {"method": spec.display, "estimator": spec.name, "options": dict(spec.options), **choice})
        for seed in range(config.seed, config.seed + config.seeds):
            if (spec.display, seed) in done:
                exp.runs.append(done[(spec.display, seed)])
                continue
            state = current if current and (current["method"], current["seed"]) == (spec.display, seed) else None

            def epoch_hook(run: RunResult, run_state: dict[str, Any], model: nn.Module, seed: int = seed) -> None:
                if on_epoch_end is not None:
                    on_epoch_end(exp, run, {"method": run.method, "seed": seed, **run_state}, model)

            model = initial_model(config, splits, seed) if on_model_trained is not None else None
            run = train_run(config, spec, exp.methods[-1]["lr"], splits, seed, lr_source=exp.methods[-1]["lr_source"],
                            progress=progress, log=log, heartbeat_s=None if config.quiet else 10.0,
                            on_epoch_end=epoch_hook, resume=state, model=model,
                            on_start=lambda r: setattr(exp, "current", r), comm=comm,
                            replay_log=None if replay_log is None else replay_log(spec.display, seed))
            exp.current = None
            exp.runs.append(run)
            if model is not None and on_model_trained is not None:
                on_model_trained(run, model)
            if log is not None and not config.quiet:
                f = run.figures()
                log(f"{spec.display:>24} seed {seed}: test acc {f['test_acc']:.4f}, train loss {f['train_loss']:.4f}, "
                    f"{f['time_per_epoch_s']:.2f} s/epoch, lr {run.lr:g} [{run.status}]")
            if on_run_done is not None:
                on_run_done(exp)
    exp.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return exp


__all__ = ["STOPPED_NONFINITE", "Experiment", "check_methods", "choose_lr", "load_data", "resolve_methods",
           "run_experiment", "sweep_lr"]
