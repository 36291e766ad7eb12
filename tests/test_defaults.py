"""The default learning rates learn: one epoch of every method at its default rate (SGD with momentum and
Adam) lowers the training loss and never diverges, through ``benchmarks/defaults_sweep.py`` (the script
behind the table in docs/cli.md).

The default suite runs MNIST-1D × mlp (generated, no files); the ``slow`` test runs every built-in pair of
the sweep whose data files are present (MNIST / Fashion-MNIST in ``FWDGRAD_DATA_DIR`` or ../shared/data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FWDGRAD_DATA_DIR", ROOT.parent / "shared" / "data"))
# Exact-gradient and feedback methods must also clear the sweep's "learns" bar (a drop of 5 % or more in one
# epoch); the perturbation families' one-epoch progress is small by nature (variance ∝ perturbed dimensions),
# so for them the loss must fall and stay finite.
MUST_LEARN = {"bp", "fa", "dfa", "fdfa", "l-bp", "lg-bp", "forward-exact", "bp-tbptt"}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> list[dict]:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import defaults_sweep

    assert defaults_sweep.main(["--out", str(tmp_path), "--threads", "1", *argv]) == 0
    return json.loads((tmp_path / "results.json").read_text())["rows"]


def _check(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        where = f"{r['dataset']} × {r['model']}, {r['method']} with {r['optimizer']} at lr {r['lr']:g}"
        assert r["verdict"] != "diverges", f"{where} diverged: {r}"
        assert r["loss_after"] < r["loss_before"], f"{where}: the loss did not fall: {r}"
        if r["method"] in MUST_LEARN:
            assert r["verdict"] == "learns", f"{where}: the loss fell less than 5 %: {r}"


def test_every_default_learns_on_mnist1d_mlp(tmp_path, monkeypatch):
    rows = _sweep(tmp_path, monkeypatch, "--pairs", "mnist1d:mlp")
    assert {r["optimizer"] for r in rows} == {"sgd", "adam"}
    assert {"bp", "fg-w", "fg-a", "fa", "dfa", "fdfa", "zo"} <= {r["method"] for r in rows}
    _check(rows)


@pytest.mark.slow
def test_every_default_learns_on_every_built_in_pair(tmp_path, monkeypatch):
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"no MNIST files in {DATA} (set FWDGRAD_DATA_DIR)")
    rows = _sweep(tmp_path, monkeypatch, "--data-dir", str(DATA))
    _check(rows)
