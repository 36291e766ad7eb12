"""benchmarks/largest_model.py's smoke test (``--quick``: tiny OPT-style configs): every method's step runs and
moves the model, one (size, method) runs in its own capped process end to end, and a size whose estimate is
over the cap is not started. Skipped without ``transformers`` / ``peft``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import largest_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(method: str, size: str = "tiny-a") -> dict:
    return {"size": size, "method": method, "quick": True, "seq": 16, "batch": 2, "steps": 1, "forwards": 1,
            "threads": 1, "device": "cpu", "cap_gb": 4.0}


@pytest.mark.parametrize("method", largest_model.METHODS)
def test_each_method_steps_in_process(method: str) -> None:
    r = largest_model.measure(spec(method))
    assert r["status"] == "ok" and r["peak_bytes"] > 0 and r["step_over_forward"] > 0
    assert all(math.isfinite(v) for v in r["step_losses"]) and len(r["step_losses"]) == 2
    if method == "zo-lora-bf16":
        assert 0 < r["trainable"] < r["parameters"]
    else:
        assert r["trainable"] == r["parameters"]


def test_quick_run_end_to_end_in_a_capped_process(tmp_path) -> None:
    out = tmp_path / "out"
    res = largest_model.main(["--quick", "--sizes", "tiny-a", "--methods", "zo-bf16", "--seq", "16",
                              "--memory-cap", "4", "--out", str(out)])
    assert [r["status"] for r in res["runs"]] == ["ok"]
    assert res["largest"]["zo-bf16"] == res["runs"][0]["parameters"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == res["runs"]
    table = (out / "table.md").read_text()
    assert "| tiny-a |" in table and "Memory cap 4 GB" in table
    assert (out / "memory.png").stat().st_size > 0


def test_sizes_over_the_cap_are_not_started(tmp_path) -> None:
    before = torch.get_num_threads()
    res = largest_model.main(["--quick", "--sizes", "tiny-b", "--methods", "adam-fp32", "--memory-cap", "0.0001",
                              "--out", str(tmp_path)])
    torch.set_num_threads(before)
    assert res["runs"][0]["status"].startswith("not started: estimate")
    assert res["largest"] == {"adam-fp32": 0}
    assert "not started" in (tmp_path / "table.md").read_text()
    (tmp_path / "table.md").unlink()
    again = largest_model.main(["--report-only", "--out", str(tmp_path)])  # the table from results.json
    assert again["runs"] == res["runs"] and "not started" in (tmp_path / "table.md").read_text()
