"""``torch.compile(model)`` with fg-w (issue 23): Dynamo cannot trace the per-module fast path (a ~100-frame
``AssertionError`` on main), so an estimator runs the compiled model's original module, whose parameters are
the same objects. The fast and the general path give the estimate of the uncompiled model, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad.estimators.base import eager_module

DT = torch.float64


def _task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), y)


def test_dispatch_unwraps_compiled_models_to_their_original_module() -> None:
    model = nn.Linear(2, 2)
    assert eager_module(torch.compile(model)) is model
    assert eager_module(model) is model


@pytest.mark.parametrize("options", [
    {},  # K = 1: the windowed fast path, the one Dynamo broke
    {"tangents": "rank1", "num_directions": 3},  # the batched fast path
    {"num_directions": 4, "fast_paths": False},  # the general (reference) path
    {"readout": "exact"},
], ids=["fast-k1", "batched-k3", "general-k4", "exact-readout"])
def test_fg_w_on_a_compiled_model_equals_the_uncompiled_estimate(options: dict) -> None:
    model, loss_fn = _task()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)
    a, b = fwdgrad.estimator("fg-w", seed=3, **options), fwdgrad.estimator("fg-w", seed=3, **options)
    for _ in range(2):
        a(model, loss_fn)
        b(compiled, loss_fn)
    for p, q in zip(model.parameters(), compiled.parameters()):
        assert type(q) is nn.Parameter and torch.equal(p.grad, q.grad)
    a.sgd_step(model, loss_fn, lr=0.1, momentum=0.9)
    b.sgd_step(compiled, loss_fn, lr=0.1, momentum=0.9)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_the_compiled_model_still_runs_compiled_after_a_step() -> None:
    """After a step the user's compiled model computes what the updated original computes (this one
    compiles: slow on CPU)."""
    model, loss_fn = _task()
    compiled = torch.compile(model)
    fwdgrad.estimator("fg-w", seed=0).sgd_step(compiled, loss_fn, lr=0.1)
    x = torch.randn(4, 6, dtype=DT)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)


def test_seed_sharing_on_a_compiled_model_equals_the_uncompiled_run() -> None:
    """SeedSharingSGD calls the estimator's step itself: it too runs the compiled model's original module."""
    from fwdgrad.distributed import SeedSharingSGD

    model, loss_fn = _task()
    twin = copy.deepcopy(model)
    plain, shared = SeedSharingSGD(model, "fg-w", seed=4), SeedSharingSGD(torch.compile(twin), "fg-w", seed=4)
    for _ in range(2):
        plain.step(loss_fn, lr=0.1)
        shared.step(loss_fn, lr=0.1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert type(q) is nn.Parameter and torch.equal(p, q)
