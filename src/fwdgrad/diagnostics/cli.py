"""``fwdgrad diagnose``: the arguments and the run (called from :mod:`fwdgrad.cli`)."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist1d", help="dataset of the batch (see `fwdgrad datasets`)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the dataset files")
    p.add_argument("--model", default="mlp", metavar="NAME[:KEY=VALUE,...]", help="model and options")
    p.add_argument("--methods", default="all", metavar="LIST",
                   help="methods separated by ';', each NAME[:KEY=VALUE,...]; 'all' = every registered estimator "
                        "plus fg-w under every tangent sampler")
    p.add_argument("--batch-size", type=int, default=32, help="examples in the batch")
    p.add_argument("--samples", type=int, default=200, help="estimates per method")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the batch and the estimators")
    p.add_argument("--float64", action="store_true", help="run the model in float64")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="runs", metavar="DIR", help="root folder of the reports")
    p.add_argument("--name", default=None, help="report folder name under --out (default: diagnose-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG")


def _model_spec(text: str) -> tuple[str, dict]:
    from fwdgrad.diagnostics.diagnose import parse_methods  # same KEY=VALUE reading

    name, _, rest = text.partition(":")
    opts = {}
    if rest:
        opts = parse_methods(f"bp:{rest}")[0][2]
    return name.strip(), opts


def run_from_args(args: argparse.Namespace) -> int:
    from fwdgrad.data import load_dataset
    from fwdgrad.diagnostics import diagnose, parse_methods, write_report
    from fwdgrad.diagnostics.output import new_run_dir
    from fwdgrad.models import build_model

    for key in ("batch_size", "samples", "threads"):
        v = getattr(args, key)
        if v < (2 if key == "samples" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be >= {2 if key == 'samples' else 1}, got {v}")
    parse_methods(args.methods)  # fail on a bad method before reading any data
    torch.set_num_threads(args.threads)
    name, opts = _model_spec(args.model)
    data = load_dataset(args.dataset, args.data_dir)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.y_train), generator=gen)[: args.batch_size]
    x, y = data.x_train[idx], data.y_train[idx]
    torch.manual_seed(args.seed)
    model = build_model(name, data.input_shape, data.num_classes, **opts)
    if args.float64:
        model, x = model.double(), x.double()
    rep = diagnose(model, x, y, args.methods, samples=args.samples, seed=args.seed,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    rep["command"] = "fwdgrad " + shlex.join(args.argv)
    rep["dataset"], rep["model"] = args.dataset, args.model
    out = new_run_dir(args.out, args.name, "diagnose")
    title = f"Estimator diagnostics: {args.model} on a {args.dataset} batch"
    paths = write_report(rep, out, title, plots=not args.no_plots)
    for p in paths:
        print(f"wrote {p}")
    return 0
