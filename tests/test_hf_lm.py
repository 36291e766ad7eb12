"""Hugging Face causal LMs (GPT-2, OPT, LLaMA-style) built from tiny random configs: loading, the next-token
loss, and the estimators on them — ``fg-w`` exact against ``torch.func.jvp`` in float64 through attention on
the math path, ``zo``'s two-point difference against the exact directional derivative, ``fg-a`` on the
linear layers or a refusal naming the rest. Skipped when ``transformers`` is missing."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call, jvp

import fwdgrad
from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.estimators import ImplicitGradient

transformers = pytest.importorskip("transformers")

from fwdgrad.models.hf import CAUSAL_LM_KINDS, causal_lm_config, load_causal_lm, next_token_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 60


def tiny(kind: str, seed: int = 0, dtype=torch.float64, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = causal_lm_config(kind, hidden=32, layers=2, heads=4, vocab=VOCAB, positions=32, **kw)
    return load_causal_lm(config).to(dtype)


def batch(seed: int = 1, b: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def exact_directional(model, loss_fn, params: dict, tangents: list[torch.Tensor]) -> torch.Tensor:
    """⟨∇L, v⟩ by ``torch.func.jvp`` over the named parameters (attention on the math path)."""
    names = list(params)

    def f(*values):
        return loss_fn(lambda **kw: functional_call(model, dict(zip(names, values)), (), kw))

    with forward_mode_attention(model, quiet=True):
        return jvp(f, tuple(p.detach() for p in params.values()), tuple(tangents))[1]


def test_the_three_architectures_are_what_they_say() -> None:
    llama = tiny("llama", kv_heads=2)
    assert llama.config._attn_implementation == "sdpa"
    assert llama.config.num_key_value_heads == 2 and "RMSNorm" in type(llama.model.norm).__name__
    assert hasattr(llama.model, "rotary_emb")
    assert type(tiny("gpt2")).__name__ == "GPT2LMHeadModel" and type(tiny("opt")).__name__ == "OPTForCausalLM"
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_lm_config("bert")
    with pytest.raises(ValueError, match="hidden % heads == 0"):
        causal_lm_config("opt", hidden=30, heads=4)


def test_folder_config_file_and_config_object_load(tmp_path) -> None:
    model = tiny("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(tmp_path / "lm")  # local_files_only: nothing is downloaded
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert not loaded.training
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    fresh = load_causal_lm(tmp_path / "config.json")
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    in_bf16 = load_causal_lm(model.config, dtype=torch.bfloat16)
    assert {p.dtype for p in in_bf16.parameters()} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match=r"no model folder or config\.json"):
        load_causal_lm(tmp_path / "missing")


@pytest.mark.parametrize("kind", CAUSAL_LM_KINDS)
def test_next_token_loss_is_hugging_faces_loss_with_padding(kind: str) -> None:
    model = tiny(kind)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding of the second sequence
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.double()  # HF's loss is in float32
    loss = next_token_loss(model, {"input_ids": ids, "attention_mask": mask})
    assert loss.dtype == torch.float64  # ours keeps the logits' float64
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(next_token_loss(model, torch.stack([ids, mask], 1)), loss, rtol=0, atol=0)
    encoding = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})  # what a tokenizer returns
    torch.testing.assert_close(next_token_loss(model, encoding), loss, rtol=0, atol=0)
    per_sequence = next_token_loss(model, {"input_ids": ids, "attention_mask": mask}, reduction="none")
    assert per_sequence.shape == (2,)
    counts = torch.tensor([6.0, 4.0], dtype=per_sequence.dtype)  # targets: positions 1..6 and 1..4
    torch.testing.assert_close((per_sequence * counts).sum() / counts.sum(), loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no token to predict"):
        next_token_loss(model, {"input_ids": ids, "attention_mask": torch.zeros_like(ids)})
    with pytest.raises(ValueError, match=r"batch must be ids \[B, T\]"):
        next_token_loss(model, ids[0])


@pytest.mark.parametrize("kind", CAUSAL_LM_KINDS)
def test_fg_w_is_exact_against_torch_func_jvp(kind: str) -> None:
    """float64: each of fg-w's directional derivatives, through the whole model (attention on SDPA's math
    path; LLaMA: rotary embeddings, RMSNorm, grouped-query attention), equals torch.func.jvp's along the
    same tangents."""
    model = tiny(kind, **({"kv_heads": 2} if kind == "llama" else {}))
    ids = batch()
    loss_fn = lambda m: next_token_loss(m, ids)
    params = trainable(model)
    est = fwdgrad.estimator("fg-w", num_directions=2, seed=3)
    with forward_mode_attention(model, quiet=True):
        grad = est.step(model, loss_fn, params)
    assert isinstance(grad, ImplicitGradient) and grad.dirs.shape == (2,)
    for k in range(2):
        v = [grad.source.dense(i, k) for i in range(len(params))]
        ref = exact_directional(model, lambda call: next_token_loss(_Caller(call), ids), params, v)
        torch.testing.assert_close(grad.dirs[k], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.loss, loss_fn(model).detach(), rtol=1e-12, atol=0)


class _Caller(torch.nn.Module):
    """``model(**kw)`` routed through ``functional_call`` (for :func:`next_token_loss`)."""

    def __init__(self, call) -> None:
        super().__init__()
        self.call = call

    def forward(self, **kw):
        return self.call(**kw)


def _zo_and_exact(kind: str, eps: float) -> tuple[float, float]:
    """zo's two-point difference d = (L(θ+εz) − L(θ−εz)) / 2ε along its own z, and the jvp along that z."""
    model = tiny(kind)
    ids = batch()
    params = trainable(model)
    grad = fwdgrad.estimator("zo", eps=eps, seed=5).shared_step(model, lambda m: next_token_loss(m, ids), params)
    z = [grad.source.dense(i, 0) for i in range(len(params))]
    ref = exact_directional(model, lambda call: next_token_loss(_Caller(call), ids), params, z)
    return float(grad.dirs[0]), float(ref)


