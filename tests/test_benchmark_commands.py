"""Benchmark commands run end to end on generated data files (tiny models and a few images: they check the
wiring, not the accuracy): the documented ResNet-18 / CIFAR-10 command of benchmarks/guided.py, and
benchmarks/ren2023_mnist.py with method options, their learning rates, the held-out split and the paper's
figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import make_cifar_files, make_idx_files
from fwdgrad.data import RESOURCES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmark sets its own thread count; put the suite's back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_resnet18_cifar_command_runs_on_generated_files(tmp_path, monkeypatch):
    files = make_cifar_files()
    monkeypatch.setitem(RESOURCES, "cifar10", files.resources())
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(files.tarball)
    monkeypatch.syspath_prepend(str(BENCH))
    import guided

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "guided.py", "--dataset", "cifar10", "--data-dir", str(tmp_path),
        "--model", "resnet18-blocks:blocks=16,width=2", "--methods", "l-bp,fg-guess:guess=local,space=weight",
        "--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "5e-4", "--default-lr", "0.05",
        "--batch-size", "8", "--epochs", "1", "--step-every", "30", "--step-gamma", "0.2", "--train-eval", "8",
        "--out", str(out),
    ])
    guided.main()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["l-bp", "fg-guess:guess=local,space=weight"]
    assert all(0 <= r["curve"][-1]["test_error"] <= 100 for r in runs)
    assert "fg-guess:guess=local,space=weight" in (out / "table.md").read_text()


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
