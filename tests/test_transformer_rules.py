"""The forward-mode rules of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` and the windowed path.

Float64 throughout. The rule against ``torch.func.jvp`` through the module on PyTorch's math path (output,
attention weights and both tangents, 1e-12 absolute on O(1) values) for self- and cross-attention, both
layouts, unbatched inputs, every mask kind, ``bias_k``/``bias_v``/``add_zero_attn``, separate projection
weights, frozen tensors and rank-1 tangents; ``fg-w`` through the windowed path against the reference path for
the same seed (K = 1, K > 1, fused step) on MHA, ``nn.TransformerEncoderLayer`` (post- and pre-norm) and a
small ViT; the Rademacher identity ⟨ĝ, ∇f⟩ = ‖ĝ‖²/n against autograd's gradient; the calls the rule declines.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import fwdgrad
from fwdgrad.derivatives import reference as reference_module
from fwdgrad.derivatives import window as window_module
from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.derivatives.rules import module_rule
from fwdgrad.derivatives.transformer import encoder_layer_jvp, mha_jvp
from fwdgrad.directions import TangentSource

DT = torch.float64
TOL = 1e-12
pytestmark = pytest.mark.filterwarnings("ignore:fwdgrad. forward-mode passes run attention:UserWarning")


def _mha(**kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(**{"embed_dim": 8, "num_heads": 2, **kw}).to(DT)


def _rule_vs_jvp(mha: nn.Module, inputs: tuple, kwargs: dict, *, frozen=(), rank1: bool = False) -> None:
    """The rule's output/weights and tangents against ``torch.func.jvp`` of the module (math path)."""
    g = torch.Generator().manual_seed(3)
    params = {n: p.detach() for n, p in mha.named_parameters()}
    tangents = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    given = {}
    for n, p in params.items():
        if n in frozen:
            tangents[n] = torch.zeros_like(p)
            given[n] = (p, None)
        elif rank1 and p.dim() == 2:
            u, v = torch.randn(p.shape[0], generator=g, dtype=DT), torch.randn(p.shape[1], generator=g, dtype=DT)
            tangents[n] = torch.outer(u, v)
            given[n] = (p, (u, v))
        else:
            given[n] = (p, tangents[n])
    distinct = list(dict.fromkeys(inputs))  # self-attention passes one tensor three times
    in_t = [torch.randn(x.shape, generator=g, dtype=DT) for x in distinct]

    def f(ps, *xs):
        table = dict(zip(map(id, distinct), xs))
        out, weights = functional_call(mha, ps, tuple(table[id(x)] for x in inputs), kwargs)
        return (out,) if weights is None else (out, weights)

    with forward_mode_attention(mha, quiet=True):
        primal, tangent = jvp(f, (params, *distinct), (tangents, *in_t))
    y, y_t = primal[0], tangent[0]
    w, w_t = (primal[1], tangent[1]) if len(primal) > 1 else (None, None)
    with torch.no_grad(), fwAD.dual_level():
        duals = {id(x): fwAD.make_dual(x, t) for x, t in zip(distinct, in_t)}
        out, weights = mha_jvp(mha, tuple(duals[id(x)] for x in inputs), kwargs, given)
        got = [t.clone() for t in fwAD.unpack_dual(out)]
        if weights is not None:
            got += [t.clone() for t in fwAD.unpack_dual(weights)]
    want = [y, y_t] + ([w, w_t] if w is not None else [])
    assert (weights is None) == (w is None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_self_attention_rule_equals_jvp(batch_first: bool, need_weights: bool) -> None:
    x = _x(3, 5, 8)
    _rule_vs_jvp(_mha(batch_first=batch_first), (x, x, x), {"need_weights": need_weights})


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_cross_attention_with_other_key_and_value_widths_equals_jvp(batch_first: bool) -> None:
    q, k, v = _x(3, 4, 8), _x(3, 6, 5, seed=2), _x(3, 6, 7, seed=3)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    mha = _mha(batch_first=batch_first, kdim=5, vdim=7)
    _rule_vs_jvp(mha, (q, k, v), {"average_attn_weights": False})
    mha2 = _mha(batch_first=batch_first)  # same widths, key is value (PyTorch's packed k/v matmul)
    kv = _x(*k.shape[:-1], 8, seed=4)
    _rule_vs_jvp(mha2, (q, kv, kv), {"need_weights": False})


MASKS = {
    "attn-bool-2d": lambda: {"attn_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)},
    "attn-float-3d": lambda: {"attn_mask": _x(6, 5, 5, seed=7)},
    "padding-bool": lambda: {"key_padding_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]],
                                                              dtype=torch.bool)},
    "padding-float+attn-float": lambda: {"key_padding_mask": _x(3, 5, seed=8), "attn_mask": _x(5, 5, seed=9)},
    "causal": lambda: {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5, dtype=DT), "is_causal": True},
    "causal+padding-bool": lambda: {
        "attn_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), "is_causal": True,
        "key_padding_mask": torch.tensor([[0, 0, 0, 1, 1]] * 3, dtype=torch.bool)},
}


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks_equal_jvp(mask: str, need_weights: bool) -> None:
    x = _x(3, 5, 8)
    _rule_vs_jvp(_mha(num_heads=2, batch_first=True), (x, x, x), {**MASKS[mask](), "need_weights": need_weights})


