"""``fwdgrad compare`` from Python: the same fair comparison as the CLI, with the results in hand.

Run: ``.venv/bin/python examples/compare.py`` (about 10 s on 2 CPU cores). The command-line equivalent is
``fwdgrad compare --model mlp:width=128 --methods "bp,fg-a,fg-w:num_directions=4" --epochs 5 --seeds 2
--threads 1 --name example``.
"""

from pathlib import Path

from fwdgrad.training import run_experiment
from fwdgrad.training.config import RunConfig, parse_method_list
from fwdgrad.training.report import markdown_table, summarize, write_report

config = RunConfig(
    dataset="mnist1d",  # generated offline, no download
    model="mlp",
    model_options={"width": 128, "depth": 2},
    methods=parse_method_list("bp,fg-a,fg-w:num_directions=4"),
    epochs=5,
    seeds=2,
    threads=1,  # a small model: one thread is fastest
    quiet=True,
)
experiment = run_experiment(config, "compare")
print(markdown_table(summarize(experiment)))
for run in experiment.runs:  # every run keeps its per-epoch history
    print(run.method, run.seed, [round(h["test_acc"], 3) for h in run.history])
files = write_report(experiment, Path("runs") / "example", "example", "examples/compare.py")
print("report:", files["md"])
