"""Small things a user of the command line hits: ``fwdgrad bench --quick`` never writes over a committed
full-grid report, the list examples of docs/cli.md train the default mlp, every help line states its default
once, a skipped method is reported once under ``--quiet``, and ``--train-subset`` larger than the data is an
error."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fwdgrad import bench, cli
from fwdgrad.training import experiment
from fwdgrad.training.config import RunConfig, parse_method
from fwdgrad.training.fairness import split_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_under_runs_and_never_over_a_full_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    report = committed / "speed_memory.json"
    report.write_text((ROOT / "benchmarks" / "results" / "speed_memory.json").read_text())
    before = report.read_bytes()
    monkeypatch.chdir(tmp_path)
    outs: list[str] = []

    def fake_run(configs, out, **kwargs):  # the measurement itself is tests/test_bench.py's business
        outs.append(str(out))
        return []

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    assert cli.main(["bench", "--quick"]) == 0
    assert cli.main(["bench", "--models", "tiny-mlp", "--ks", "1"]) == 0
    assert outs == [str(Path("runs") / "bench-quick"), str(Path("runs") / "bench")]
    capsys.readouterr()
    assert cli.main(["bench", "--quick", "--out", str(committed)]) == 2
    err = capsys.readouterr().err
    assert "--quick would overwrite the report of a full run in" in err and len(err.splitlines()) == 1, err
    assert report.read_bytes() == before and len(outs) == 2
    # a quick report may be replaced by another quick run
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "speed_memory.json").write_text(json.dumps({"command": "fwdgrad bench --quick"}))
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "q")]) == 0


def test_the_list_examples_of_docs_cli_train_the_default_mlp() -> None:
    specs = sorted(set(re.findall(r"fg-a:modules=[\w.|]+", (ROOT / "docs" / "cli.md").read_text())))
    assert specs, "docs/cli.md shows a list option"
    config = RunConfig()  # model mlp, its default options

    class Data:
        name, source, num_classes, input_shape = "d", "test", 10, (40,)
        x_train, y_train = torch.randn(8, 40), torch.randint(0, 10, (8,))
        x_test, y_test = torch.randn(4, 40), torch.randint(0, 10, (4,))

    splits = split_dataset(Data(), 0.0, None, 0)
    for spec in specs:
        experiment.check_method_suits(config, parse_method(spec), splits)


def test_every_help_line_states_its_default_once() -> None:
    """`fwdgrad study --help` printed "(default: <study>-<time>) (default: None)": the automatic default after a
    help text that states its own."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                text = formatter._expand_help(action)
                assert not re.search(r"default.*\(default: [^()]*\)$", text), (name, action.option_strings, text)
                assert not text.endswith(("(default: None)", "(default: False)")), (name, action.option_strings)
    text = " ".join(sub.choices["study"].format_help().split())
    assert "report folder under --out (default: <study>-<time>) --no-plots" in text


def test_a_skipped_method_is_reported_once_under_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "qdata.py").write_text(textwrap.dedent('''
        import torch


        class D:
            name, source, num_classes = "d", "test", 3

            def __init__(self):
                g = torch.Generator().manual_seed(0)
                self.x_train, self.y_train = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
                self.x_test, self.y_test = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


        def make_data():
            return D()
    '''))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("qdata", None)
    monkeypatch.setattr(experiment, "available_estimators", lambda: ["bp", "l-bp"])  # l-bp needs local heads
    args = ["compare", "--dataset", "qdata:make_data", "--model", "mlp:width=8,depth=1", "--methods", "all",
            "--epochs", "1", "--val-fraction", "0", "--threads", "1", "--no-plots", "--out-dir", str(tmp_path)]
    assert cli.main([*args, "--quiet", "--name", "q"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "l-bp" in line]
    assert len(lines) == 1 and lines[0].startswith("skipped l-bp: "), lines


def test_a_train_subset_larger_than_the_data_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Data:
        name, source, num_classes, input_shape = "tiny", "test", 2, (3,)
        x_train, y_train = torch.randn(10, 3), torch.randint(0, 2, (10,))
        x_test, y_test = torch.randn(4, 3), torch.randint(0, 2, (4,))

    assert len(split_dataset(Data(), 0.2, 8, 0).y_train) == 8
    with pytest.raises(ValueError, match="--train-subset 9 exceeds the 8 training examples of tiny after the 2 held"):
        split_dataset(Data(), 0.2, 9, 0)
    assert cli.main(["train", "--dataset", "mnist1d", "--train-subset", "10000000", "--epochs", "1", "--quiet",
                     "--no-plots", "--out-dir", str(tmp_path), "--method", "bp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--train-subset 10000000 exceeds the" in err, err
    assert not list(tmp_path.iterdir())  # refused before any run folder was written
