"""Input that is checked, not trusted (issue 15, section 3): TOML values against RunConfig's field types,
non-finite numbers and unusable devices on the command line, list-valued method options, a closed stdout,
report file modes and number formats."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwdgrad import cli
from fwdgrad.data import Dataset
from fwdgrad.training import experiment, loop, report
from fwdgrad.training.config import (
    RunConfig,
    check_fields,
    load_config,
    parse_method,
    parse_method_list,
    resolve_device,
)


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    means = 3.0 * torch.randn(3, 5, generator=g)
    y_train, y_test = torch.randint(0, 3, (64,), generator=g), torch.randint(0, 3, (30,), generator=g)
    return Dataset("tiny", means[y_train] + torch.randn(64, 5, generator=g), y_train,
                   means[y_test] + torch.randn(30, 5, generator=g), y_test, 3, "generated in test_inputs")


@pytest.fixture(autouse=True)
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment, "load_data", lambda config: tiny_dataset())


def run_cli(tmp_path: Path, *args: str) -> int:
    """The CLI with small defaults before ``args``; an argparse error (SystemExit) becomes its status."""
    try:
        return cli.main([args[0], "--out-dir", str(tmp_path), "--model", "mlp:width=8,depth=1", "--batch-size",
                         "16", "--quiet", "--no-plots", *args[1:]])
    except SystemExit as exc:
        return int(exc.code)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --- TOML values are type-checked ------------------------------------------------------------------------
BAD_TOML = [
    ('download = "false"', "download"),
    ('plots = "no"', "plots"),
    ("lr = true", "lr"),
    ("quiet = 5", "quiet"),
    ("weight_decay = true", "weight_decay"),
    ("name = 5", "name"),
    ("device = 5", "device"),
    ("epochs = 2.5", "epochs"),
    ('seed = "1"', "seed"),
    ("data_dir = 7", "data_dir"),
    ('time_budget = "10"', "time_budget"),
    ("lr_sweep = [true, 0.1]", "lr_sweep"),
    ('lr_sweep = ["0.1"]', "lr_sweep"),
    ("model_options = 3", "model_options"),
    ('model = 5', "model"),
    ('optimizer = 1', "optimizer"),
    ("threads = false", "threads"),
    ("lr = inf", "lr"),
    ("weight_decay = nan", "weight_decay"),
    ("time_budget = nan", "time_budget"),
    ("clip_grad_norm = inf", "clip_grad_norm"),
    ("lr_sweep = [0.1, inf]", "lr_sweep"),
]


@pytest.mark.parametrize(("line", "key"), BAD_TOML, ids=[line for line, _ in BAD_TOML])
def test_toml_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, line, key) -> None:
    path = tmp_path / "run.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=rf"run\.toml.*: {key} must be "):
        load_config(path)
    assert run_cli(tmp_path, "train", "--config", str(path), "--epochs", "1") == 2
    err = one_error_line(capsys)
    assert err.startswith("fwdgrad train: error:") and f"{key} must be" in err
    assert not any(p.is_dir() and p.name.startswith("train-") for p in tmp_path.iterdir())  # nothing ran


def test_toml_ints_for_float_fields_become_floats(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("lr = 1\ntime_budget = 10\nlr_sweep = [1, 0.5]\nweight_decay = 0\n")
    config = load_config(path)
    assert (config.lr, config.time_budget, config.lr_sweep, config.weight_decay) == (1.0, 10.0, [1.0, 0.5], 0.0)
    assert all(type(v) is float for v in (config.lr, config.time_budget, *config.lr_sweep, config.weight_decay))


def test_validate_checks_types_of_a_config_built_in_python() -> None:
    with pytest.raises(ValueError, match=r"^fwdgrad.RunConfig: download must be true or false, got 'false'"):
        RunConfig(download="false").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be finite"):
        RunConfig(lr=math.inf).validate()
    check_fields("x", {"lr": None, "lr_sweep": None, "model_options": {"width": 4}})  # the defaults' kinds pass


# --- non-finite numbers and devices on the command line ---------------------------------------------------
@pytest.mark.parametrize("args", [
    ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--weight-decay", "inf"),
    ("--time-budget", "nan"), ("--time-budget", "inf"), ("--lr-sweep", "inf"), ("--lr-sweep", "1e-3,nan"),
    ("--clip-grad-norm", "inf"),
], ids=lambda a: " ".join(a))
def test_non_finite_numbers_are_rejected(tmp_path, capsys, args) -> None:
    assert run_cli(tmp_path, "train", "--epochs", "1", *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("finite" in err or "invalid" in err), err


def test_unknown_device_is_a_one_line_error(tmp_path, capsys) -> None:
    assert run_cli(tmp_path, "train", "--epochs", "1", "--device", "nosuch") == 2
    err = one_error_line(capsys)
    assert "device" in err and "'nosuch'" in err


def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli(tmp_path, "train", "--epochs", "1", "--device", "cuda") == 2
    err = one_error_line(capsys)
    assert "'cuda' is not available" in err and "--device cpu or auto" in err


def test_device_auto_picks_cuda_when_present(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("t", "auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("t", "auto") == "cpu"


def test_device_auto_trains_and_records_the_device_used(tmp_path) -> None:
    assert run_cli(tmp_path, "train", "--epochs", "1", "--device", "auto", "--name", "a") == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"]["device"] == expected


# --- list-valued method options ---------------------------------------------------------------------------
def test_list_valued_options_parse() -> None:
    one = parse_method("fg-a:modules=layers.1")
    assert one.options == {"modules": ["layers.1"]}
    two = parse_method("fg-a:modules=layers.0|layers.2,num_directions=2")
    assert two.options == {"modules": ["layers.0", "layers.2"], "num_directions": 2}
    assert parse_method(two.to_text()) == two and parse_method(one.to_text()) == one
    specs = parse_method_list("bp,fg-a:modules=layers.0|layers.2,num_directions=2,fg-w")
    assert [s.name for s in specs] == ["bp", "fg-a", "fg-w"] and specs[1] == two
    assert parse_method("fg-w:tangents=rademacher").options == {"tangents": "rademacher"}  # str stays str
    with pytest.raises(ValueError, match="empty item"):
        parse_method("fg-a:modules=layers.0|")


def test_list_valued_option_reaches_the_estimator(tmp_path) -> None:
    est = loop.make_estimator(parse_method("fg-a:modules=layers.2"), seed=0)
    assert est.modules == ["layers.2"]
    assert run_cli(tmp_path, "train", "--epochs", "1", "--method", "fg-a:modules=layers.1|layers.3", "--name",
                   "m") == 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert results["config"]["methods"] == ["fg-a:modules=layers.1|layers.3"]


def test_toml_method_table_with_a_single_module(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[[methods]]\nname = "fg-a"\noptions = { modules = "layers.0" }\n')
    assert load_config(path).methods[0].options == {"modules": ["layers.0"]}


# --- output -----------------------------------------------------------------------------------------------
def test_closed_stdout_ends_without_a_traceback() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, like `| head` that has exited
    try:
        done = subprocess.run([sys.executable, "-m", "fwdgrad", "methods"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_report_files_are_world_readable_and_single_seed_shows_a_dash(tmp_path) -> None:
    old = os.umask(0o077)  # even under a strict umask the report is 0644, like bench's files
    try:
        assert run_cli(tmp_path, "train", "--epochs", "1", "--method", "bp", "--name", "r") == 0
    finally:
        os.umask(old)
    out = tmp_path / "r"
    for path in (out / "results.json", out / "results.md", out / "logs" / "bp_seed0.csv"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    md = (out / "results.md").read_text()
    assert "± — %" in md and "± 0.00" not in md
    assert json.loads((out / "results.json").read_text())["summary"][0]["test_acc_std"] is None


def test_huge_loss_prints_in_scientific_notation() -> None:
    row = {"method": "fg-w", "lr": 0.1, "test_acc_mean": 0.1, "test_acc_std": 0.02, "seeds": 2, "completed": 2,
           "train_loss_mean": 2e30, "time_per_epoch_s": 1.0, "examples_per_s": 100.0, "peak_step_memory_bytes": None}
    table = report.markdown_table([row])
    assert "| 2.000e+30 |" in table and "10.00 ± 2.00 %" in table
    assert "| 0.1235 |" in report.markdown_table([{**row, "train_loss_mean": 0.12345}])
