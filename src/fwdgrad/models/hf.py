"""Hugging Face sequence classifiers and causal language models as fwdgrad models (optional extra ``fwdgrad[hf]``).

:func:`load_hf_model` takes a local folder (``config.json`` and weights, read with ``local_files_only=True``;
nothing is downloaded) or a ``config.json`` file alone (random initialisation), and returns a
:class:`HFClassifier`: an ``nn.Module`` mapping a batch ``x`` of shape ``[B, 2, T]`` (token ids and attention
mask, stacked; any dtype, cast to ``int64``) to logits ``[B, num_labels]``, so the training loop's
``cross_entropy(model(x), y)`` and every estimator work unchanged. :meth:`HFClassifier.loss` is the model's
own loss (``labels=`` passed to the Hugging Face model). :mod:`fwdgrad.data.glue` produces such ``x``.

Causal language models (GPT-2, OPT, LLaMA-style: rotary embeddings, RMSNorm, SDPA) are used as they are:
:func:`load_causal_lm` returns the Hugging Face ``...ForCausalLM`` (or a ``peft`` model around one) from a
local folder, a ``config.json`` or a config object; :func:`next_token_loss` is the loss every estimator
takes (``loss_fn = lambda m: next_token_loss(m, ids)``); :func:`causal_lm_config` builds a random config of
any size (tests, benchmarks/largest_model.py).

Forward-mode estimators need attention on the math path: wrap their passes in
:func:`fwdgrad.derivatives.attention.forward_mode_attention` (zeroth-order ones only evaluate, and do not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.models import register_model

Tensor = torch.Tensor


def _transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{where}: Hugging Face models need the optional extra: pip install 'fwdgrad[hf]'") from e
    return transformers


class HFClassifier(nn.Module):
    """A Hugging Face ``...ForSequenceClassification`` model behind fwdgrad's ``model(x) -> logits`` contract.

    Args:
        model: the Hugging Face model (its ``forward`` takes ``input_ids``, ``attention_mask``, ``labels``).

    ``x[:, 0]`` are the token ids and ``x[:, 1]`` the attention mask (1 = token, 0 = padding).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    @staticmethod
    def _split(x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"HFClassifier: x must have shape [B, 2, T] (ids, mask), got {tuple(x.shape)}")
        x = x.long()
        return x[:, 0], x[:, 1]

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = self._split(x)
        return self.hf(input_ids=ids, attention_mask=mask).logits

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The Hugging Face model's own loss for labels ``y`` (cross-entropy for single-label tasks)."""
        ids, mask = self._split(x)
        return self.hf(input_ids=ids, attention_mask=mask, labels=y).loss


def load_hf_model(path: str | os.PathLike, num_labels: int | None = None) -> HFClassifier:
    """Load a sequence classifier from a local folder (config + weights) or build one from a ``config.json``.

    Args:
        path: a folder written by ``save_pretrained`` (weights loaded, ``local_files_only=True``), or the
            path of a ``config.json`` (random initialisation with ``torch``'s global RNG).
        num_labels: the number of classes (``None``: the config's).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: ``transformers`` is not installed.
    """
    where = "fwdgrad.models.hf.load_hf_model"
    transformers = _transformers(where)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{where}: no model folder or config.json at {str(p)!r}")
    kwargs: dict[str, Any] = {} if num_labels is None else {"num_labels": int(num_labels)}
    auto = transformers.AutoModelForSequenceClassification
    if p.is_file():
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, **kwargs)
        model = auto.from_config(config)
    else:
        model = auto.from_pretrained(str(p), local_files_only=True, **kwargs)
    return HFClassifier(model)


@register_model("hf")
def hf(input_shape: tuple[int, ...], num_classes: int, path: str = "") -> HFClassifier:
    """``--model hf:path=DIR``: :func:`load_hf_model` with ``num_classes`` labels (inputs ``[2, T]``)."""
    if not path:
        raise ValueError("fwdgrad.models.build_model: model 'hf' needs path=DIR (a model folder or a config.json)")
    if tuple(input_shape)[:1] != (2,):
        raise ValueError(f"fwdgrad.models.build_model: model 'hf' takes inputs [2, T] (ids, mask), got {input_shape}")
    return load_hf_model(path, num_labels=num_classes)


