"""Attention under forward mode: inside ``forward_mode_attention`` a JVP goes through
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and a tiny Hugging Face model, and equals
autograd's directional derivative in float64 (relative 1e-10); the fallback is announced once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import fwdgrad
from fwdgrad.derivatives import attention
from fwdgrad.derivatives.attention import forward_mode_attention, has_attention

TOL = 1e-10


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def _problem(make, train: bool):
    torch.manual_seed(0)
    model = make().double().train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), y)


MODELS = {"mha": _MHA, "encoder": lambda: _Encoder(False), "encoder-norm-first": lambda: _Encoder(True)}


def _jvp_vs_autograd(model: nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    with forward_mode_attention(model, quiet=True):
        _, d = jvp(lambda ps: loss_fn(_Call(model, ps)), (params,), (tangents,))
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    ref = sum((gr * tangents[n]).sum() for gr, n in zip(grads, params))
    return d, ref


class _Call:
    """``model`` called with ``params`` through ``functional_call``."""

    def __init__(self, model: nn.Module, params: dict) -> None:
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_jvp_through_attention_equals_autograd(name: str, train: bool) -> None:
    d, ref = _jvp_vs_autograd(*_problem(MODELS[name], train))
    assert abs(float(d - ref)) <= TOL * abs(float(ref))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_without_the_context_pytorch_has_no_rule(train: bool) -> None:
    """Documents why the context exists; skips (and says so) once PyTorch gains the rules."""
    model, loss_fn = _problem(MODELS["encoder"], train)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.ones_like(p) for n, p in params.items()}
    try:
        jvp(lambda ps: loss_fn(_Call(model, ps)), (params,), (tangents,))
    except NotImplementedError as e:
        assert "forward AD" in str(e)
    else:
        pytest.skip(f"PyTorch {torch.__version__} now differentiates fused attention in forward mode")


def test_fg_w_inside_the_context_equals_autograd_times_v() -> None:
    model, loss_fn = _problem(MODELS["encoder"], train=False)
    with forward_mode_attention(model, quiet=True):
        fwdgrad.estimator("fg-w", seed=4)(model, loss_fn)
    est = [p.grad.clone() for p in model.parameters()]
    v = fwdgrad.sample_tangents("gaussian", [p.detach() for p in model.parameters()], 1,
                                torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    d = sum((g * t[0]).sum() for g, t in zip(grads, v))
    for e, t in zip(est, v):
        torch.testing.assert_close(e, d * t[0], rtol=1e-9, atol=1e-12)


def test_settings_restored_and_announced_once(monkeypatch) -> None:
    monkeypatch.setattr(attention, "_said", False)
    model, _ = _problem(MODELS["mha"], train=False)
    assert has_attention(model) and not has_attention(nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with forward_mode_attention(model):
                assert not torch.backends.mha.get_fastpath_enabled()
        with forward_mode_attention(nn.Linear(2, 2)):
            pass
    assert len([w for w in caught if "math path" in str(w.message)]) == 1
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with forward_mode_attention(model):
            raise RuntimeError("inside")
    assert torch.backends.mha.get_fastpath_enabled()


def test_tiny_hugging_face_model_jvp_equals_autograd() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(1)
    # Token 0 is BERT's padding_idx: backprop leaves its embedding row a zero gradient by convention, while
    # the JVP (and finite differences) see that the loss depends on it; the ids avoid it.
    ids = torch.randint(1, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = torch.tensor([0, 1, 1])

    def loss_fn(m) -> torch.Tensor:
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    d, ref = _jvp_vs_autograd(model, loss_fn)
    assert abs(float(d - ref)) <= TOL * abs(float(ref))
