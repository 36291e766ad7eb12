"""Checkpoints: everything a killed run needs to continue exactly where its last complete epoch ended.

A checkpoint is one file, ``checkpoint.pt`` in the run folder, written atomically at the end of every epoch
and after every run, holding only tensors and plain containers (``dict``, ``list``, ``tuple``, ``str``,
numbers, ``None``), so that ``torch.load(path, weights_only=True)`` reads it. Checkpoints, saved models
(``--save-model``) and the initial weights of a replay log are written by :func:`save` and read by
:func:`load` (:func:`fwdgrad._io.save_verified` / :func:`~fwdgrad._io.load_verified`): each carries its format
tag and a SHA-256 content digest, checked on load, so a file damaged on disk is refused by name. Files of the
earlier formats (``fwdgrad-checkpoint/1``, ``fwdgrad-model/1``: no digest, from development versions before
the first release) are refused as of another format::

    {"format": "fwdgrad-checkpoint/2", "digest": "sha256:...", "command": "train" | "compare",
     "config": {RunConfig fields},
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

import random
from pathlib import Path
from typing import Any

import torch

from fwdgrad._io import load_verified, save_verified
from fwdgrad.estimators.state import load_state, state_of

CHECKPOINT_FORMAT = "fwdgrad-checkpoint/2"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FORMAT = "fwdgrad-model/2"
# what `fwdgrad evaluate` needs of a saved model (data_dir: since fwdgrad-model/2; None when not given)
MODEL_KEYS = ("model", "model_options", "input_shape", "num_classes", "dataset", "method", "seed", "state_dict")
CHECKPOINT_KEYS = ("command", "config", "experiment", "current")
_WHAT = {CHECKPOINT_FORMAT: "fwdgrad checkpoint", MODEL_FORMAT: "fwdgrad saved model"}


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


def save(path: str | Path, state: dict[str, Any], file_format: str = CHECKPOINT_FORMAT) -> Path:
    """Write ``state`` with ``torch.save``, atomically, tagged ``file_format`` and with its content digest."""
    return save_verified(path, state, file_format)


def load(path: str | Path, expected_format: str = CHECKPOINT_FORMAT, required: tuple[str, ...] | None = None
         ) -> dict[str, Any]:
    """Read a checkpoint or a saved model with ``torch.load(weights_only=True)`` and check its digest;
    ``ValueError`` naming the file when it is not one, lacks a key it needs (``required``; default: those of
    its format), or is damaged."""
    if required is None:
        required = {CHECKPOINT_FORMAT: CHECKPOINT_KEYS, MODEL_FORMAT: MODEL_KEYS}.get(expected_format, ())
    return load_verified(path, expected_format, what=_WHAT.get(expected_format, "fwdgrad file"), required=required)
