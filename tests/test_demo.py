"""``make demo`` (examples/demo.py) end to end on a smoke budget: every method it names is registered and
runs on its model, the report has one row per method with its sweep, the findings under the table, and the
plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fwdgrad

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import demo as module

    before = torch.get_num_threads()
    yield module
    torch.set_num_threads(before)


def test_demo_names_registered_methods_on_every_model_it_has(demo) -> None:
    names = {spec.split(":")[0] for spec, *_ in demo.METHODS}
    assert names <= set(fwdgrad.available_estimators())
    feed_forward = {n for n in fwdgrad.available_estimators()
                    if fwdgrad.estimators.recipe(n).needs not in ("sequence-model", "diagonal-recurrence")}
    assert feed_forward <= names, feed_forward - names  # every feed-forward method is in the demo
    assert {key for _, key, *_ in demo.METHODS} == set(demo.MODELS)
    for key in demo.MODELS:  # backprop on every model, as the reference of its rows
        assert ("bp", key) in {(spec, k) for spec, k, *_ in demo.METHODS}


def test_demo_smoke_run_writes_table_findings_and_plot(demo, tmp_path) -> None:
    only = "bp,fg-w,fdfa,lg-fg-a"
    assert demo.main(["--quick", "--only", only, "--workers", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["bp", "fg-w", "bp", "fdfa", "bp", "lg-fg-a"]
    assert "Closest to backprop without a backward pass" in text and "chance is 10 %" in text
    result = json.loads((tmp_path / "results.json").read_text())
    assert all(len(r["sweep"]) == 2 for r in result["rows"]) and result["cpu_s"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
