"""benchmarks/ren2023_mnist.py end to end on generated MNIST files (a few images: it checks the wiring of
method specs with options, their learning rates, the held-out split and the paper's figures, not accuracy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import make_idx_files
from fwdgrad.data import RESOURCES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmark sets its own thread count; put the suite's back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_fg_w_with_exact_readout_and_lg_fg_w_run_with_their_own_rates(tmp_path, monkeypatch):
    files = make_idx_files(n_train=40, n_test=10)
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    files.write(tmp_path / "mnist")
    monkeypatch.syspath_prepend(str(BENCH))
    import ren2023_mnist

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "ren2023_mnist.py", "--data-dir", str(tmp_path), "--configs", "s1", "--epochs", "1", "--batch-size", "8",
        "--train-eval", "8", "--val-fraction", "0.25", "--methods", "fg-w:readout=exact;lg-fg-w:lr=0.02",
        "--lr", "fg-w:readout=exact=0.05", "--out", str(out),
    ])
    ren2023_mnist.main()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["method"], r["lr"]) for r in runs] == [("fg-w:readout=exact", 0.05), ("lg-fg-w", 0.02)]
    assert [r["paper"] for r in runs] == [[9.25, 8.93], [9.25, 8.93]]  # Table 3, S/1/1, by estimator name
    assert runs[0]["train_examples_per_epoch"] == 30  # 10 of the 40 held out
    assert all(0 <= r["curve"][-1]["val_error"] <= 100 for r in runs)
    assert "fg-w:readout=exact" in (out / "table.md").read_text()
