"""``fwdgrad bench``: the workers, the report and the CLI entry (no timing is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from fwdgrad import cli
from fwdgrad.bench import (
    Config,
    Result,
    full_configs,
    k_scaling_lines,
    markdown_table,
    measure_round_robin,
    quick_configs,
    run_benchmark,
)


def test_two_tiny_configurations_timed_round_robin_memory_in_fresh_processes(tmp_path) -> None:
    configs = [Config("tiny-mlp", "bp"), Config("tiny-mlp", "fg-w", "rank1", 2, fused=True)]
    results = run_benchmark(configs, tmp_path, steps=2, warmup=0, threads=1, log=None, timeout=120)
    assert [r.error for r in results] == ["", ""]
    for r in results:
        assert r.median_ms > 0 and len(r.times_ms) == 2 and r.threads == 1 and r.timing == "round-robin"
        assert math.isfinite(r.extra_mb) and "MALLOC_MMAP" in r.memory_method and "cpu" in r.device
        assert math.isnan(r.extra_default_mb)  # only a fresh-process timing run has its own peak
    table = (tmp_path / "speed_memory.md").read_text()
    assert "| bp |" in table and "| 1.00 |" in table and "fg-w rank1 K=2 fused" in table
    assert "round-robin" in table and results[0].device in table
    data = json.loads((tmp_path / "speed_memory.json").read_text())
    assert [d["config"]["method"] for d in data["results"]] == ["bp", "fg-w"]
    assert (tmp_path / "speed_memory.png").stat().st_size > 0


def test_round_robin_in_process_reports_a_failing_configuration_in_its_row() -> None:
    good, bad = Config("tiny-mlp", "bp"), Config("tiny-mlp", "fg-w", "no-such-tangents")
    res = measure_round_robin([good, bad, Config("tiny-mlp", "fg-w", "gaussian", 2)], steps=3, warmup=1)
    assert res[0].error == "" and len(res[0].times_ms) == 3 and res[2].error == "" and len(res[2].times_ms) == 3
    assert "no-such-tangents" in res[1].error and res[1].times_ms == []
    with pytest.raises(ValueError, match="one model"):
        measure_round_robin([good, Config("tiny-cnn", "bp")], steps=1, warmup=0)


def test_a_failing_worker_is_reported_not_raised(tmp_path) -> None:
    results = run_benchmark([Config("tiny-mlp", "fg-w", "no-such-tangents")], tmp_path, steps=1, warmup=0, log=None)
    assert "no-such-tangents" in results[0].error
    assert "no-such-tangents" in (tmp_path / "speed_memory.md").read_text()
    (fresh,) = run_benchmark([Config("tiny-mlp", "fg-w", "no-such-tangents")], tmp_path, steps=1, warmup=0, log=None,
                             fresh=True)
    assert "worker failed" in fresh.error


def test_table_ratios_and_k_scaling_from_given_numbers() -> None:
    results = [
        Result(Config("mlp8", "bp"), median_ms=200.0, cpu_ms=300.0, extra_mb=100.0, extra_default_mb=120.0),
        Result(Config("mlp8", "fg-w", "rank1", 1), median_ms=150.0, cpu_ms=150.0, extra_mb=40.0,
               extra_default_mb=60.0),
        Result(Config("mlp8", "fg-w", "rank1", 16), median_ms=1200.0, cpu_ms=1440.0, extra_mb=50.0,
               extra_default_mb=60.0),
    ]
    table = markdown_table(results)
    assert "| fg-w rank1 K=1 | 150.0 | 0.75 | 150.0 | 0.50 | 40 | 0.40 | 60 | 0.50 |" in table
    assert k_scaling_lines(results) == ["| mlp8 | rank1 | 16 | 0.50 | 0.60 |"]


def test_configuration_lists() -> None:
    full = full_configs()
    assert len(full) == 3 * (3 + 3 * 3 * 2)
    assert {c.model for c in full} == {"mlp8", "mlp32", "cnn"}
    assert all(c.model.startswith("tiny") for c in quick_configs())
    some = full_configs(["mlp4x128"], [1, 16], ["gaussian"], [False], chunk_size=1, baselines=["bp"])
    assert [(c.method, c.k, c.chunk_size) for c in some] == [("bp", 1, None), ("fg-w", 1, None), ("fg-w", 16, 1)]


def test_cli_rejects_an_unknown_model(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "--models", "resnet", "--out", "unused"]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--tangents", "nosuch"], "unknown tangents 'nosuch'"),
    (["--baselines", "fg-w"], "unknown baseline 'fg-w'"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
])
def test_cli_rejects_bad_bench_options(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "--models", "tiny-mlp", *args, "--out", "unused"]) == 2
    assert message in capsys.readouterr().err
