"""fwdgrad.training: fairness (same initial weights and batch order for every method of a seed),
reproducibility, learning-rate choice on the validation split only, and non-finite handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fwdgrad.data import Dataset
from fwdgrad.estimators.base import Estimator
from fwdgrad.estimators.registry import _REGISTRY, recipe, register_estimator
from fwdgrad.training import (
    choose_lr,
    default_lr,
    epoch_order,
    initial_model,
    make_estimator,
    resolve_methods,
    run_experiment,
    split_dataset,
    train_run,
    weights_digest,
)
from fwdgrad.training.config import MethodSpec, RunConfig, parse_method


def blobs(n_train: int = 96, n_test: int = 48, dim: int = 6, classes: int = 3, seed: int = 0) -> Dataset:
    """Gaussian blobs around well-separated class means: a task any working method learns quickly."""
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(classes, dim, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("blobs", x_train, y_train, x_test, y_test, classes, "generated in the test")


def tiny_config(**changes: object) -> RunConfig:
    base = RunConfig(model="mlp", model_options={"width": 8, "depth": 1}, epochs=2, batch_size=16,
                     methods=[MethodSpec("bp"), MethodSpec("fg-w", {"num_directions": 2})], quiet=True)
    return dataclasses.replace(base, **changes).validate()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_same_initial_weights_and_order_for_every_method() -> None:
    config = tiny_config(seeds=2)
    exp = run_experiment(config, "compare", dataset=blobs())
    assert len(exp.runs) == 4
    for seed in (0, 1):
        runs = [r for r in exp.runs if r.seed == seed]
        assert len({r.init_digest for r in runs}) == 1
        assert len({r.order_digest for r in runs}) == 1
    # ...and a different seed gives different weights and a different order
    assert exp.runs[0].init_digest != exp.runs[1].init_digest
    assert exp.runs[0].order_digest != exp.runs[1].order_digest


def test_initial_model_and_order_do_not_depend_on_the_global_rng() -> None:
    config = tiny_config()
    splits = split_dataset(blobs(), 0.1, None, 0)
    torch.manual_seed(123)
    a = initial_model(config, splits, 5)
    torch.randn(100)
    b = initial_model(config, splits, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert weights_digest(a) == weights_digest(b)
    assert torch.equal(epoch_order(50, 5, 3), epoch_order(50, 5, 3))
    assert not torch.equal(epoch_order(50, 5, 3), epoch_order(50, 5, 4))
    assert sorted(epoch_order(50, 5, 3).tolist()) == list(range(50))


def test_same_seed_same_figures() -> None:
    config = tiny_config()
    first = run_experiment(config, "compare", dataset=blobs())
    second = run_experiment(config, "compare", dataset=blobs())
    keys = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "steps", "examples")
    for r, s in zip(first.runs, second.runs):
        assert [[h[k] for k in keys] for h in r.history] == [[h[k] for k in keys] for h in s.history]


def test_backprop_learns_the_blobs() -> None:
    config = tiny_config(methods=[MethodSpec("bp")], epochs=5)
    exp = run_experiment(config, "train", dataset=blobs())
    assert exp.runs[0].final["test_acc"] >= 0.9
    assert exp.runs[0].history[-1]["train_loss"] < exp.runs[0].history[0]["train_loss"]


def test_validation_split_is_carved_from_training_only() -> None:
    data = blobs(n_train=100)
    splits = split_dataset(data, 0.2, None, 0)
    assert splits.sizes() == {"train": 80, "val": 20, "test": 48}
    rows = {tuple(r.tolist()) for r in splits.x_train} | {tuple(r.tolist()) for r in splits.x_val}
    assert len(rows) == 100  # disjoint, and together the whole training set
    assert torch.equal(splits.x_test, data.x_test)
    assert split_dataset(data, 0.2, 30, 0).sizes()["train"] == 30


def test_lr_sweep_never_looks_at_the_test_set() -> None:
    """Replacing the test set by garbage changes neither the chosen lr nor any sweep figure."""
    data = blobs()
    garbage = Dataset("blobs", data.x_train, data.y_train, torch.randn_like(data.x_test),
                      torch.zeros_like(data.y_test), 3, "garbage test set")
    config = tiny_config(lr_sweep=[1e-3, 0.3], sweep_epochs=2, val_fraction=0.25)
    spec = MethodSpec("bp")
    a = choose_lr(config, spec, split_dataset(data, 0.25, None, 0))
    b = choose_lr(config, spec, split_dataset(garbage, 0.25, None, 0))
    assert a == b
    assert a["lr"] == max(a["sweep"], key=lambda t: t["val_acc"])["lr"]
    assert a["lr_source"].startswith("sweep on the validation split")


def test_lr_precedence_and_defaults() -> None:
    splits = split_dataset(blobs(), 0.1, None, 0)
    assert choose_lr(tiny_config(), MethodSpec("fg-w", lr=0.5), splits)["lr"] == 0.5
    assert choose_lr(tiny_config(lr=0.25), MethodSpec("fg-w"), splits)["lr"] == 0.25
    assert choose_lr(tiny_config(), MethodSpec("fg-w"), splits)["lr"] == recipe("fg-w").default_lr["sgd"]
    # forward gradients get smaller default steps than backprop, for every optimizer
    for opt in ("sgd", "adam"):
        assert recipe("fg-w").default_lr[opt] < recipe("bp").default_lr[opt]


@pytest.fixture
def temporary_estimators():
    added: list[str] = []

    def add(name: str, cls: type[Estimator]) -> None:
        register_estimator(name, cls)
        added.append(name)

    yield add
    for name in added:
        _REGISTRY.pop(name, None)


class _Broken(Estimator):
    def estimate(self, model, loss_fn, params):
        raise NotImplementedError("this estimator only trains LocalMixer models")


def test_all_expands_the_registry_and_skips_unsuitable_methods(temporary_estimators) -> None:
    temporary_estimators("test-broken", _Broken)

    class WithDefault(_Broken):
        default_lr = 0.123

    temporary_estimators("test-default-lr", WithDefault)
    config = tiny_config(methods=[parse_method("bp"), parse_method("all")])
    splits = split_dataset(blobs(), 0.1, None, 0)
    methods, skipped = resolve_methods(config, splits)
    names = [m.name for m in methods]
    assert names[0] == "bp" and "fg-w" in names and names.count("bp") == 1
    assert "test-broken" not in names and "test-default-lr" not in names
    reasons = {s["method"]: s["reason"] for s in skipped}
    assert "only trains LocalMixer" in reasons["test-broken"] and "test-default-lr" in reasons
    assert default_lr("test-default-lr", "sgd") == (0.123, "test-default-lr.default_lr")
    assert default_lr("test-broken", "adam")[0] == recipe("fg-w").default_lr["adam"]
    with pytest.raises(ValueError, match="method 'test-broken' cannot train model 'mlp'"):
        resolve_methods(tiny_config(methods=[MethodSpec("test-broken")]), splits)


def test_estimator_options_are_checked() -> None:
    with pytest.raises(ValueError, match="estimator 'fg-w' has no option 'num_direction'"):
        make_estimator(MethodSpec("fg-w", {"num_direction": 3}), 0)
    with pytest.raises(ValueError, match="num_directions must be >= 1"):
        make_estimator(MethodSpec("fg-w", {"num_directions": 0}), 0)
    with pytest.raises(ValueError, match="estimator 'bp' has no option 'seed'"):
        make_estimator(MethodSpec("bp", {"seed": 1}), 0)


def _with_nan_example(index: int = 5) -> Dataset:
    data = blobs()
    x = data.x_train.clone()
    x[index] = math.nan
    return Dataset("blobs-nan", x, data.y_train, data.x_test, data.y_test, 3, "one NaN input")


@pytest.mark.parametrize("method", ["bp", "fg-w"])
def test_nan_loss_stops_the_run_and_weights_stay_finite(method: str) -> None:
    config = tiny_config(val_fraction=0.0, epochs=3)
    splits = split_dataset(_with_nan_example(), 0.0, None, 0)
    model = initial_model(config, splits, 0)
    before = params_of(model)
    run = train_run(config, MethodSpec(method), 0.05, splits, 0, model=model)
    assert run.status == "stopped (non-finite)"
    assert "non-finite loss at epoch 1" in run.message and "smaller lr" in run.message
    assert run.epochs_completed == 0 and run.steps < 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if run.steps > 0:  # the steps before the bad batch were applied
        assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert math.isfinite(run.final["test_acc"])  # the last finite weights are evaluated


def test_nan_loss_skip_mode_skips_only_the_bad_steps() -> None:
    # 3 of 18 steps hold the NaN example: 17 %, within a skip allowance of 20 % (the default is 10 %)
    config = tiny_config(val_fraction=0.0, epochs=3, on_nonfinite="skip", max_skip_fraction=0.2)
    splits = split_dataset(_with_nan_example(), 0.0, None, 0)
    model = initial_model(config, splits, 0)
    run = train_run(config, MethodSpec("bp"), 0.05, splits, 0, model=model)
    assert run.status == "completed" and run.epochs_completed == 3
    assert run.skipped_steps == 3  # the batch holding the NaN example, once per epoch
    assert run.steps == 3 * 6 - 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipping_more_than_the_allowed_share_fails_the_run() -> None:
    """The same data with the default allowance (10 %): the run fails at the 2nd skip (2 > 1.8 = 10 % of 18),
    and the report shows it as stopped with the skipped count."""
    config = tiny_config(val_fraction=0.0, epochs=3, on_nonfinite="skip", methods=[MethodSpec("bp")])
    exp = run_experiment(config, "train", dataset=_with_nan_example())
    (run,) = exp.runs
    assert run.status == "failed (too many skipped steps)" and run.failed
    assert run.skipped_steps == 2 and run.epochs_completed == 1
    assert "more than 10% of the 18 planned steps" in run.message
    from fwdgrad.training import report

    (row,) = report.summarize(exp)
    assert row["completed"] == 0 and row["skipped_steps"] == 2
    md = report.results_markdown(exp, "x", "cmd")
    assert "1 (1 stopped), 2 steps skipped" in md and "skipped 2 of its" in md


def test_weights_that_overflow_are_restored_and_the_run_stops() -> None:
    """A finite but enormous step (lr 1e38) overflows the weights to inf: the guard restores the weights
    of the start of the epoch and stops."""
    data = blobs()
    big = Dataset("blobs-x1e4", 1e4 * data.x_train, data.y_train, data.x_test, data.y_test, 3, "scaled")
    config = tiny_config(val_fraction=0.0, momentum=0.0)
    splits = split_dataset(big, 0.0, None, 0)
    model = initial_model(config, splits, 0)
    before = params_of(model)
    run = train_run(config, MethodSpec("bp"), 1e38, splits, 0, model=model)
    assert run.status == "stopped (non-finite)" and "restored" in run.message
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)


def test_time_budget_stops_early() -> None:
    config = tiny_config(time_budget=1e-9, epochs=5)
    run = train_run(config, MethodSpec("bp"), 0.05, split_dataset(blobs(), 0.1, None, 0), 0)
    assert run.status == "time budget" and run.steps == 1 and len(run.history) == 1
    assert run.history[0]["complete"] is False


def test_figures_and_memory_probe() -> None:
    run = train_run(tiny_config(), MethodSpec("bp"), 0.05, split_dataset(blobs(), 0.1, None, 0), 0)
    f = run.figures()
    assert f["examples_per_s"] > 0 and f["time_per_epoch_s"] > 0
    assert run.examples_seen == 2 * 86 and run.steps == 2 * 6  # 96 - round(9.6) = 86 examples
    if run.peak_step_memory_bytes is not None:  # Linux with a writable /proc/self/clear_refs
        assert 0 <= run.peak_step_memory_bytes < 2**30


def test_clip_grad_norm_bounds_every_step() -> None:
    """Plain SGD with lr 1 and gradients clipped to norm 1e-6: the weights move by at most 1e-6 per step."""
    config = tiny_config(momentum=0.0, clip_grad_norm=1e-6, epochs=1)
    splits = split_dataset(blobs(), 0.1, None, 0)
    model = initial_model(config, splits, 0)
    before = params_of(model)
    run = train_run(config, MethodSpec("fg-w"), 1.0, splits, 0, model=model)
    moved = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(before, model.parameters())))
    assert run.status == "completed" and 0 < moved <= run.steps * 1e-6 * (1 + 1e-3)
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0, got 0"):
        tiny_config(clip_grad_norm=0)


@pytest.mark.slow
def test_demo_task_learns() -> None:
    """The default task (real MNIST-1D, default mlp, default lrs): after 5 epochs backprop is well above
    chance (10 %), and activity-perturbed forward gradients are above it too. Measured at these settings:
    bp 0.505, fg-a 0.205 test accuracy (seed 0, after epoch 5 of the 50-epoch demo)."""
    from fwdgrad.data import load_dataset

    config = RunConfig(methods=[MethodSpec("bp"), MethodSpec("fg-a")], epochs=5, threads=1, quiet=True).validate()
    exp = run_experiment(config, "compare", dataset=load_dataset("mnist1d"))
    acc = {r.method: r.final["test_acc"] for r in exp.runs}
    assert acc["bp"] >= 0.4 and acc["fg-a"] >= 0.13, acc


def test_local_variants_borrow_the_default_lr_of_their_global_counterpart() -> None:

    for local, base in [("l-bp", "bp"), ("lg-bp", "bp"), ("lg-fg-a", "fg-a"), ("lg-fg-w", "fg-w")]:
        lr, source = default_lr(local, "sgd")
        assert lr == recipe(base).default_lr["sgd"]
        assert f"not swept for {local}" in source