# -- causal language models -----------------------------------------------------------------------------

#: The architectures :func:`causal_lm_config` builds: learned positions + LayerNorm + GELU (``gpt2``, ``opt``),
#: rotary positions + RMSNorm + SwiGLU + grouped-query attention (``llama``).
CAUSAL_LM_KINDS = ("gpt2", "opt", "llama")


def causal_lm_config(
    kind: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 100, ffn: int | None = None,
    positions: int = 128, kv_heads: int | None = None, **extra: Any,
) -> Any:
    """A Hugging Face config of a ``kind`` causal LM with these sizes, dropout off (a ``PretrainedConfig``).

    Args:
        kind: ``"gpt2"``, ``"opt"`` or ``"llama"`` (:data:`CAUSAL_LM_KINDS`).
        hidden, layers, heads: model width, number of blocks, attention heads (``hidden % heads == 0``).
        vocab: vocabulary size (special tokens are ids 0–2, so ``vocab >= 3``).
        ffn: the feed-forward width (``None``: ``4·hidden``; for ``llama`` the SwiGLU width, ``None``:
            ``8·hidden/3`` rounded up to a multiple of 8).
        positions: the longest sequence (learned positions of ``gpt2``/``opt``; rotary tables of ``llama``).
        kv_heads: key/value heads of ``llama`` (grouped-query attention; ``None``: ``heads``).
        extra: further config fields, passed on.

    The number of parameters is about ``layers·12·hidden² + vocab·hidden`` (``llama``: its ``ffn`` term is
    ``3·hidden·ffn``; its output embedding is untied, ``gpt2``'s and ``opt``'s are tied).

    Example:
        >>> from fwdgrad.models.hf import causal_lm_config, load_causal_lm
        >>> model = load_causal_lm(causal_lm_config("llama", hidden=32, layers=1, heads=4, vocab=50))
        >>> type(model).__name__, model.config.num_key_value_heads
        ('LlamaForCausalLM', 4)
    """
    where = "fwdgrad.models.hf.causal_lm_config"
    transformers = _transformers(where)
    if kind not in CAUSAL_LM_KINDS:
        raise ValueError(f"{where}: kind must be one of {CAUSAL_LM_KINDS}, got {kind!r}")
    if min(hidden, layers, heads, positions) < 1 or hidden % heads:
        raise ValueError(f"{where}: need hidden, layers, heads, positions >= 1 and hidden % heads == 0, "
                         f"got hidden={hidden}, layers={layers}, heads={heads}, positions={positions}")
    if vocab < 3:
        raise ValueError(f"{where}: vocab must be >= 3 (ids 0-2 are the special tokens), got {vocab}")
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **{**special, **extra})
    if kind == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            ffn_dim=4 * hidden if ffn is None else ffn, max_position_embeddings=positions, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **{**special, **extra})
    ffn = -(-8 * hidden // 24) * 8 if ffn is None else ffn
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads if kv_heads is None else kv_heads,
        max_position_embeddings=positions, attention_dropout=0.0, **{**special, **extra})


def load_causal_lm(
    path_or_config: Any, *, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
) -> nn.Module:
    """A Hugging Face causal LM (``AutoModelForCausalLM``) in eval mode, from a folder, a file or a config.

    Args:
        path_or_config: a folder written by ``save_pretrained`` (weights loaded with ``local_files_only=True``:
            nothing is downloaded), the path of a ``config.json``, or a ``PretrainedConfig`` (the last two
            initialise randomly from torch's global RNG).
        dtype: the parameters' dtype (``None``: float32; ``torch.bfloat16`` builds the model in bfloat16
            directly, never holding a float32 copy).
        attn_implementation: ``"sdpa"`` (the default; forward-mode passes put it on the math path with
            :func:`~fwdgrad.derivatives.attention.forward_mode_attention`) or ``"eager"``.

    Returns the model in ``eval()`` mode (no dropout: the estimators compare losses of one function).

    Raises:
        FileNotFoundError: a path that does not exist.
        ImportError: ``transformers`` is not installed.
    """
    where = "fwdgrad.models.hf.load_causal_lm"
    transformers = _transformers(where)
    auto = transformers.AutoModelForCausalLM
    options: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        options["dtype"] = dtype
    if isinstance(path_or_config, transformers.PretrainedConfig):
        model = auto.from_config(path_or_config, **options)
    else:
        p = Path(path_or_config).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{where}: no model folder or config.json at {str(p)!r}")
        if p.is_file():
            config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
            model = auto.from_config(config, **options)
        else:
            model = auto.from_pretrained(str(p), local_files_only=True, **options)
    return model.eval()