def test_a_fully_masked_query_row_matches_each_path() -> None:
    """SDPA's math path gives a zero row where every key is masked (need_weights=False); the rule too."""
    x = _x(2, 4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1] = True
    _rule_vs_jvp(_mha(batch_first=True), (x, x, x), {"attn_mask": mask, "need_weights": False})


def test_bias_kv_zero_attn_separate_weights_unbatched_frozen_and_rank1_equal_jvp() -> None:
    x = _x(5, 8)  # unbatched
    mha = _mha(add_bias_kv=True, add_zero_attn=True)
    _rule_vs_jvp(mha, (x, x, x), {"key_padding_mask": torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)})
    _rule_vs_jvp(mha, (x, x, x), {"attn_mask": _x(5, 5, seed=5)}, frozen=("in_proj_weight", "bias_v"))
    q, kv = _x(2, 3, 8), _x(2, 4, 6, seed=2)
    separate = _mha(batch_first=True, kdim=6, vdim=6, bias=False)
    _rule_vs_jvp(separate, (q, kv, kv), {"need_weights": False}, rank1=True)
    _rule_vs_jvp(_mha(batch_first=True), (q, q, q), {}, rank1=True, frozen=("out_proj.bias",))


def test_calls_the_rule_does_not_describe_are_declined() -> None:
    x = _x(2, 4, 8)
    values = {n: (p.detach(), None) for n, p in _mha().named_parameters()}
    with torch.no_grad(), fwAD.dual_level():
        assert mha_jvp(_mha(dropout=0.1).train(), (x, x, x), {}, values) is None  # dropout's draw
        assert mha_jvp(_mha(dropout=0.1).eval(), (x, x, x), {}, values) is not None  # eval: no dropout
        learned = fwAD.make_dual(torch.zeros(4, 4, dtype=DT), torch.ones(4, 4, dtype=DT))
        assert mha_jvp(_mha(), (x, x, x), {"attn_mask": learned}, values) is None  # a mask with a tangent
        mixed = {"attn_mask": torch.zeros(4, 4, dtype=torch.bool), "key_padding_mask": torch.zeros(4, 2, dtype=DT)}
        assert mha_jvp(_mha(), (x, x, x), mixed, values) is None
        assert mha_jvp(_mha(), (x, x, x), {"is_causal": True}, values) is None  # PyTorch raises
        assert mha_jvp(_mha(), (x.float(),) * 3, {}, values) is None  # dtype other than the parameters'
        assert mha_jvp(_mha(), (x[..., :6],) * 3, {}, values) is None  # a shape the module refuses
        two_d = {"key_padding_mask": torch.zeros(1, 4, dtype=torch.bool)}
        assert mha_jvp(_mha(), (x[0],) * 3, two_d, values) is None  # unbatched takes a 1-D padding mask
    hooked = _mha()
    hooked.register_forward_hook(lambda m, a, o: o)
    assert module_rule(hooked) is None
    assert module_rule(type("MyMHA", (nn.MultiheadAttention,), {})(8, 2)) is None  # a subclass
    parametrized = _mha()
    torch.nn.utils.parametrize.register_parametrization(parametrized.out_proj, "weight", nn.Identity())
    assert module_rule(parametrized) is None
    assert module_rule(_mha()) is not None


