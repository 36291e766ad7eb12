"""The documented ResNet-18 / CIFAR-10 command of benchmarks/guided.py, run end to end on generated CIFAR files
(a tiny width and a few images: it checks the wiring, not the accuracy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import make_cifar_files
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
