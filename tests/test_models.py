"""fwdgrad.models: the registry, shapes, option errors, and exact forward-mode AD through every model
(the directional derivative by forward AD equals ⟨∇L, v⟩ from backprop, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.derivatives import call_with_parameters
from fwdgrad.functional import directional_derivatives
from fwdgrad.models import MLP, ConvNet, available_models, build_model, model_options, num_parameters, register_model

CASES = [
    ("mlp", (40,), {"width": 16, "depth": 2}),
    ("mlp", (1, 8, 8), {"widths": "12x6", "activation": "tanh"}),
    ("mlp", (40,), {"depth": 0}),
    ("cnn", (40,), {"channels": 4, "hidden": 16}),
    ("cnn", (2, 12), {"channels": 4, "hidden": 16}),
    ("cnn", (1, 8, 8), {"channels": 4, "hidden": 16}),
    ("cnn", (3, 9, 10), {"channels": 3, "hidden": 8}),
]


def test_builtin_models_are_registered() -> None:
    assert {"mlp", "cnn"} <= set(available_models())
    assert model_options("mlp") == {"width": 256, "depth": 2, "widths": None, "activation": "relu"}
    assert model_options("cnn") == {"channels": 64, "hidden": 1024}


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_output_shape(name: str, shape: tuple[int, ...], options: dict) -> None:
    model = build_model(name, shape, 7, **options)
    assert model(torch.randn(5, *shape)).shape == (5, 7)


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_forward_ad_matches_backprop(name: str, shape: tuple[int, ...], options: dict) -> None:
    """⟨∇L, v_k⟩ by forward AD through the model equals the backprop gradient dotted with v_k."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(name, shape, 5, **options).double()
    x = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    loss_fn = lambda m: F.cross_entropy(m(x), y)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model), list(params.values()))
    tangents = [torch.randn(3, *p.shape, generator=g, dtype=torch.float64) for p in params.values()]
    names = list(params)
    f = lambda xs: call_with_parameters(model, loss_fn, dict(zip(names, xs)))
    value, dirs, _ = directional_derivatives(f, [p.detach() for p in params.values()], tangents)
    expected = torch.stack([sum((gr * t[k]).sum() for gr, t in zip(grads, tangents)) for k in range(3)])
    torch.testing.assert_close(value, loss_fn(model).detach())
    torch.testing.assert_close(dirs, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fg_w_trains_each_model(name: str) -> None:
    """The fg-w estimator runs through the model and writes a finite gradient estimate of every shape."""
    model = build_model(name, (1, 8, 8), 3, **({"channels": 4, "hidden": 8} if name == "cnn" else {"width": 8}))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = fwdgrad.estimator("fg-w", num_directions=2, seed=0)(model, lambda m: F.cross_entropy(m(x), y))
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()


def test_mlp_layout() -> None:
    model = MLP((1, 4, 5), 3, widths="7x6")
    assert model.hidden_widths == (7, 6)
    assert num_parameters(model) == (20 * 7 + 7) + (7 * 6 + 6) + (6 * 3 + 3)
    assert MLP((4,), 3, width=9, depth=3).hidden_widths == (9, 9, 9)
    assert MLP((4,), 3, widths=[5]).hidden_widths == (5,)


def test_cnn_matches_the_paper_layout_on_mnist() -> None:
    """Baydin et al. (2022): 4 conv 3×3 64 channels, pools after conv 2 and 4, Linear 1024, Linear 10."""
    model = ConvNet((1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [64] * 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64 * 7 * 7, 1024), (1024, 10)]


def test_no_inplace_modules() -> None:
    for name, shape, options in CASES:
        for m in build_model(name, shape, 3, **options).modules():
            assert not getattr(m, "inplace", False), f"{name}: {m} is in-place"


@pytest.mark.parametrize(
    ("name", "shape", "options", "message"),
    [
        ("nope", (4,), {}, "unknown model 'nope'"),
        ("mlp", (4,), {"wdth": 3}, "has no option 'wdth'"),
        ("mlp", (4,), {"activation": "swish"}, "activation must be one of"),
        ("mlp", (4,), {"widths": "12xa"}, "widths must look like"),
        ("mlp", (4,), {"depth": -1}, "depth must be an int >= 0"),
        ("mlp", (0,), {}, "input_shape must be"),
        ("cnn", (1, 2, 3, 4), {}, "input_shape must be (L,), (C, L) or (C, H, W)"),
        ("cnn", (1, 3, 28), {}, "every spatial size must be >= 4"),
        ("cnn", (40,), {"channels": 0}, "channels must be an int >= 1"),
    ],
)
def test_bad_options_raise(name: str, shape: tuple, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, shape, 10, **options)


def test_register_model_rejects_a_taken_name() -> None:
    with pytest.raises(ValueError, match="name 'mlp' is taken"):
        register_model("mlp")(lambda input_shape, num_classes: torch.nn.Linear(1, 1))
