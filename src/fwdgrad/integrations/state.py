"""The state of an estimator that a framework checkpoint carries, so a resumed run draws the directions an
uninterrupted one would have drawn.

An estimator's state is its private ``torch.Generator`` (``seed=`` / ``generator=``; ``None`` when it
draws from torch's global RNG, which the frameworks checkpoint themselves) and, where the estimator has
one, its own ``state_dict()`` (stateful direction sources). These two functions are the only place the
integrations read or write it, so that a public ``Estimator.state_dict()`` can replace their bodies.

Example:
    >>> import torch, fwdgrad
    >>> from fwdgrad.integrations.state import estimator_state, load_estimator_state
    >>> a, b = fwdgrad.estimator("zo", seed=0), fwdgrad.estimator("zo", seed=1)
    >>> _ = torch.randn(3, generator=a._generator)  # a has moved on
    >>> load_estimator_state(b, estimator_state(a))
    >>> bool(torch.equal(torch.randn(3, generator=a._generator), torch.randn(3, generator=b._generator)))
    True
"""

from __future__ import annotations

from typing import Any

import torch

from fwdgrad.estimators import Estimator

STATE_FORMAT = "fwdgrad-estimator-state/1"

__all__ = ["STATE_FORMAT", "estimator_state", "load_estimator_state"]


def estimator_state(est: Estimator) -> dict[str, Any]:
    """``{"format", "generator": ByteTensor | None, "state": est.state_dict() | None}``: tensors and plain
    containers only, so ``torch.load(weights_only=True)`` reads it back."""
    gen = getattr(est, "_generator", None)
    own = est.state_dict() if callable(getattr(est, "state_dict", None)) else None
    return {"format": STATE_FORMAT, "generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
            "state": own}


def load_estimator_state(est: Estimator, state: Any) -> None:
    """Restore what :func:`estimator_state` returned; ``ValueError`` (nothing changed) when ``state`` is not
    one or does not fit ``est``."""
    where = "fwdgrad.integrations.load_estimator_state"
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: not a {STATE_FORMAT} state (found {found!r})")
    gen = getattr(est, "_generator", None)
    if (state["generator"] is None) != (not isinstance(gen, torch.Generator)):
        has = "has" if isinstance(gen, torch.Generator) else "has no"
        raise ValueError(f"{where}: the saved estimator {'had no' if state['generator'] is None else 'had a'} "
                         f"private generator but {type(est).__name__} {has} one (seed= / generator=)")
    if state["state"] is not None and not callable(getattr(est, "load_state_dict", None)):
        raise ValueError(f"{where}: the saved state needs {type(est).__name__}.load_state_dict, which it lacks")
    if isinstance(gen, torch.Generator):
        gen.set_state(state["generator"])
    if state["state"] is not None:
        est.load_state_dict(state["state"])
