"""Checkpoints: everything a killed run needs to continue exactly where its last complete epoch ended.

A checkpoint is one file, ``checkpoint.pt`` in the run folder, written atomically (:func:`fwdgrad._io.write_atomic`)
at the end of every epoch and after every run, holding only tensors and plain containers (``dict``, ``list``,
``tuple``, ``str``, numbers, ``None``), so that ``torch.load(path, weights_only=True)`` reads it::

    {"format": "fwdgrad-checkpoint/1", "command": "train" | "compare", "config": {RunConfig fields},
     "experiment": {"methods": [...], "skipped_methods": [...], "runs": [finished RunResult states],
                    "started_at": str},
     "current": None | {"method": display, "seed": int, "epoch": k,     # k complete epochs: the position
                        "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
                        "estimator": estimator.state_dict() (fwdgrad.estimators.state),
                        "rng": {"torch": ByteTensor, "cuda": [ByteTensor], "python": tuple, "numpy": tuple},
                        "result": RunResult state (history so far)}}

The position in the data order is the epoch count: the order of epoch ``e`` is a function of the seed and
``e`` only (:func:`fwdgrad.training.fairness.epoch_order`).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from fwdgrad._io import write_atomic
from fwdgrad.estimators.state import load_state, state_of

CHECKPOINT_FORMAT = "fwdgrad-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FORMAT = "fwdgrad-model/1"


def rng_state() -> dict[str, Any]:
    """The state of every global random generator: torch (CPU and CUDA), Python's ``random`` and NumPy's
    legacy global generator, as tensors and plain containers."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    try:
        import numpy as np
    except ModuleNotFoundError:  # pragma: no cover - numpy comes with torch in practice
        state["numpy"] = None
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (str(kind), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def estimator_state(est: Any) -> dict[str, Any]:
    """The state of an estimator: ``est.state_dict()`` (format: :mod:`fwdgrad.estimators.state`), or the
    base class's for a subclass that removed it; attributes holding tensors that it does not carry are named
    in ``"unsaved"``, so a resumed run can say that it may differ from an uninterrupted one."""
    own = getattr(est, "state_dict", None)
    return own() if callable(own) else state_of(est)


def set_estimator_state(est: Any, state: dict[str, Any]) -> None:
    """Restore what :func:`estimator_state` returned (checkpoints written before that format load too)."""
    own = getattr(est, "load_state_dict", None)
    if callable(own):
        own(state)
    else:
        load_state(est, state)


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save``, atomically."""
    return write_atomic(path, to_bytes(state))


def load(path: str | Path, expected_format: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Read a checkpoint or a saved model with ``torch.load(weights_only=True)``; ``ValueError`` when the
    file is not one (naming the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"fwdgrad: no file {str(path)!r}") from None
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"fwdgrad: {str(path)!r} is not a readable fwdgrad file: {exc}".splitlines()[0]) from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"fwdgrad: {str(path)!r} is not a {expected_format} file (found {found!r})")
    return state
