"""Models for the CLI and the training loop, by name: ``build_model("mlp", input_shape, num_classes)``.

Every model is an ordinary ``torch.nn.Module`` mapping a batch ``[B, *input_shape]`` to logits
``[B, num_classes]``, written for forward-mode AD: no in-place operations on tensors that may carry a
tangent (``nn.ReLU(inplace=True)``, ``x += y``), so the ``fg-w`` estimator works on each of them.

A model is registered with :func:`register_model`; the builder takes the input shape and the number of
classes, then keyword options (``width=256``), which the CLI passes from ``--model mlp:width=256,depth=3``.

Example:
    >>> import torch
    >>> from fwdgrad.models import build_model
    >>> model = build_model("mlp", (40,), 10, width=32, depth=2)
    >>> model(torch.randn(5, 40)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``fn(input_shape, num_classes, **options) -> nn.Module`` under ``name``.

    A class whose ``__init__`` has that signature works too. A taken name raises ``ValueError``.

    Example:
        >>> from torch import nn
        >>> @register_model("linear-doc-example")
        ... def linear(input_shape, num_classes):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        >>> "linear-doc-example" in available_models()
        True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"fwdgrad.models.register_model: name must be a non-empty str, got {name!r}")

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"fwdgrad.models.register_model: name {name!r} is taken by {_MODELS[name]!r}")
        if not callable(builder):
            raise TypeError(f"fwdgrad.models.register_model: {builder!r} is not callable")
        _MODELS[name] = builder
        return builder

    return add


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in _MODELS:
        raise ValueError(f"fwdgrad.models.build_model: unknown model {name!r}; available: {available_models()}")
    return _MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults (``inspect.Parameter.empty`` if none)."""
    builder = model_builder(name)
    target = builder.__init__ if isinstance(builder, type) else builder
    params = list(inspect.signature(target).parameters.values())
    skip = {"self", "input_shape", "num_classes"}
    return {
        p.name: p.default
        for p in params
        if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` for inputs ``[B, *input_shape]`` and ``num_classes`` logits.

    An option the model does not have raises ``ValueError`` naming it and listing the valid ones.
    """
    where = "fwdgrad.models.build_model"
    builder = model_builder(name)
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{where}: model {name!r} has no option {unknown[0]!r}; options: {sorted(known)}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{where}: input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an int >= 2, got {num_classes!r}")
    return builder(shape, num_classes, **options)


def num_parameters(model: nn.Module) -> int:
    """The number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Built-in models register themselves on import.
from fwdgrad.models import blockcnn as _blockcnn  # noqa: E402, F401
from fwdgrad.models import cnn as _cnn  # noqa: E402
from fwdgrad.models import feedback as _feedback  # noqa: E402, F401
from fwdgrad.models import hf as _hf  # noqa: E402, F401  (registers 'hf'; transformers imported lazily)
from fwdgrad.models import hf_prompt as _hf_prompt  # noqa: E402, F401  (registers 'hf-prompt')
from fwdgrad.models import mlp as _mlp  # noqa: E402
from fwdgrad.models import resnet_blocks as _resnet_blocks  # noqa: E402, F401
from fwdgrad.models.localmixer import LocalMixer as LocalMixer  # noqa: E402

MLP = _mlp.MLP
ConvNet = _cnn.ConvNet

__all__ = [
    "MLP",
    "ConvNet",
    "available_models",
    "build_model",
    "model_builder",
    "model_options",
    "num_parameters",
    "register_model",
]
from fwdgrad.models import recurrent as _recurrent  # noqa: E402,F401  (gru, lstm, lif; online-fg, forward-exact, bp-tbptt)
