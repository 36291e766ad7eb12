"""PEFT adapters (LoRA, prefix tuning, prompt tuning) on GPT-2, OPT and LLaMA-style causal LMs built from tiny
configs: every registered estimator either trains only the adapters (the frozen base bit-for-bit unchanged)
or refuses with a one-line error; ``fg-w`` is exact along its direction on the adapters (float64, the sharp
Rademacher identity); ``zo``'s fused step needs the memory of inference plus the adapters. Skipped when
``transformers`` or ``peft`` is missing."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

import fwdgrad
from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.estimators import recipe

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fwdgrad.models.hf import causal_lm_config, load_causal_lm, next_token_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 60
TARGETS = {"gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}


def adapter_config(adapter: str, kind: str):  # -> peft.PeftConfig
    if adapter == "lora":  # init_lora_weights=False: B is random too, so every adapter tensor has a gradient
        return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                               target_modules=TARGETS[kind], init_lora_weights=False)
    if adapter == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)


def adapted(kind: str, adapter: str, dtype=torch.float64, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    base = load_causal_lm(causal_lm_config(kind, hidden=hidden, layers=2, heads=4, vocab=VOCAB, positions=32))
    return peft.get_peft_model(base, adapter_config(adapter, kind)).to(dtype).eval()


def ids(b: int = 2, t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def split(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Parameter]]:
    """(a copy of the frozen base's parameters and buffers, the adapter parameters)."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({"buffer:" + n: b.clone() for n, b in model.named_buffers()})
    return frozen, {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_base_untouched(model, frozen: dict[str, torch.Tensor]) -> None:
    now = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    now.update({"buffer:" + n: b for n, b in model.named_buffers()})
    assert now.keys() == frozen.keys()
    for n, t in frozen.items():
        assert torch.equal(now[n], t), f"frozen {n} changed"
        assert n.startswith("buffer:") or now[n].grad is None, f"frozen {n} got a .grad"


ADAPTERS = ["lora", "prefix", "prompt"]
CASES = [(kind, adapter) for kind in TARGETS for adapter in ADAPTERS]


def test_adapters_are_the_only_trainable_parameters() -> None:
    for kind, adapter in CASES:
        names = [n for n, p in adapted(kind, adapter).named_parameters() if p.requires_grad]
        expected = ("lora_A", "lora_B") if adapter == "lora" else ("prompt_encoder",)
        assert names and all(any(e in n for e in expected) for n in names), (kind, adapter, names)


#: The recipes that train a PEFT model; every other registered one must refuse it with a one-line error
#: (feedback alignment: not a chain of Linear layers; fg-a: the adapters' weights are used outside the
#: perturbed modules' own forward (LoRA) or sit in no perturbed module (prefix, prompt); local-loss, guess
#: and recurrent recipes: no local heads / no recurrent cell). A new recipe must be placed on one side.
TRAINS_ADAPTERS = {"bp", "bp-tbptt", "fg-w", "fg-w-mixed", "fg-w-momentum", "zo", "zo-cons", "zo-sign"}


def _estimator(name: str) -> fwdgrad.Estimator:
    options = recipe(name).options()
    return fwdgrad.estimator(name, **({"seed": 0} if options is None or "seed" in options else {}))


@pytest.mark.parametrize(("kind", "adapter"), [("llama", "lora"), ("opt", "prefix"), ("gpt2", "prompt")])
def test_every_estimator_trains_only_the_adapters_or_refuses(kind: str, adapter: str) -> None:
    """Each registered recipe's .grad path: the adapters get a finite .grad (not all zero), the frozen base
    keeps its bits and no .grad; its fused step (``claims`` "fused") then moves the adapters only."""
    model = adapted(kind, adapter)
    x = ids()
    frozen, adapters = split(model)
    trains = set()
    for name in fwdgrad.available_estimators():
        reduction = "none" if fwdgrad.estimator_class(name).per_example_loss else "mean"
        loss_fn = lambda m, reduction=reduction: next_token_loss(m, x, reduction=reduction)
        model.zero_grad(set_to_none=True)
        try:
            with forward_mode_attention(model, quiet=True):
                _estimator(name)(model, loss_fn)
        except (ValueError, TypeError) as e:
            assert name not in TRAINS_ADAPTERS, f"{name} refused: {e}"
            assert "\n" not in str(e) and str(e).split(":")[0].endswith("__call__"), f"{name}: {e}"
            assert_base_untouched(model, frozen)
            continue
        trains.add(name)
        assert_base_untouched(model, frozen)
        grads = [p.grad for p in adapters.values()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
        assert any(bool(g.abs().sum() > 0) for g in grads), name
        if "fused" in recipe(name).claims:
            before = [p.detach().clone() for p in adapters.values()]
            model.zero_grad(set_to_none=True)
            with forward_mode_attention(model, quiet=True):
                _estimator(name).sgd_step(model, loss_fn, lr=1e-2)
            assert_base_untouched(model, frozen)
            assert any(not torch.equal(b, p) for b, p in zip(before, adapters.values())), f"{name}: no update"
    assert trains == TRAINS_ADAPTERS


@pytest.mark.parametrize(("kind", "adapter"), CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_fg_w_is_exact_on_the_adapters(kind: str, adapter: str) -> None:
    """float64, one Rademacher direction v (v_i = ±1): fg-w's estimate is g = ⟨∇L, v⟩ v, so
    ⟨g, ∇L⟩ = ⟨∇L, v⟩² = ‖g‖² / n exactly (n adapter entries), ∇L from torch.autograd on the adapters.

    Tolerance 1e-10, except LLaMA: Hugging Face's RMSNorm and rotary tables compute in float32 whatever the
    weights' dtype, so forward mode and backprop round differently there (measured: 1e-8 relative); 1e-6."""
    model = adapted(kind, adapter)
    x = ids()
    loss_fn = lambda m: next_token_loss(m, x)
    _, adapters = split(model)
    with forward_mode_attention(model, quiet=True):
        fwdgrad.estimator("fg-w", tangents="rademacher", seed=4)(model, loss_fn)
    g = torch.cat([p.grad.reshape(-1) for p in adapters.values()])
    model.zero_grad(set_to_none=True)
    true = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model), list(adapters.values()))])
    assert float(true.abs().max()) > 0
    rtol = 1e-6 if kind == "llama" else 1e-10
    torch.testing.assert_close(g @ true, g @ g / g.numel(), rtol=rtol, atol=1e-14)