def _ids_and_mask(where: str, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        if "input_ids" not in batch:
            raise ValueError(f"{where}: a mapping batch needs 'input_ids', got keys {sorted(batch)}")
        return batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if isinstance(batch, Tensor) and batch.dim() == 2:
        return batch, None, None
    if isinstance(batch, Tensor) and batch.dim() == 3 and batch.shape[1] == 2:
        return batch[:, 0], batch[:, 1], None
    shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
    raise ValueError(f"{where}: batch must be ids [B, T], (ids, mask) [B, 2, T] or a dict with input_ids, got {shape}")


def next_token_loss(model: nn.Module, batch: Any, *, reduction: str = "mean") -> Tensor:
    r"""The causal LM loss: cross-entropy of each token given the ones before it.

    .. math:: L = \frac{1}{|S|} \sum_{(b,t) \in S} -\log p_\theta(x_{b,t+1} \mid x_{b,\le t})

    over the positions ``S`` whose target is a real token (attention mask 1, label not ``-100``).

    Args:
        model: a Hugging Face causal LM (or a ``peft`` model around one); ``model(input_ids=..., attention_mask=...)``
            returns ``.logits [B, T', V]``. With prompt tuning ``T' > T`` (virtual tokens first): the last
            ``T`` positions are the text's.
        batch: token ids ``[B, T]``; ``(ids, mask)`` stacked ``[B, 2, T]`` (:mod:`fwdgrad.data.glue`'s layout);
            or a mapping (a dict, a tokenizer's ``BatchEncoding``) with ``input_ids`` and optional
            ``attention_mask`` and ``labels`` (``-100``: no target).
        reduction: ``"mean"`` (over ``S``; what Hugging Face's ``labels=`` loss computes) or ``"none"`` (one
            loss per sequence ``[B]``, the mean over its targets: the per-example losses of ``fg-a``).

    Logits in bfloat16/float16 are upcast to float32 before the softmax (as Hugging Face's own loss does).

    Example:
        >>> import torch
        >>> from fwdgrad.models.hf import causal_lm_config, load_causal_lm, next_token_loss
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = load_causal_lm(causal_lm_config("opt", hidden=16, layers=1, heads=2, vocab=40))
        >>> ids = torch.randint(3, 40, (2, 6))
        >>> loss = next_token_loss(model, ids)
        >>> bool(torch.isclose(loss, model(input_ids=ids, labels=ids).loss))
        True
    """
    where = "fwdgrad.models.hf.next_token_loss"
    if reduction not in ("mean", "none"):
        raise ValueError(f"{where}: reduction must be 'mean' or 'none', got {reduction!r}")
    ids, mask, labels = _ids_and_mask(where, batch)
    ids = ids.long()
    if ids.shape[1] < 2:
        raise ValueError(f"{where}: sequences need at least 2 tokens to predict one, got length {ids.shape[1]}")
    labels = ids.clone() if labels is None else labels.long().clone()
    if mask is not None:
        mask = mask.long()
        labels = labels.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")  # [B, T-1]
    count = (target != -100).sum(1)
    if int(count.sum()) == 0:
        raise ValueError(f"{where}: the batch has no token to predict (every target is masked or -100)")
    if reduction == "mean":
        return nll.sum() / count.sum()
    return nll.sum(1) / count.clamp_min(1)
