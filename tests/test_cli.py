"""The ``fwdgrad`` command line end to end on a tiny generated dataset: train and compare write reports
that parse (JSON, markdown, CSV, PNG), the same seed gives the same figures, and usage errors are clear."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwdgrad import cli
from fwdgrad.data import Dataset
from fwdgrad.training import experiment
from fwdgrad.training.config import load_config, parse_method, parse_method_list, parse_value

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    means = 3.0 * torch.randn(3, 5, generator=g)
    y_train, y_test = torch.randint(0, 3, (64,), generator=g), torch.randint(0, 3, (30,), generator=g)
    return Dataset("tiny", means[y_train] + torch.randn(64, 5, generator=g), y_train,
                   means[y_test] + torch.randn(30, 5, generator=g), y_test, 3, "generated in test_cli")


@pytest.fixture(autouse=True)
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CLI run in this file reads the tiny dataset instead of fwdgrad.data."""
    monkeypatch.setattr(experiment, "load_data", lambda config: tiny_dataset())


def run_cli(tmp_path: Path, *args: str) -> int:
    """Run the CLI with small defaults placed before ``args``, so that ``args`` win."""
    return cli.main([args[0], "--out-dir", str(tmp_path), "--model", "mlp:width=8,depth=1", "--batch-size", "16",
                     "--quiet", *args[1:]])


def test_train_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, "train", "--method", "fg-w:num_directions=2", "--epochs", "2", "--name", "t",
                   "--no-plots") == 0
    out = tmp_path / "t"
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "fwdgrad-results/1" and results["command"] == "train"
    assert results["config"]["methods"] == ["fg-w:num_directions=2"]
    assert results["config"]["model_options"] == {"width": 8, "depth": 1}
    assert set(results["versions"]) >= {"python", "torch", "fwdgrad"}
    (run,) = results["runs"]
    assert run["method"] == "fg-w:num_directions=2" and len(run["history"]) == 2
    assert 0 <= run["figures"]["test_acc"] <= 1
    assert "| fg-w:num_directions=2 |" in capsys.readouterr().out


