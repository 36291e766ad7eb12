"""The default learning rates learn: one epoch of every method at its default rate (SGD with momentum and
Adam) stays finite and never diverges, and lowers the training loss (by 5 % or more for the exact-gradient
and feedback methods), through ``benchmarks/defaults_sweep.py`` (the script behind the table in
docs/cli.md).

The default suite runs MNIST-1D × mlp (generated, no files); the ``slow`` test runs the pairs of the table
(:data:`MEASURED`) when their data files are present (MNIST / Fashion-MNIST in ``FWDGRAD_DATA_DIR`` or ../shared/data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FWDGRAD_DATA_DIR", ROOT.parent / "shared" / "data"))
# One direction per step for every weight: in one epoch these move the probe loss by less than its noise
# (zo-sign with Adam on MNIST-1D: 2.30756 → 2.30776; fg-w with SGD: → 2.3067), so for them the test asserts
# finite and not diverging (the table in docs/cli.md gives their numbers), not a fall.
AT_NOISE_LEVEL = {"fg-w", "fg-w-momentum", "fg-w-mixed", "l-fg-w", "lg-fg-w", "online-fg", "zo", "zo-sign", "zo-cons"}
# Exact-gradient and feedback methods must also clear the sweep's "learns" bar (a drop of 5 % or more in one
# epoch). DFA with SGD is the exception: its 0.01 falls by 3.7 % on MNIST-1D, the price of not diverging on
# Fashion-MNIST (0.02 did).
MUST_LEARN = {"bp", "fa", "dfa", "fdfa", "l-bp", "lg-bp", "forward-exact", "bp-tbptt"}
SLOW_BUT_STABLE = {("mnist1d", "mlp", "dfa", "sgd")}
# bp with SGD 0.1 on the MNIST-1D cnn: the probe loss rises in the first epoch (2.30 → 2.76, the epoch's mean
# 2.21) before it falls; a 20-epoch run at this default reaches 94.5 % (docs/cli.md). Known, not hidden.
# fg-guess with Adam on MNIST's block-cnn: 2.31 → 2.37 in the 16 steps of its 2,048-example epoch (a rise under
# the 5 % that counts as divergence); not measured on a longer epoch.
FIRST_EPOCH_RISE = {("mnist1d", "cnn", "bp", "sgd"), ("mnist", "block-cnn", "fg-guess", "adam")}


# The pairs of the table in docs/cli.md (the sweep's other pairs were not measured: CPU time ran out).
MEASURED = ("mnist1d:mlp", "mnist1d:fdfa-mlp", "mnist1d:cnn", "mnist1d:gru", "mnist1d:lstm", "mnist1d:lif",
            "mnist:mlp", "mnist:fdfa-mlp", "mnist:localmixer-s1", "fashion-mnist:mlp", "seqmnist:gru",
            "mnist:block-cnn", "mnist:fdfa-cnn")


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
        key = (r["dataset"], r["model"], r["method"], r["optimizer"])
        if key in FIRST_EPOCH_RISE:
            assert r["status"] == "completed" and r["epoch_mean_loss"] < 1.5 * r["loss_before"], r
            continue
        assert r["verdict"] != "diverges", f"{where} diverged: {r}"
        if r["method"] not in AT_NOISE_LEVEL:
            assert r["loss_after"] < r["loss_before"], f"{where}: the loss did not fall: {r}"
        if r["method"] in MUST_LEARN and key not in SLOW_BUT_STABLE:
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
    rows = _sweep(tmp_path, monkeypatch, "--data-dir", str(DATA), "--pairs", ",".join(MEASURED))
    _check(rows)