# (kind, eps, rtol). GPT-2 is smooth and all float64: the error is the O(ε²) truncation. OPT's ReLU has
# kinks: a step that crosses one adds an O(ε) error, so ε is smaller. LLaMA's RMSNorm (and rotary tables)
# compute in float32 whatever the weights' dtype (Hugging Face's code): the forward's float32 rounding,
# divided by ε, bounds the difference's accuracy, so ε stays at 1e-4 and the tolerance is 1e-3.
ZO_CASES = [("gpt2", 1e-4, 1e-4), ("opt", 1e-6, 1e-6), ("llama", 1e-4, 1e-3)]


@pytest.mark.parametrize(("kind", "eps", "rtol"), ZO_CASES, ids=[c[0] for c in ZO_CASES])
def test_zo_two_point_difference_matches_the_exact_directional_derivative(kind: str, eps: float, rtol: float):
    d, exact = _zo_and_exact(kind, eps)
    assert abs(d - exact) <= rtol * abs(exact), (d, exact)


def test_zo_two_point_error_falls_as_eps_squared() -> None:
    """GPT-2 in float64: the error of the two-point difference at ε = 1e-4 is 30–300× the one at 1e-5
    (100× is the ε² law; a one-sided or mis-scaled difference would give 10× or no convergence)."""
    (d1, exact), (d2, _) = _zo_and_exact("gpt2", 1e-4), _zo_and_exact("gpt2", 1e-5)
    ratio = abs(d1 - exact) / abs(d2 - exact)
    assert 30 < ratio < 300, ratio


def _linear_layers_only(model) -> None:
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        p.requires_grad_(type(owner) is torch.nn.Linear and "lm_head" not in name)


def _fg_a(**kw) -> fwdgrad.Estimator:
    return fwdgrad.estimator("fg-a", seed=0, **kw)


@pytest.mark.parametrize(("kind", "reduction"), [("opt", "mean"), ("llama", "none")])
def test_fg_a_perturbs_the_linear_layers(kind: str, reduction: str) -> None:
    """With the embeddings and norms frozen, every trainable tensor lives in an nn.Linear: fg-a applies and
    writes a finite .grad to each (LLaMA with per-sequence losses; OPT with the batch's mean loss, since its
    feed-forward runs on ``[B·T, H]``); with them trainable it refuses, naming them.

    OPT's ``lm_head`` holds the frozen, tied input embedding, which ``embed_tokens`` also uses: a frozen
    weight needs no estimate, so that use outside the perturbed module is no reason to refuse (it once
    refused with an empty list of parameters); with the head left out (``modules=``) the same tensors get a .grad."""
    model = tiny(kind)
    ids = batch()
    loss_fn = lambda m: next_token_loss(m, ids, reduction=reduction)
    with pytest.raises(ValueError, match=r"embed_tokens\.weight") as refusal:
        with forward_mode_attention(model, quiet=True):
            _fg_a()(model, loss_fn)
    assert "norm" in str(refusal.value)
    _linear_layers_only(model)
    model.zero_grad(set_to_none=True)
    with forward_mode_attention(model, quiet=True):
        _fg_a()(model, loss_fn)
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with forward_mode_attention(model, quiet=True):
        _fg_a(modules=lambda name, m: type(m) is torch.nn.Linear and name != "lm_head")(model, loss_fn)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    assert whole.keys() == {n for n, p in model.named_parameters() if p.grad is not None}


def test_fg_a_refuses_per_sequence_losses_where_opt_flattens_the_batch() -> None:
    model = tiny("opt")
    _linear_layers_only(model)
    ids = batch()
    with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.0\.fc1' has output batch size 14"):
        with forward_mode_attention(model, quiet=True):
            _fg_a(modules=lambda name, m: type(m) is torch.nn.Linear and name != "lm_head")(
                model, lambda m: next_token_loss(m, ids, reduction="none"))


def test_fg_a_refuses_gpt2_naming_its_conv1d_layers() -> None:
    model = tiny("gpt2")
    ids = batch()
    with pytest.raises(ValueError, match=r"c_attn\.weight \(in no perturbed module\)"):
        with forward_mode_attention(model, quiet=True):
            fwdgrad.estimator("fg-a", seed=0)(model, lambda m: next_token_loss(m, ids, reduction="none"))


@pytest.mark.parametrize("kind", CAUSAL_LM_KINDS)
def test_zo_family_and_fg_w_write_grad_and_train(kind: str) -> None:
    """Each of zo, zo-sign, zo-cons, fg-w writes a finite .grad for every parameter; MeZO's fused step
    (zo sgd_step) lowers the loss of a fixed batch in float32 (fixed seeds: a deterministic run)."""
    model = tiny(kind, dtype=torch.float32)
    ids = batch(t=12)
    loss_fn = lambda m: next_token_loss(m, ids)
    for name in ("zo", "zo-sign", "zo-cons", "fg-w"):
        model.zero_grad(set_to_none=True)
        with forward_mode_attention(model, quiet=True):
            fwdgrad.estimator(name, seed=0)(model, loss_fn)
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()), name
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        start = float(loss_fn(model))
    est = fwdgrad.estimator("zo", num_directions=4, seed=0)
    for _ in range(30):
        est.sgd_step(model, loss_fn, lr=2e-3)
    with torch.no_grad():
        end = float(loss_fn(model))
    assert end < start - 0.01, (start, end)
