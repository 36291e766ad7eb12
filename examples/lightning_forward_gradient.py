"""Forward-gradient training inside PyTorch Lightning: manual optimisation, one estimator call per step.

The ``LightningModule`` turns off automatic optimisation and, in ``training_step``, lets the estimator
write ``.grad`` instead of calling ``manual_backward``::

    opt.zero_grad()
    loss = self.est(self, loss_fn)     # est(model, loss_fn): the module itself is the model
    opt.step()

The estimator's state (its private generator) goes into Lightning's checkpoint through the module's
``on_save_checkpoint`` / ``on_load_checkpoint`` hooks, so ``trainer.fit(..., ckpt_path=...)`` resumes with
the directions an uninterrupted run would have drawn (``tests/test_integration_lightning.py`` checks that the
weights agree bit for bit, from a ``ModelCheckpoint`` at an epoch boundary: from a mid-epoch checkpoint
Lightning starts a plain ``DataLoader`` again at its first batch, so the data order differs).

Run: ``python examples/lightning_forward_gradient.py`` (CPU, seconds; needs ``pip install 'fwdgrad[lightning]'``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fwdgrad

STATE_KEY = "fwdgrad_estimator"


class ForwardGradientModule(L.LightningModule):
    """A small classifier trained by ``estimator`` (any registry name) and SGD with momentum."""

    def __init__(self, estimator: str = "fg-w", lr: float = 0.01, seed: int = 0, inputs: int = 8) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(inputs, 16), nn.Tanh(), nn.Linear(16, 2))
        self.est = fwdgrad.estimator(estimator, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.est(self, lambda m: F.cross_entropy(m(x), y))
        opt.step()
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = self.est.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.est.load_state_dict(checkpoint[STATE_KEY])


def synthetic_data(n: int = 64, inputs: int = 8, seed: int = 0) -> TensorDataset:
    """A linearly separable two-class problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def trainer(max_steps: int, root: str | Path, callbacks: list | None = None) -> L.Trainer:
    """A quiet CPU trainer; checkpoints only through the ``callbacks`` given (e.g. ``ModelCheckpoint``)."""
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks or [], enable_checkpointing=bool(callbacks),
                     default_root_dir=str(root))


def main() -> None:
    torch.manual_seed(0)
    loader = DataLoader(synthetic_data(), batch_size=16)
    with tempfile.TemporaryDirectory() as root:  # 4 steps an epoch; a checkpoint at the end of each
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1)
        trainer(8, root, [saver]).fit(ForwardGradientModule(), loader)
        ckpt = Path(root) / "epoch=0-step=4.ckpt"
        torch.manual_seed(0)
        resumed = ForwardGradientModule()
        trainer(40, root).fit(resumed, loader, ckpt_path=str(ckpt))
        x, y = synthetic_data().tensors
        with torch.no_grad():
            acc = (resumed(x).argmax(-1) == y).double().mean()
        print(f"resumed from {ckpt.name} to step 40; train accuracy {acc:.2f}")


if __name__ == "__main__":
    main()
