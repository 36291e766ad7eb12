"""An estimator's state between steps, as a plain dict: what ``est.state_dict()`` returns and
``est.load_state_dict()`` restores, so any loop or trainer can checkpoint an estimator with the model and
the optimizer.

The format (only tensors, ``str``, ``int``, ``list``, ``dict`` and ``None``: ``torch.save`` it and read it
back with ``torch.load(path, weights_only=True)``)::

    {"format": "fwdgrad-estimator-state/1",
     "generator": ByteTensor | None,     # the private torch.Generator's state (None: none drawn from yet,
                                          # or the estimator draws from torch's global RNG)
     "generator_device": str | None,      # where that generator lives ("cpu", "cuda:0")
     "fused_momentum": [Tensor] | None,   # sgd_step's momentum buffers, in the order of the parameters
     "state": dict | None,                # the recipe's own state: momentum directions {"average", "count"},
                                          # feedback matrices {"feedback", "moments", "steps"}, fixed guesses
     "unsaved": [str]}                    # attributes holding tensors that the state does not carry (a user
                                          # subclass's own memory): a restored run may differ from an
                                          # uninterrupted one

State bound to parameters (momentum buffers, running averages) binds again at the next step to parameters
of matching shapes, moved to their dtype and device. The global RNG (an estimator built without ``seed``
or ``generator``) is the caller's to checkpoint (``torch.get_rng_state()``).

Example:
    >>> import io, torch, torch.nn.functional as F, fwdgrad
    >>> model = torch.nn.Linear(4, 2)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> est = fwdgrad.estimator("fg-w-momentum", seed=0)
    >>> _ = est(model, lambda m: F.cross_entropy(m(x), y))
    >>> buf = io.BytesIO()
    >>> torch.save(est.state_dict(), buf)
    >>> _ = buf.seek(0)
    >>> fresh = fwdgrad.estimator("fg-w-momentum", seed=0)
    >>> fresh.load_state_dict(torch.load(buf, weights_only=True))
    >>> fresh.state_dict()["state"]["count"]
    1
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

Tensor = torch.Tensor

ESTIMATOR_STATE_FORMAT = "fwdgrad-estimator-state/1"
_KEYS = frozenset({"format", "generator", "generator_device", "fused_momentum", "state", "unsaved"})
#: attributes of the base classes that the state always carries (or that need none)
_BASE_ATTRIBUTES = frozenset({"_generator", "_momentum_buffers", "_pending_momentum"})


def holds_tensor(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a tensor or a (shallow) container or dataclass holding one."""
    if isinstance(value, Tensor):
        return True
    if depth > 3:
        return False
    if isinstance(value, list | tuple | set):
        return any(holds_tensor(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(holds_tensor(v, depth + 1) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(holds_tensor(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return False


def state_of(est: Any) -> dict[str, Any]:
    """``est``'s state in the format of the module docstring (``Estimator.state_dict``)."""
    gen = vars(est).get("_generator")
    buffers = vars(est).get("_momentum_buffers") or {}
    covered = _BASE_ATTRIBUTES | set(getattr(est, "_state_attributes", ()))
    unsaved = sorted(k for k, v in vars(est).items() if k not in covered and holds_tensor(v))
    own = est._extra_state() if callable(getattr(est, "_extra_state", None)) else None
    return {
        "format": ESTIMATOR_STATE_FORMAT,
        "generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
        "generator_device": str(gen.device) if isinstance(gen, torch.Generator) else None,
        "fused_momentum": [b.detach().clone() for b in buffers.values()] or None,
        "state": own,
        "unsaved": unsaved,
    }


def load_state(est: Any, state: Any) -> None:
    """Restore what :func:`state_of` returned (``Estimator.load_state_dict``); a checkpoint of fwdgrad's
    training loop written before this format (keys ``generator``, ``state``, ``unsaved``) loads too."""
    where = f"{type(est).__name__}.load_state_dict"
    if not isinstance(state, dict):
        raise TypeError(f"{where}: state must be a dict from state_dict(), got {type(state).__name__}")
    unknown = sorted(set(state) - _KEYS)
    if unknown or state.get("format", ESTIMATOR_STATE_FORMAT) != ESTIMATOR_STATE_FORMAT:
        found = unknown or [state.get("format")]
        raise ValueError(f"{where}: not a {ESTIMATOR_STATE_FORMAT} state (unexpected {found})")
    gen_state = state.get("generator")
    if gen_state is not None:
        gen = vars(est).get("_generator")
        if not isinstance(gen, torch.Generator):
            if "_seed" not in vars(est):  # built without seed or generator: draws from the global RNG
                raise ValueError(f"{where}: the state holds a generator but this estimator has none; build it "
                                 "with seed=... or generator=...")
            gen = torch.Generator(device=state.get("generator_device") or "cpu")  # a lazily made one
            est._generator = gen
        gen.set_state(gen_state)
    vars(est).pop("_momentum_buffers", None)
    fused = state.get("fused_momentum")
    est._pending_momentum = [t.detach().clone() for t in fused] if fused else None
    own = state.get("state")
    if callable(getattr(est, "_load_extra_state", None)):
        est._load_extra_state(own)
    elif own is not None:
        raise ValueError(f"{where}: this estimator keeps no state of its own, got one")


def bind_fused_momentum(est: Any, params: list[Tensor]) -> dict[Tensor, Tensor]:
    """``sgd_step``'s momentum buffers (parameter → buffer), with restored ones bound to ``params`` when
    their number and shapes match (moved to each parameter's dtype and device)."""
    buffers = vars(est).setdefault("_momentum_buffers", {})
    pending = vars(est).pop("_pending_momentum", None)
    if pending and not buffers and [t.shape for t in pending] == [p.shape for p in params]:
        buffers.update(zip(params, pending))
    for p in params:  # after model.double() / model.to(device): the buffers follow their parameters
        b = buffers.get(p)
        if b is not None and (b.dtype != p.dtype or b.device != p.device):
            buffers[p] = b.to(device=p.device, dtype=p.dtype)
    return buffers
