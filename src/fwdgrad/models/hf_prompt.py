r"""A Hugging Face language model scoring label words at a prompt's answer position (extra ``fwdgrad[hf]``).

Prompt-based fine-tuning (LM-BFF, Gao et al. 2021; MeZO, Malladi et al. 2023) classifies a sentence by
the LM's logits of one *label word* per class at the answer position of a template, e.g. SST-2's
"*sentence* It was [terrible / great]": for a causal LM the answer position is the prompt's last token
(its logits predict the next word), for a masked LM the ``[MASK]`` token the template holds. With
``z_c`` the LM logit of label word ``c`` there,

.. math:: \mathrm{logits} = (z_1, \dots, z_C), \qquad L = \mathrm{CE}(\mathrm{logits}, y), \qquad
          \hat y = \arg\max_c z_c .

:class:`PromptLM` maps a batch ``x`` of shape ``[B, 2, T]`` (token ids and attention mask, stacked, right
padded, as :mod:`fwdgrad.data.prompts` makes them) to those logits ``[B, C]``, so the training loop's
``cross_entropy(model(x), y)`` is the label-word cross-entropy and its accuracy the argmax over label
words. Given ``labels``, it returns ``{"loss", "logits"}`` as Hugging Face models do, so it also trains in
:class:`fwdgrad.integrations.transformers.Trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.models import register_model

Tensor = torch.Tensor
KINDS = ("causal", "masked")

__all__ = ["KINDS", "PromptLM", "label_word_ids", "load_prompt_lm", "load_tokenizer", "prompt_kind", "resolve_kind"]


def _transformers(where: str) -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{where}: prompt models need the optional extra: pip install 'fwdgrad[hf]'") from e
    return transformers


def _folder(path: str | os.PathLike, where: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{where}: no model folder or config.json at {str(p)!r}")
    return p.parent if p.is_file() else p


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in the folder ``path`` (or beside the ``config.json`` file ``path``), read with
    ``local_files_only=True``; a causal tokenizer without a padding token pads with its end token."""
    where = "fwdgrad.models.hf_prompt.load_tokenizer"
    tok = _transformers(where).AutoTokenizer.from_pretrained(str(_folder(path, where)), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{where}: the tokenizer in {str(path)!r} has neither a padding nor an end token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def prompt_kind(tokenizer: Any, config: Any) -> str:
    """``"masked"`` when the tokenizer has a mask token and the config's model type has a masked-LM head in
    ``transformers`` (BERT, RoBERTa, ...), else ``"causal"`` (GPT-2, OPT, Llama, ...)."""
    transformers = _transformers("fwdgrad.models.hf_prompt.prompt_kind")
    masked = getattr(tokenizer, "mask_token", None) is not None
    return "masked" if masked and type(config) in transformers.MODEL_FOR_MASKED_LM_MAPPING else "causal"


def resolve_kind(path: str | os.PathLike, tokenizer: Any, kind: str = "auto") -> str:
    """``kind`` checked, or for ``"auto"`` :func:`prompt_kind` of the config at ``path`` (folder or file)."""
    where = "fwdgrad.models.hf_prompt"
    if kind == "auto":
        config = _transformers(where).AutoConfig.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
        return prompt_kind(tokenizer, config)
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be 'auto' or one of {KINDS}, got {kind!r}")
    return kind


def label_word_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The token id of each label word as it follows a space in the prompt (``" great"``); a word that is not
    exactly one token raises ``ValueError`` naming it."""
    where = "fwdgrad.models.hf_prompt.label_word_ids"
    if len(words) < 2 or len(set(words)) != len(words):
        raise ValueError(f"{where}: need two or more distinct label words, got {list(words)!r}")
    ids = []
    for w in words:
        got = tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(f"{where}: label word {w!r} is {len(got)} tokens for this tokenizer ({got}); "
                             "choose words that are one token each")
        ids.append(int(got[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: label words {list(words)!r} share a token id ({ids})")
    return ids


class PromptLM(nn.Module):
    """A Hugging Face LM behind fwdgrad's ``model(x) -> logits`` contract, logits of the label words.

    Args:
        lm: a ``...ForCausalLM`` or ``...ForMaskedLM`` model (``forward(input_ids, attention_mask).logits``
            of shape ``[B, T, V]``).
        label_ids: the token id of each class's label word (``C`` of them).
        kind: ``"causal"`` (answer at the last unpadded position) or ``"masked"`` (at ``mask_token_id``).
        mask_token_id: the mask token (``kind="masked"``).

    ``forward(x)`` returns ``[B, C]``; ``forward(x, labels)`` returns ``{"loss": CE, "logits": [B, C]}``.
    """

    def __init__(self, lm: nn.Module, label_ids: Sequence[int], kind: str, mask_token_id: int | None = None) -> None:
        super().__init__()
        where = "fwdgrad.models.hf_prompt.PromptLM"
        if kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        if kind == "masked" and mask_token_id is None:
            raise ValueError(f"{where}: a masked LM needs mask_token_id")
        self.lm, self.kind, self.mask_token_id = lm, kind, mask_token_id
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.int64), persistent=False)

    def answer_positions(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``[B]``: the position whose logits score the label words."""
        if self.kind == "causal":
            return mask.sum(-1) - 1
        hit = ids == self.mask_token_id
        if not bool(hit.any(-1).all()):
            raise ValueError("fwdgrad PromptLM: a masked-LM prompt has no mask token (truncated away?)")
        return hit.int().argmax(-1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"fwdgrad PromptLM: x must have shape [B, 2, T] (ids, mask), got {tuple(x.shape)}")
        ids, mask = x[:, 0].long(), x[:, 1].long()
        out = self.lm(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        at = out[torch.arange(out.shape[0], device=out.device), self.answer_positions(ids, mask)]  # [B, V]
        logits = at.index_select(-1, self.label_ids)
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels.long()), "logits": logits}


