"""Fairness across methods, for a given seed: derived seeds, the train/validation split, the batch order
of every epoch, the initial weights, and the digests that let a report show the guarantee held.

Every method of a seed starts from the same initial weights (built under
``torch.manual_seed(derived_seed(seed, "init"))``) and sees the same batches in the same order (a
``torch.Generator`` per epoch seeded from ``derived_seed(seed, f"order:{epoch}")``). The order of epoch
``e`` is a function of ``(seed, e)`` only, which is also what lets a resumed run continue exactly where it
stopped: the position in the data order is just the epoch number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from fwdgrad.training.config import RunConfig

Tensor = torch.Tensor


class DatasetLike(Protocol):
    """What the loop needs from a :class:`fwdgrad.data.Dataset` (also the contract of a user's dataset
    factory, see ``docs/cli.md``)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]: ...


@dataclass
class Splits:
    """Train / validation / test tensors. The validation split is carved from the training set."""

    name: str
    source: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (``"init"``, ``"order:3"``…) from the run seed, stable across processes:
    the first 7 bytes of SHA-256(``f"{seed}:{purpose}"``), little-endian (so always < 2⁵⁶).

    >>> derived_seed(0, "init") == derived_seed(0, "init") != derived_seed(1, "init")
    True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:7], "little")


def split_dataset(dataset: DatasetLike, val_fraction: float, train_subset: int | None, seed: int) -> Splits:
    """Hold out ``round(val_fraction · N)`` training examples for validation (seeded permutation), then keep
    the first ``train_subset`` of the rest (all when ``None``). The test set is passed through untouched."""
    n = len(dataset.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, "split")))
    n_val = round(val_fraction * n)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:]
    if train_subset is not None:
        if train_subset > len(train_idx):
            held = f" after the {n_val} held out for validation" if n_val else ""
            raise ValueError(f"fwdgrad: --train-subset {train_subset} exceeds the {len(train_idx)} training examples "
                             f"of {getattr(dataset, 'name', 'the dataset')}{held}; give at most {len(train_idx)}, "
                             "or leave it out to train on all of them")
        train_idx = train_idx[:train_subset]
    train_idx = train_idx.sort().values
    if len(train_idx) == 0:
        raise ValueError(f"fwdgrad.training: no training example left after the validation split of {n}")
    return Splits(
        name=dataset.name, source=str(dataset.source), num_classes=int(dataset.num_classes),
        input_shape=tuple(dataset.input_shape),
        x_train=dataset.x_train[train_idx], y_train=dataset.y_train[train_idx],
        x_val=dataset.x_train[val_idx], y_val=dataset.y_train[val_idx],
        x_test=dataset.x_test, y_test=dataset.y_test,
    )


def epoch_order(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The permutation of the training set for ``epoch`` (1-based): a function of ``(seed, epoch)`` only,
    so every method sees the same batches in the same order."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(derived_seed(seed, f"order:{epoch}")))


def order_digest(num_examples: int, seed: int, epochs: int) -> hashlib._Hash:
    """The running SHA-256 of the batch orders of epochs ``1..epochs`` (what a run's ``order_digest``
    continues from after a resume)."""
    h = hashlib.sha256()
    for epoch in range(1, epochs + 1):
        h.update(epoch_order(num_examples, seed, epoch).numpy().tobytes())
    return h


def initial_model(config: RunConfig, splits: Splits, seed: int) -> nn.Module:
    """The model with the initial weights of ``seed`` (the global RNG state is left as it was)."""
    from fwdgrad.training.factories import build_model_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "init"))
        model = build_model_for(config.model, splits.input_shape, splits.num_classes, config.model_options)
    return model.to(config.device)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