def peak_live_bytes(fn) -> int:
    """The peak of torch's live CPU allocations during ``fn()`` above what was live at its start (the
    profiler's running "Total Allocated" of its ``[memory]`` events: every tensor torch allocates)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def test_zo_fused_step_needs_the_memory_of_inference_plus_the_adapters() -> None:
    """LoRA on an OPT-style model (float32): the peak of live tensors during MeZO's fused step is at most
    that of one no-grad forward plus the adapters' size — no copy of the model, no gradient, no graph —
    while a backprop step on the same adapters needs more than the forward plus adapters (so the
    measurement can tell them apart)."""
    model = adapted("opt", "lora", dtype=torch.float32, hidden=64)
    x = ids(b=4, t=24)
    loss_fn = lambda m: next_token_loss(m, x)
    _, adapters = split(model)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - adapter_bytes
    assert base_bytes > 20 * adapter_bytes

    def forward():
        with torch.no_grad():
            loss_fn(model)

    forward()  # first-use allocations (the causal mask's caches, kernels) are not the step's
    inference = peak_live_bytes(forward)
    est = fwdgrad.estimator("zo", seed=0)
    est.sgd_step(model, loss_fn, lr=1e-3)
    zo = peak_live_bytes(lambda: est.sgd_step(model, loss_fn, lr=1e-3))
    assert 0 < zo <= inference + adapter_bytes, (zo, inference, adapter_bytes)

    def backprop():
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()

    backprop()
    assert peak_live_bytes(backprop) > inference + adapter_bytes