def test_compare_writes_every_report_file(tmp_path: Path) -> None:
    code = run_cli(tmp_path, "compare", "--methods", "bp;fg-w:num_directions=2,label=fgw2", "--epochs", "2",
                   "--seeds", "2", "--name", "c")
    assert code == 0
    out = tmp_path / "c"
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == ["bp", "fgw2"]
    assert all(row["seeds"] == 2 for row in results["summary"])
    assert results["fairness"] == {"same_initial_weights_per_seed": True, "same_batch_order_per_seed": True}
    assert len(results["runs"]) == 4
    md = (out / "results.md").read_text()
    assert "| method | lr | test acc (mean ± std) |" in md and "| fgw2 |" in md and "| bp |" in md
    for method in ("bp", "fgw2"):
        for seed in (0, 1):
            with open(out / "logs" / f"{method}_seed{seed}.csv") as fh:
                rows = list(csv.DictReader(fh))
            assert [int(r["epoch"]) for r in rows] == [1, 2]
            assert all(0 <= float(r["test_acc"]) <= 1 for r in rows)
    import matplotlib.image

    for name in ("curves_epoch.png", "curves_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 200 and image.shape[1] >= 400
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary file behind


def test_same_seed_same_results(tmp_path: Path) -> None:
    def figures(name: str) -> list:
        assert run_cli(tmp_path, "compare", "--methods", "bp,fg-w", "--epochs", "2", "--name", name, "--no-plots") == 0
        results = json.loads((tmp_path / name / "results.json").read_text())
        keys = ("test_acc", "test_loss", "train_loss", "val_acc")
        return [[run["figures"][k] for k in keys] + [run["init_digest"], run["order_digest"]]
                for run in results["runs"]]

    assert figures("a") == figures("b")


def test_config_file_and_command_line_precedence(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\nseeds = 2\nmethods = ["bp", "fg-w:num_directions=2"]\nlr = 0.01\n')
    assert run_cli(tmp_path, "compare", "--config", str(config), "--seeds", "1", "--name", "f", "--no-plots") == 0
    results = json.loads((tmp_path / "f" / "results.json").read_text())
    assert results["config"]["epochs"] == 1 and results["config"]["seeds"] == 1  # command line wins
    assert [m["lr"] for m in results["methods"]] == [0.01, 0.01]
    assert [m["method"] for m in results["methods"]] == ["bp", "fg-w:num_directions=2"]


def test_config_file_unknown_key_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochs = 1\nepoch = 3\n")
    assert run_cli(tmp_path, "train", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'epoch'" in err and "bad.toml" in err
    assert not list(tmp_path.glob("train-*"))  # nothing ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "fg-w:num_directions"], "expected key=value, got 'num_directions'"),
        (["train", "--method", "fg-w:"], "nothing after ':'"),
        (["train", "--method", "fg-w:num_directions=2,num_directions=3"], "option 'num_directions' given twice"),
        (["train", "--method", "fg-w:bogus=1"], "estimator 'fg-w' has no option 'bogus'"),
        (["train", "--method", "nope"], "unknown method 'nope'"),
        (["train", "--method", "fg-w:lr=-1"], "lr must be a positive number"),
        (["train", "--method", "bp", "--method", "fg-w"], "train runs one method"),
        (["compare", "--methods", "num_directions=2,bp"], "comes before any method"),
        (["compare", "--methods", "bp,bp"], "method 'bp' is listed twice"),
        (["compare", "--methods", "bp,,fg-w"], "empty item"),
        (["train", "--model", "mlp:wdth=3"], "has no option 'wdth'"),
        (["train", "--epochs", "0"], "epochs must be an int >= 1, got 0"),
        (["train", "--val-fraction", "0", "--lr-sweep", "0.1,0.2"], "lr_sweep needs a validation split"),
    ],
)
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert run_cli(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fwdgrad {args[0]}: error:") and message in err


def test_method_list_syntax() -> None:
    methods = parse_method_list("bp,fg-w:num_directions=8,tangents=rademacher,fg-w;fg-w:num_directions=2,lr=1e-3")
    assert [(m.name, m.options, m.lr) for m in methods] == [
        ("bp", {}, None),
        ("fg-w", {"num_directions": 8, "tangents": "rademacher"}, None),
        ("fg-w", {}, None),
        ("fg-w", {"num_directions": 2}, 1e-3),
    ]
    spec = parse_method("fg-w:num_directions=4,chunk_size=none,label=fgw4")
    assert spec.options == {"num_directions": 4, "chunk_size": None} and spec.display == "fgw4"
    assert parse_method(spec.to_text()) == spec
    assert [parse_value(v) for v in ("3", "3.5", "false", "x1")] == [3, 3.5, False, "x1"]


def test_nonfinite_train_exits_1_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_dataset()
    x = data.x_train.clone()
    x[:] = float("nan")
    monkeypatch.setattr(experiment, "load_data", lambda config: Dataset("nan", x, data.y_train, data.x_test,
                                                                   data.y_test, 3, "all NaN"))
    assert run_cli(tmp_path, "train", "--method", "bp", "--epochs", "1", "--name", "n", "--no-plots") == 1
    assert "stopped: non-finite loss at epoch 1, step 1" in capsys.readouterr().err
    results = json.loads((tmp_path / "n" / "results.json").read_text())
    assert results["runs"][0]["status"] == "stopped (non-finite)"


def test_help_documents_every_option_with_its_default() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "compare"):
        for action in sub.choices[name]._actions:
            if action.dest in ("help", "config"):
                continue
            assert action.help and "default" in action.help, f"{name} {action.option_strings}: {action.help}"


def test_python_dash_m_and_datasets_listing() -> None:
    done = subprocess.run([sys.executable, "-m", "fwdgrad", "datasets"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mnist1d" in done.stdout and "generated offline" in done.stdout


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_missing_data_exits_1_with_the_loaders_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def missing(config: object) -> Dataset:
        raise FileNotFoundError("load_dataset: the mnist files were not found in /nowhere")

    monkeypatch.setattr(experiment, "load_data", missing)
    assert run_cli(tmp_path, "train", "--dataset", "mnist") == 1
    assert "fwdgrad train: error: load_dataset: the mnist files were not found" in capsys.readouterr().err


def test_documented_config_files_parse(tmp_path: Path) -> None:
    """The TOML in docs/cli.md and examples/ stays valid: every key known, every method spec parses."""
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "examples" / "mnist1d_compare.toml")
    assert config.epochs == 50 and config.methods[0].name == "all" and config.model_options["width"] == 256
    blocks = re.findall(r"```toml\n(.*?)```", (root / "docs" / "cli.md").read_text(), flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(block)
        load_config(path).validate()
