"""Models and datasets from the registries or from the user's own code: ``module.path:function``.

Contract of a **model factory** ``--model mypkg.models:make_net[:key=value,...]``: the module is imported
(it must be importable: installed, or on ``PYTHONPATH``), and ``make_net(input_shape, num_classes,
**options)`` is called with the input shape of one example (a tuple of ints, e.g. ``(1, 28, 28)``), the
number of classes, and the ``key=value`` options; it returns a :class:`torch.nn.Module` mapping a batch
``[B, *input_shape]`` to logits ``[B, num_classes]``. It is called under a seeded global RNG, so the
initial weights are the same for every method of a seed. The same contract as
:func:`fwdgrad.models.register_model` builders.

Contract of a **dataset factory** ``--dataset mypkg.data:make_data``: ``make_data()`` is called with no
argument and returns a :class:`fwdgrad.data.Dataset`, or any object with the attributes ``x_train``,
``x_test`` (floating point ``[N, *input_shape]``), ``y_train``, ``y_test`` (int64 ``[N]`` in ``0 ..
num_classes-1``), ``num_classes`` (int), and optionally ``name`` and ``source`` (str); it is checked
(and converted) by building a :class:`fwdgrad.data.Dataset` from those attributes.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

FACTORY = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)$")


def is_factory(name: str) -> bool:
    """Whether ``name`` is ``module.path:function`` (not a registry name).

    >>> is_factory("mypkg.nets:make"), is_factory("mlp")
    (True, False)
    """
    return isinstance(name, str) and FACTORY.match(name) is not None


def resolve_factory(spec: str, where: str) -> Callable[..., Any]:
    """Import ``module`` and return its callable ``function`` for ``module:function``."""
    m = FACTORY.match(spec)
    if m is None:
        raise ValueError(f"{where}: {spec!r} is not module.path:function")
    try:
        module = importlib.import_module(m["module"])
    except ImportError as exc:
        raise ValueError(f"{where}: cannot import module {m['module']!r} of {spec!r} ({exc}); "
                         "is it installed or on PYTHONPATH?") from None
    fn = getattr(module, m["function"], None)
    if not callable(fn):
        raise ValueError(f"{where}: module {m['module']!r} has no callable {m['function']!r}")
    return fn


def _accepted_options(fn: Callable[..., Any], skip: int) -> set[str] | None:
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_model(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when the model (registry name or factory) does not exist or does not take one
    of ``options``."""
    from fwdgrad.models import model_builder, model_options

    if is_factory(name):
        known = _accepted_options(resolve_factory(name, "fwdgrad: --model"), 2)
    else:
        model_builder(name)
        known = set(model_options(name))
    unknown = sorted(set(options) - known) if known is not None else []
    if unknown:
        raise ValueError(f"fwdgrad: model {name!r} has no option {unknown[0]!r}; options: {sorted(known or ())}")


def build_model_for(name: str, input_shape: Sequence[int], num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """The model ``name`` (registry name or ``module:function`` factory) for this data."""
    if not is_factory(name):
        from fwdgrad.models import build_model

        return build_model(name, input_shape, num_classes, **options)
    model = resolve_factory(name, "fwdgrad: --model")(tuple(input_shape), int(num_classes), **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"fwdgrad: --model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_dataset_for(name: str, data_dir: str | None = None, *, download: bool = False) -> Any:
    """The dataset ``name``: ``fwdgrad.data.load_dataset`` for a registry name, else the factory's
    result checked as a :class:`fwdgrad.data.Dataset`."""
    from fwdgrad.data import Dataset, load_dataset

    if not is_factory(name):
        return load_dataset(name, data_dir, download=download)
    where = f"fwdgrad: --dataset {name!r}"
    made = resolve_factory(name, "fwdgrad: --dataset")()
    if isinstance(made, Dataset):
        return made
    missing = [a for a in ("x_train", "y_train", "x_test", "y_test", "num_classes") if not hasattr(made, a)]
    if missing:
        raise ValueError(f"{where}: the factory returned {type(made).__name__} without {missing}")
    try:
        return Dataset(str(getattr(made, "name", name)), made.x_train, made.y_train, made.x_test, made.y_test,
                       int(made.num_classes), str(getattr(made, "source", f"factory {name}")))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