# -- the windowed path on models --------------------------------------------------------------------------


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool, **kw) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, src_key_padding_mask=self.padding).mean(1))

    padding = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)


class _ViT(nn.Module):
    """The benchmark's ViT in miniature: patches → linear, [CLS], learned positions, pre-norm encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(2)
        ])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(1, 2, 2).unfold(2, 2, 2).reshape(x.shape[0], 4, 4)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


class _Cross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=False)
        self.mem = nn.Linear(6, 6)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem = self.mem(x[..., :6])
        out, w = self.mha(x.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1))
        return self.head(out.mean(0)) + w.sum((1, 2)).unsqueeze(1)  # the weights' tangent counts too


MODELS = {
    "encoder": (lambda: _Encoder(False, dropout=0.0), (3, 5, 8)),
    "encoder-norm-first": (lambda: _Encoder(True, dropout=0.0), (3, 5, 8)),
    "vit": (_ViT, (3, 4, 4)),
    "cross": (_Cross, (3, 5, 8)),
}


def _problem(name: str, train: bool = True):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(DT).train(train)
    x, y = _x(*shape, seed=11), torch.tensor([0, 2, 1])
    return model, lambda m: F.cross_entropy(m(x), y)


def _grads(name: str, *, fast: bool, k: int = 1, tangents: str = "gaussian", chunk_size=None, train=True):
    model, loss_fn = _problem(name, train)
    est = fwdgrad.ForwardGradient(k, tangents, seed=5, chunk_size=chunk_size, fast_paths=fast)
    with forward_mode_attention(model, quiet=True):
        loss = est(model, loss_fn)
    return loss, [p.grad for p in model.parameters()]


def _no_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the reference path was taken")

    monkeypatch.setattr(fwdgrad.derivatives, "reference_directions", refuse)


@pytest.mark.parametrize(("k", "tangents", "chunk_size"), [(1, "gaussian", None), (3, "gaussian", 1),
                                                           (3, "rank1", None), (1, "rademacher", None)])
@pytest.mark.parametrize("name", list(MODELS))
def test_windowed_fg_w_equals_the_reference_for_the_same_seed(
    name: str, k: int, tangents: str, chunk_size, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref_loss, ref = _grads(name, fast=False, k=k, tangents=tangents, chunk_size=chunk_size)
    _no_reference(monkeypatch)  # the fast path must not fall back on these models
    loss, got = _grads(name, fast=True, k=k, tangents=tangents, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOL)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_fused_fg_w_step_equals_the_reference_step(monkeypatch: pytest.MonkeyPatch) -> None:
    models = []
    for fast in (False, True):
        model, loss_fn = _problem("vit")
        est = fwdgrad.ForwardGradient(1, "gaussian", seed=5, fast_paths=fast)
        if fast:
            _no_reference(monkeypatch)
        with forward_mode_attention(model, quiet=True):
            est.sgd_step(model, loss_fn, lr=0.1)
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["encoder", "encoder-norm-first", "vit"])
def test_rademacher_one_direction_is_sharp_against_autograd(name: str) -> None:
    """ĝ = ⟨∇f, v⟩ v with v ∈ {±1}ⁿ, so ⟨ĝ, ∇f⟩ = ⟨∇f, v⟩² = ‖ĝ‖²/n exactly: a wrong directional derivative
    d ≠ ⟨∇f, v⟩ breaks it (⟨ĝ, ∇f⟩ = d⟨∇f, v⟩, ‖ĝ‖²/n = d²)."""
    model, loss_fn = _problem(name)
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    _, ghat = _grads(name, fast=True, tangents="rademacher")
    n = sum(g.numel() for g in ghat)
    inner = sum(float((a * b).sum()) for a, b in zip(ghat, grads))
    sq = sum(float((a * a).sum()) for a in ghat)
    assert inner > 0
    assert abs(inner - sq / n) <= 1e-10 * inner


def test_the_windowed_path_runs_the_rule_on_an_encoder_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model, loss_fn = _problem("encoder-norm-first", train=False)
    params = list(model.parameters())
    source = TangentSource("gaussian", [p.detach() for p in params], 1, torch.Generator().manual_seed(0), lean=True)
    calls = []
    real = window_module.WindowedPass._rule_forward
    monkeypatch.setattr(window_module.WindowedPass, "_rule_forward",
                        lambda self, m, *a, **kw: calls.append(type(m)) or real(self, m, *a, **kw))
    with forward_mode_attention(model, quiet=True):
        got = window_module.windowed_directions(model, loss_fn, params, source, where="test")
    assert got is not None  # clean: no parameter used outside its window
    assert calls == [nn.TransformerEncoderLayer, nn.MultiheadAttention]
    _, d = got
    # against autograd: the same lean tangents, drawn again
    grads = torch.autograd.grad(loss_fn(model), params)
    want = sum(float((g * source.dense(i, 0)).sum()) for i, g in enumerate(grads))
    assert abs(float(d[0]) - want) <= 1e-10 * abs(want)


def test_declined_calls_run_the_module_with_dual_tensors_in_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout in training mode: the rule declines, the layer's own forward runs with dual parameters (no
    fallback to the reference path), and the estimate is the reference's for the same seed and RNG state."""
    def run(fast: bool):
        torch.manual_seed(0)
        model = _Encoder(False, dropout=0.3).to(DT)  # dropout in the attention and in the layer's own modules
        x, y = _x(3, 5, 8, seed=11), torch.tensor([0, 2, 1])

        def loss_fn(m):
            return F.cross_entropy(m(x), y)

        torch.manual_seed(9)
        est = fwdgrad.ForwardGradient(1, "gaussian", seed=5, fast_paths=fast)
        with forward_mode_attention(model, quiet=True):
            est(model, loss_fn)
        return [p.grad for p in model.parameters()]

    ref = run(False)
    monkeypatch.setattr(reference_module, "_jvp_one", None)  # any use of the reference path would fail
    _no_reference(monkeypatch)
    for a, b in zip(run(True), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_rule_is_the_layer_bit_for_bit(activation: str) -> None:
    """The layer rule only reorders the activation's tangent (same kernels): output and tangent bit for bit."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True).to(DT)
    x, x_t = _x(3, 5, 8), _x(3, 5, 8, seed=2)
    assert module_rule(layer) is not None
    with torch.no_grad(), forward_mode_attention(layer, quiet=True), fwAD.dual_level():
        want = [t.clone() for t in fwAD.unpack_dual(layer(fwAD.make_dual(x, x_t)))]
        got = [t.clone() for t in fwAD.unpack_dual(encoder_layer_jvp(layer, (fwAD.make_dual(x, x_t),), {}, {}))]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_encoder_layer_rule_declines_what_it_cannot_see() -> None:
    own = nn.TransformerEncoderLayer(8, 2, 16, activation=nn.GELU())  # a module activation: no rule needed
    assert module_rule(own) is None
    lam = nn.TransformerEncoderLayer(8, 2, 16, activation=lambda t: t.tanh())
    assert module_rule(lam) is None
    over = nn.TransformerEncoderLayer(8, 2, 16)
    over._ff_block = lambda t: t
    assert module_rule(over) is None
    assert module_rule(type("Mine", (nn.TransformerEncoderLayer,), {})(8, 2, 16)) is None
