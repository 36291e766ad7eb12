"""Small argument checks shared by the public API.

Every message starts with the call it concerns (``where``) and names the bad value, following the
convention of ``torch.func`` and ``torch.optim``.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

import torch


def check_positive_int(where: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an ``int`` >= 1 (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {value}")


def check_real_scalar(where: str, value: Any, what: str = "loss_fn") -> torch.Tensor:
    """Raise unless ``value`` is a real floating-point tensor with a single element and no batch dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {what} must return a real scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"{where}: {what} must return a real scalar tensor, got a tensor of shape {tuple(value.shape)}"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"{where}: {what} must return a real floating-point scalar, got dtype {value.dtype}")
    return value


def check_seed_or_generator(where: str, seed: Any, generator: Any) -> None:
    """Raise unless at most one of ``seed`` (an ``int``) and ``generator`` (a ``torch.Generator``) is given.

    For estimators that build their generator lazily on the parameters' device (so unlike
    :func:`make_generator` nothing is created here).

    >>> check_seed_or_generator("f", 3, None)
    >>> check_seed_or_generator("f", 3, torch.Generator())
    Traceback (most recent call last):
    ...
    ValueError: f: give seed or generator, not both (seed=3)
    """
    if seed is not None and generator is not None:
        raise ValueError(f"{where}: give seed or generator, not both (seed={seed!r})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{where}: seed must be an int, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator, got {type(generator).__name__}")


def make_generator(where: str, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator from ``seed`` or ``generator`` (at most one); ``None`` means torch's global RNG."""
    if seed is not None and generator is not None:
        raise ValueError(f"{where}: give seed or generator, not both (seed={seed!r})")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{where}: generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{where}: seed must be in [0, 2**63), got {seed}")
    return torch.Generator().manual_seed(seed)


def check_number(
    where: str, name: str, value: Any, *, bound: str | None = None, say_finite: bool = False
) -> float:
    """``value`` as a float, or a ``ValueError`` naming it unless it is a finite real number within ``bound``.

    ``bound``: ``None``, ``"> 0"``, ``">= 0"`` or ``"in [0, 1)"``. The message says ``{name} must be a finite
    number`` for a non-number or NaN/inf and ``{name} must be {bound}`` for a value out of bounds; with
    ``say_finite`` both read ``{name} must be a finite number {bound}``.

    >>> check_number("demo", "lr", 3, bound="> 0")
    3.0
    >>> check_number("demo", "lr", 0.0, bound="> 0")
    Traceback (most recent call last):
    ...
    ValueError: demo: lr must be > 0, got 0.0
    """
    tests = {None: lambda v: True, "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0,
             "in [0, 1)": lambda v: 0 <= v < 1}
    if bound not in tests:
        raise ValueError(f"fwdgrad._validation.check_number: unknown bound {bound!r}")
    finite = f"a finite number {bound}" if say_finite and bound else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be {finite}, got {value!r}")
    if not tests[bound](value):
        raise ValueError(f"{where}: {name} must be {finite if say_finite else bound}, got {value!r}")
    return float(value)


# -- values against type annotations (the run configuration's fields, checked from their annotations) ------

def annotation_members(tp: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` → ``(int, NoneType)``); any other annotation alone."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def matches_annotation(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the annotated type ``tp`` (bool is not an int, an int is a float)."""
    members = annotation_members(tp)
    if len(members) > 1:
        return any(matches_annotation(value, m) for m in members)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(matches_annotation(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches_annotation(k, args[0]) and matches_annotation(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe_annotation(tp: Any) -> str:
    """``float | None`` → ``"a number or none"``, for error messages."""
    members = annotation_members(tp)
    if len(members) > 1:
        return " or ".join(describe_annotation(m) for m in members)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if tp in names:
        return names[tp]
    if origin is list:
        return f"a list of {describe_annotation(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    return getattr(tp, "__name__", str(tp))


def as_annotated(value: Any, tp: Any) -> Any:
    """An int given for a float-only field becomes a float (``lr = 1`` → 1.0), in lists too."""
    members = annotation_members(tp)
    if isinstance(value, int) and not isinstance(value, bool) and float in members and int not in members:
        return float(value)
    if isinstance(value, list):
        inner = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
        if inner:
            return [as_annotated(v, inner[0]) for v in value]
    return value
