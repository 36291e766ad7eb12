"""Errors raised by fwdgrad, and the translation of PyTorch's forward-AD failures into messages that
name the operation, the module it ran in, and what to do."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

_NO_FORWARD_AD = re.compile(r"forward AD with (\S+) that does not support it")
_NO_JVP = "implement the jvp function for custom autograd.Function"
# torch.func (vmap over jvp, K > 1 directions) reports a Function without setup_context/jvp this way
_NO_FUNCTORCH = "In order to use an autograd.Function with functorch transforms"


class ForwardADNotSupportedError(NotImplementedError):
    """An operation in the loss has no forward-mode AD rule, so no JVP can be formed through it."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient estimate is NaN or infinite; nothing was written to the parameters."""


@contextlib.contextmanager
def explain_float16_overflow(params: object) -> Iterator[None]:
    """Add the likely reason to a :class:`NonFiniteError` raised in the block when a parameter is float16,
    whose range ends at 65504 (PyTorch's forward-AD rules, ``layer_norm``'s among them, overflow there where
    bfloat16 and float32 do not)."""
    try:
        yield
    except NonFiniteError as exc:
        if not any(getattr(p, "dtype", None) == torch.float16 for p in params):  # type: ignore[attr-defined]
            raise
        raise NonFiniteError(
            f"{exc}; the parameters are float16, whose range ends at 65504: a tangent or an activation may have "
            "overflowed (bfloat16 weights, or float32 weights under torch.autocast, have float32's range)"
        ) from None


def _describe(exc: BaseException) -> str | None:
    text = str(exc)
    match = _NO_FORWARD_AD.search(text)
    if match:
        return f"operation {match.group(1)!r} has no forward-mode AD rule in PyTorch {torch.__version__}"
    if _NO_JVP in text or _NO_FUNCTORCH in text:
        return (
            "a custom torch.autograd.Function without a jvp staticmethod (with several directions at once it "
            "also needs setup_context, and generate_vmap_rule = True or a vmap staticmethod)"
        )
    return None


_ADVICE = (
    "Replace it with operations that support forward AD, wrap it in a torch.autograd.Function that "
    "defines jvp, or train this model with the 'bp' estimator."
)


@contextlib.contextmanager
def explain_forward_ad_errors(where: str, model: nn.Module | None = None) -> Iterator[None]:
    """Turn PyTorch's "no forward AD" ``NotImplementedError`` into a ``ForwardADNotSupportedError``.

    While active, a global forward pre-hook keeps the stack of modules being run, so the message can say
    which module of ``model`` (by qualified name and type) ran the unsupported operation.
    """
    stack: list[nn.Module] = []
    handles = []
    if model is not None:

        def push(module: nn.Module, args: object) -> None:
            stack.append(module)

        def pop(module: nn.Module, args: object, output: object) -> None:
            if stack and stack[-1] is module:
                stack.pop()

        push._fwdgrad_benign = pop._fwdgrad_benign = True  # type: ignore[attr-defined]  # see derivatives.rules
        handles = [
            nn.modules.module.register_module_forward_pre_hook(push),
            nn.modules.module.register_module_forward_hook(pop),
        ]
    try:
        yield
    except (NotImplementedError, RuntimeError) as exc:
        what = _describe(exc)
        if what is None:
            raise
        place = ""
        if model is not None:
            names = {id(m): n for n, m in model.named_modules()}
            inner = [m for m in stack if id(m) in names]
            if inner:
                m = inner[-1]
                place = f" in module {names[id(m)] or '<root>'!r} ({type(m).__name__})"
        raise ForwardADNotSupportedError(f"{where}: {what}{place}. {_ADVICE}") from exc
    finally:
        for h in handles:
            h.remove()
