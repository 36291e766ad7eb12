"""Forward mode through time, exact forward-propagated gradients, spikes: each checked against autograd (BPTT)
in float64 on small random problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from data_fixtures import make_idx_files
from fwdgrad.data import RESOURCES, load_dataset
from fwdgrad.derivatives.diagonal_recurrence import forward_exact_gradient
from fwdgrad.derivatives.spiking import SURROGATES, Spike, spike, spike_fgi, surrogate_derivative
from fwdgrad.derivatives.through_time import (
    WindowedSequence,
    online_forward_gradient,
    run_sequence,
)
from fwdgrad.directions import sample_tangents
from fwdgrad.directions.stateful import MomentumDirections
from fwdgrad.models import build_model
from fwdgrad.models.spiking import latency_encode, rate_encode
from problems import RaisingBackward

TOL = 1e-10
T, B, F_IN, CLASSES = 9, 4, 3, 5


def _data(seed: int = 0, steps: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, steps, F_IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (B,), generator=g)


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if name == "rnn":
        from fwdgrad.models.recurrent import RecurrentClassifier

        return RecurrentClassifier((T, F_IN), CLASSES, cell="rnn", hidden=6).double()
    if name in ("lif", "leaky", "lif-recurrent"):
        # input weights scaled up so that the LIF neurons cross threshold on random inputs
        if name == "lif-recurrent":
            name, kw = "lif", {**kw, "recurrent": True}
        m = build_model("lif", (T, F_IN), CLASSES, hidden=6, neuron=name, **kw).double()
        with torch.no_grad():
            m.cell.input_layer.weight.mul_(3.0)
        return m
    return build_model(name, (T, F_IN), CLASSES, hidden=6).double()


def _bptt(model: nn.Module, loss_fn) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model), params))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm", "lif", "leaky", "lif-recurrent"])
def test_online_fg_whole_window_is_the_bptt_directional_derivative(name):
    model = _model(name, learn_decay=True) if name.startswith(("lif", "leaky")) else _model(name)
    x, y = _data()
    grads = _bptt(model, lambda m: F.cross_entropy(m(x), y))
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    exact = sum((g * t).sum() for g, t in zip(grads, v))
    res = online_forward_gradient(
        model, x, lambda t, s: F.cross_entropy(model.readout(s), y) if t == T - 1 else None,
        directions=lambda like, g: v,
    )  # fmt: skip
    assert res.derivatives.shape == (1,)
    assert _rel(res.derivatives[0], exact) < TOL
    assert abs(float(res.loss) - float(F.cross_entropy(model(x), y).detach())) < TOL
    # the registered estimator: same derivative times the direction drawn from its seed
    est = fwdgrad.estimator("online-fg", seed=7)
    for p in params:
        p.grad = None
    est(model, lambda m: F.cross_entropy(m(x), y))
    vs = [t[0] for t in sample_tangents("gaussian", [p.detach() for p in params], 1, torch.Generator().manual_seed(7))]
    d = sum((g * t).sum() for g, t in zip(grads, vs))
    for p, t in zip(params, vs):
        torch.testing.assert_close(p.grad, d * t, rtol=TOL, atol=TOL * float(d.abs()))


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("window", [1, 4, 5])
def test_online_fg_window_is_the_truncated_bptt_directional_derivative(name, window):
    model = _model(name)
    x, y = _data(1)
    truncated = _bptt(model, lambda m: F.cross_entropy(WindowedSequence(m, window, truncate=True)(x), y))
    full = _bptt(model, lambda m: F.cross_entropy(m(x), y))
    assert any(_rel(a, b) > 1e-3 for a, b in zip(truncated, full))  # truncation changes the gradient
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    res = online_forward_gradient(
        model, x, lambda t, s: F.cross_entropy(model.readout(s), y) if t == T - 1 else None,
        window=window, directions=lambda like, g: v,
    )  # fmt: skip
    assert res.derivatives.shape == (-(-T // window),)
    assert _rel(res.derivatives[-1], sum((g * t).sum() for g, t in zip(truncated, v))) < TOL
    assert torch.all(res.derivatives[:-1] == 0)  # no loss in the earlier windows
    # bp-tbptt writes the same truncated gradient
    for p in params:
        p.grad = None
    fwdgrad.estimator("bp-tbptt", window=window)(model, lambda m: F.cross_entropy(m(x), y))
    for p, g in zip(params, truncated):
        torch.testing.assert_close(p.grad, g, rtol=TOL, atol=TOL)


def test_online_updates_every_window_use_the_new_parameters():
    model = _model("gru")
    x, y = _data(2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []

    def step_loss(t, s):
        return F.cross_entropy(model.readout(s), y)  # a loss at every step

    def update(k, loss, estimate):
        seen.append(model.fc.bias.detach().clone())
        for n, p in model.named_parameters():
            p.grad = estimate[n]
        opt.step()

    res = online_forward_gradient(
        model, x, step_loss, window=3, generator=torch.Generator().manual_seed(0), on_window=update
    )
    assert len(seen) == 3 and res.window_losses.shape == (3,)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert bool((res.derivatives != 0).all())


def test_online_fg_runs_no_backward():
    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(F_IN + 4, 4)

        def forward(self, x_t, h):
            return RaisingBackward.apply(self.lin(torch.cat([x_t, h], -1)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.fc = Cell(), nn.Linear(4, CLASSES)

        def to_sequence(self, x):
            return x

        def init_state(self, batch, like):
            return like.new_zeros(batch, 4)

        def readout(self, state):
            return self.fc(state)

        def forward(self, x):
            return run_sequence(self, x)

    model = Net().double()
    x, y = _data(3)
    with pytest.raises(RuntimeError, match="RaisingBackward"):
        F.cross_entropy(model(x), y).backward()
    loss = fwdgrad.estimator("online-fg", window=4, seed=0)(model, lambda m: F.cross_entropy(m(x), y))
    assert torch.isfinite(loss) and model.cell.lin.weight.grad is not None


@pytest.mark.parametrize("neuron", ["lif", "leaky"])
@pytest.mark.parametrize("chunk", [None, 1, 4, T])
@pytest.mark.parametrize("learn_decay", [False, True])
def test_forward_exact_is_the_bptt_gradient(neuron, chunk, learn_decay):
    model = _model(neuron, learn_decay=learn_decay)
    x, y = _data(4)

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    spikes = run_sequence(model, x)  # the LIF layer must spike for the test to mean something
    assert torch.isfinite(spikes).all()
    if neuron == "lif":
        seq_state = model.init_state(B, x)
        rates = []
        for t in range(T):
            seq_state = model.cell(x[:, t], seq_state)
            rates.append(seq_state[1])
        assert 0 < float(rates[-1].detach().mean()) < 1.0  # some neurons fire, not all at every step
    grads = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], _bptt(model, loss_fn)))
    loss, exact = forward_exact_gradient(model, loss_fn, chunk=chunk)
    assert abs(float(loss) - float(loss_fn(model).detach())) < TOL
    assert sorted(exact) == sorted(grads)
    for n in grads:
        assert _rel(exact[n], grads[n]) < TOL, n
        assert float(grads[n].abs().max()) > 0, n
    for p in model.parameters():
        p.grad = None
    fwdgrad.estimator("forward-exact", chunk=chunk)(model, loss_fn)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=TOL, atol=TOL)


def test_forward_exact_refuses_models_without_diagonal_recurrence():
    x, y = _data()
    with pytest.raises(TypeError, match="diagonal recurrence"):
        fwdgrad.estimator("forward-exact")(_model("gru"), lambda m: F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match=r"cell\.recurrent\.weight"):
        fwdgrad.estimator("forward-exact")(_model("lif-recurrent"), lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize("name", SURROGATES)
@pytest.mark.parametrize("fn", [spike, spike_fgi])
def test_surrogate_jvp_and_backward(name, fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    x_dot = torch.randn(50, generator=g, dtype=torch.float64)
    g_bar = torch.randn(50, generator=g, dtype=torch.float64)
    slope = {"fast-sigmoid": 10.0, "triangle": 1.0, "arctan": 2.0}[name]
    if name == "fast-sigmoid":
        expected = 1 / (1 + slope * x.abs()) ** 2
    elif name == "triangle":
        expected = (1 - slope * x.abs()).clamp(min=0)
    else:
        expected = (slope / 2) / (1 + (torch.pi * slope / 2 * x) ** 2)
    torch.testing.assert_close(surrogate_derivative(x, name), expected, rtol=1e-14, atol=0)
    out, jvp = torch.func.jvp(lambda u: fn(u, name), (x,), (x_dot,))
    assert torch.equal(out, (x >= 0).double())
    torch.testing.assert_close(jvp, expected * x_dot, rtol=1e-14, atol=0)
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(xr, name), xr, g_bar)
    torch.testing.assert_close(grad, expected * g_bar, rtol=1e-14, atol=0)


def test_spike_function_under_forward_ad_module_api():
    import torch.autograd.forward_ad as fwAD

    x = torch.tensor([-0.3, 0.2], dtype=torch.float64)
    with fwAD.dual_level():
        out = Spike.apply(fwAD.make_dual(x, torch.ones_like(x)), "arctan", 2.0)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, surrogate_derivative(x, "arctan"))


def test_encodings():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 20, generator=g)
    spikes = rate_encode(p, 400, torch.Generator().manual_seed(1))
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert float((spikes.mean(1) - p).abs().max()) < 0.1  # 400 Bernoulli draws: std <= 0.025
    assert torch.equal(spikes, rate_encode(p, 400, torch.Generator().manual_seed(1)))
    lat = latency_encode(p, 10)
    assert float(lat.sum(1).max()) <= 1.0
    first = lat.argmax(1)
    bright = p > 0.2
    assert torch.equal(first[bright], torch.round((1 - p[bright]) * 9).long())


@pytest.mark.parametrize(
    ("call", "bad"),
    [
        (lambda: fwdgrad.estimator("online-fg", window=0), "0"),
        (lambda: fwdgrad.estimator("online-fg", window=2.5), "2.5"),
        (lambda: fwdgrad.estimator("bp-tbptt", window=-3), "-3"),
        (lambda: fwdgrad.estimator("forward-exact", chunk=0), "0"),
        (lambda: build_model("lif", (1, 28, 28), 10, encoding="phase"), "'phase'"),
        (lambda: build_model("lif", (1, 28, 28), 10, surrogate="sigmoid"), "'sigmoid'"),
        (lambda: spike(torch.zeros(2), "erf"), "'erf'"),
        (lambda: build_model("lif", (28, 28), 10, encoding="rate"), "'rate'"),
    ],
)
def test_invalid_values_raise_value_error_naming_them(call, bad):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.").replace("-", r"\-")):
        call()


def test_momentum_directions_follow_past_estimates():
    """With fwdgrad.directions' MomentumDirections, the second window's direction leans on the first window's
    estimate: v = ε + √n·u has cosine ≈ 1/√2 with u, against ≈ 0 (±1/√n) for an independent Gaussian v."""
    model = _model("gru")
    x, y = _data(6)
    estimates = []
    online_forward_gradient(
        model, x, lambda t, s: F.cross_entropy(model.readout(s), y), window=3,
        directions=MomentumDirections(beta=0.5), generator=torch.Generator().manual_seed(0),
        on_window=lambda k, loss, est: estimates.append(torch.cat([g.reshape(-1) for g in est.values()])),
    )  # fmt: skip
    first, second = estimates[0], estimates[1]
    cos = float((first @ second).abs() / (first.norm() * second.norm()))
    assert cos > 0.5  # both are multiples of their directions; n = 233 parameters, so ±1/√n ≈ 0.07
    with pytest.raises(ValueError, match=r"1\.5"):
        MomentumDirections(beta=1.5)


def test_sequence_datasets_and_training_cli(tmp_path, monkeypatch):
    files = make_idx_files(n_train=20, n_test=10)
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    files.write(tmp_path / "mnist")
    mnist = load_dataset("mnist", tmp_path)
    seq = load_dataset("seqmnist", tmp_path)
    pix = load_dataset("pixelmnist", tmp_path)
    assert seq.input_shape == (28, 28) and pix.input_shape == (784, 1)
    assert torch.equal(seq.x_train, mnist.x_train[:, 0])
    assert torch.equal(pix.x_test.reshape(-1), mnist.x_test.reshape(-1))
    assert torch.equal(seq.y_train, mnist.y_train)
    from fwdgrad.cli import main

    rc = main([
        "train", "--dataset", "seqmnist", "--data-dir", str(tmp_path), "--model", "gru:hidden=8",
        "--method", "online-fg:window=7", "--epochs", "1", "--batch-size", "10",
        "--out-dir", str(tmp_path / "runs"), "--threads", "1",
    ])  # fmt: skip
    assert rc == 0


def test_online_fg_averages_its_directions():
    model = _model("gru")
    x, y = _data(5)
    grads = _bptt(model, lambda m: F.cross_entropy(m(x), y))
    params = [p for p in model.parameters() if p.requires_grad]
    fwdgrad.estimator("online-fg", num_directions=2, tangents="rademacher", seed=3)(
        model, lambda m: F.cross_entropy(m(x), y)
    )
    g = torch.Generator().manual_seed(3)
    draws = [[t[0] for t in sample_tangents("rademacher", [p.detach() for p in params], 1, g)] for _ in range(2)]
    ds = [sum((a * v).sum() for a, v in zip(grads, vs)) for vs in draws]
    for i, p in enumerate(params):
        expected = (ds[0] * draws[0][i] + ds[1] * draws[1][i]) / 2
        torch.testing.assert_close(p.grad, expected, rtol=TOL, atol=TOL)
