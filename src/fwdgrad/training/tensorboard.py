"""TensorBoard scalars beside the CSV logs (``--tensorboard``; needs the optional ``tensorboard`` package).

One event folder per run, ``<run>/tensorboard/<method>_seed<k>/``, with one point per epoch of
``train_loss``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` and ``lr`` (global step = epoch).
A resumed run purges the points after its checkpoint's epoch, so the curves have no duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCALARS = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "lr")


def check_available() -> None:
    """Raise ``ValueError`` with the install command when ``tensorboard`` is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError(
            "fwdgrad: --tensorboard needs the tensorboard package: pip install 'fwdgrad[tensorboard]'"
        ) from None


class TensorBoardLog:
    """Writers keyed by run; :meth:`epoch` adds one epoch's scalars, :meth:`close` flushes them all."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out) / "tensorboard"
        self._writers: dict[tuple[str, int], Any] = {}

    def epoch(self, method: str, seed: int, row: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from fwdgrad.training.report import safe_filename

        key = (method, seed)
        if key not in self._writers:
            self._writers[key] = SummaryWriter(str(self.root / f"{safe_filename(method)}_seed{seed}"),
                                               purge_step=int(row["epoch"]))
        w = self._writers[key]
        for name in SCALARS:
            value = row.get(name)
            if isinstance(value, int | float) and value == value:  # skip NaN
                w.add_scalar(name, value, int(row["epoch"]))
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
