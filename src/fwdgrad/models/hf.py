"""Hugging Face sequence classifiers as fwdgrad models (optional extra ``fwdgrad[hf]``).

:func:`load_hf_model` takes a local folder (``config.json`` and weights, read with ``local_files_only=True``;
nothing is downloaded) or a ``config.json`` file alone (random initialisation), and returns a
:class:`HFClassifier`: an ``nn.Module`` mapping a batch ``x`` of shape ``[B, 2, T]`` (token ids and attention
mask, stacked; any dtype, cast to ``int64``) to logits ``[B, num_labels]``, so the training loop's
``cross_entropy(model(x), y)`` and every estimator work unchanged. :meth:`HFClassifier.loss` is the model's
own loss (``labels=`` passed to the Hugging Face model). :mod:`fwdgrad.data.glue` produces such ``x``.

Forward-mode estimators need attention on the math path: wrap their passes in
:func:`fwdgrad.derivatives.attention.forward_mode_attention` (zeroth-order ones only evaluate, and do not).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
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