def load_prompt_lm(
    path: str | os.PathLike, label_words: Sequence[str] = ("terrible", "great"), kind: str = "auto"
) -> PromptLM:
    """A :class:`PromptLM` from a local folder (weights and tokenizer, ``local_files_only=True``) or from the
    path of a ``config.json`` (random initialisation; the tokenizer is read from its folder).

    Args:
        path: the folder, or its ``config.json``.
        label_words: one word per class, in class order (SST-2: ``0 → terrible``, ``1 → great``).
        kind: ``"causal"``, ``"masked"`` or ``"auto"`` (:func:`prompt_kind`).
    """
    where = "fwdgrad.models.hf_prompt.load_prompt_lm"
    transformers = _transformers(where)
    p = Path(path).expanduser()
    folder = _folder(p, where)
    tok = load_tokenizer(folder)
    kind = resolve_kind(p, tok, kind)
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForMaskedLM
    if p.is_file():
        lm = auto.from_config(transformers.AutoConfig.from_pretrained(str(p), local_files_only=True))
    else:
        lm = auto.from_pretrained(str(p), local_files_only=True)
    return PromptLM(lm, label_word_ids(tok, label_words), kind, tok.mask_token_id if kind == "masked" else None)


@register_model("hf-prompt")
def hf_prompt(
    input_shape: tuple[int, ...], num_classes: int, path: str = "", words: str = "terrible|great", kind: str = "auto"
) -> PromptLM:
    """``--model hf-prompt:path=DIR,words=terrible|great``: :func:`load_prompt_lm` (inputs ``[2, T]``); the
    CLI's ``--prompt`` turns ``--model hf:DIR`` into this model."""
    where = "fwdgrad.models.build_model: model 'hf-prompt'"
    if not path:
        raise ValueError(f"{where} needs path=DIR (a model folder with its tokenizer)")
    if tuple(input_shape)[:1] != (2,):
        raise ValueError(f"{where} takes inputs [2, T] (ids, mask), got {input_shape}")
    label_words = [w for w in str(words).split("|") if w]
    if len(label_words) != num_classes:
        raise ValueError(f"{where}: {len(label_words)} label words {label_words} for {num_classes} classes")
    return load_prompt_lm(path, label_words, kind)
