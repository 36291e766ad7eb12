"""examples/lightning_forward_gradient.py: a LightningModule with manual optimisation calling
``est(self, loss_fn)``. What is proved: it trains (the loss falls, no backward is needed by ``fg-w``), and
a run resumed from a Lightning checkpoint ends with exactly the weights of an uninterrupted run, because
the checkpoint carries the estimator's generator (the control, which drops it on loading, differs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

_spec = importlib.util.spec_from_file_location(
    "lightning_forward_gradient", Path(__file__).parents[1] / "examples" / "lightning_forward_gradient.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _loader():  # 48 examples, 4 steps an epoch
    return torch.utils.data.DataLoader(example.synthetic_data(48), batch_size=12)


def _fit(module, steps: int, root: Path, ckpt: Path | None = None):
    example.trainer(steps, root).fit(module, _loader(), ckpt_path=str(ckpt) if ckpt else None)
    return module


def _fresh(cls=None):
    torch.manual_seed(0)
    return (cls or example.ForwardGradientModule)()


def test_training_lowers_the_loss(tmp_path) -> None:
    module = _fresh()
    x, y = example.synthetic_data(48).tensors

    def loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(module(x), y))

    before = loss()
    _fit(module, 40, tmp_path)
    assert loss() < 0.8 * before


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path) -> None:
    """The checkpoint is Lightning's own ``ModelCheckpoint`` at step 4, an epoch boundary (a mid-epoch one
    resumes with the dataloader started again, Lightning's behaviour for a plain ``DataLoader``)."""
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    whole = _fresh()
    example.trainer(8, tmp_path, callbacks=[saver]).fit(whole, _loader())
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert example.STATE_KEY in torch.load(ckpt, weights_only=False)
    resumed = _fit(_fresh(), 8, tmp_path, ckpt)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    class Forgetful(example.ForwardGradientModule):
        def on_load_checkpoint(self, checkpoint: dict) -> None:  # the estimator starts again from its seed
            pass

    control = _fit(_fresh(Forgetful), 8, tmp_path, ckpt)
    assert not all(torch.equal(p, q) for p, q in zip(whole.parameters(), control.parameters()))
