"""``fwdgrad study NAME``: the arguments and the run (called from :mod:`fwdgrad.cli`)."""

from __future__ import annotations

import argparse
import shlex
import time

import torch

STUDIES = ("linreg", "testfunctions", "frankwolfe")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=STUDIES, help="which study")
    p.add_argument("--quick", action="store_true", help="a small version that runs in well under a minute")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="runs", metavar="DIR", help="root folder of the reports")
    p.add_argument("--name", default=None, help="report folder under --out (default: <study>-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g = p.add_argument_group("linreg")
    g.add_argument("--dims", type=_int_list, default=None, metavar="D,D,...",
                   help="linreg: dimensions d (default 8,16,32,64; quick 4,8); testfunctions: dimensions of "
                        "the n-d functions (default 2,8,32)")
    g.add_argument("--steps-per-sample", type=_int_list, default=None, metavar="L,L,...",
                   help="ℓ forward-gradient steps per fresh sample (Dexheimer & Schmidt-Hieber 2024) (default 1,4)")
    g.add_argument("--repeats", type=int, default=None, help="independent runs averaged per d (default 40; quick 8)")
    g.add_argument("--schedule", default="paper", metavar="paper|unit",
                   help="forward gradient step size a/(k + a(d+2)^2): a = log d as in Bos & Schmidt-Hieber's "
                        "simulation (paper, default) or a = 1 (unit)")
    g = p.add_argument_group("testfunctions and frankwolfe")
    g.add_argument("--budget", type=int, default=None, help="step budget per run")
    g.add_argument("--functions", default=None, help="test functions, comma-separated (default: all)")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="frankwolfe: folder with MNIST")
    g.add_argument("--examples", type=int, default=None,
                   help="frankwolfe: training images in the full-batch objective (default 2000; quick 256)")
    g.add_argument("--methods", default=None, metavar="M,M,...",
                   help="frankwolfe: which of true, fg, fg-vr to run (default all); testfunctions ignores it")
    g.add_argument("--rho", type=float, default=None, metavar="C",
                   help="frankwolfe: averaging weight rho_k = C/(k+C) (C >= 1) instead of 4/(k+8)^(2/3)")
    g.add_argument("--directions", type=int, default=None,
                   help="frankwolfe: tangent directions K per forward-gradient step (default 8; quick 1)")
    g.add_argument("--problems", default=None, metavar="P,P,...",
                   help="frankwolfe: which of logreg-l1, mlp-box to run (default both)")
    g.add_argument("--device", default="cpu",
                   help="frankwolfe: torch device of the data, model and directions (cpu, cuda, cuda:N)")


def run_from_args(args: argparse.Namespace) -> int:
    from fwdgrad.diagnostics.output import new_run_dir

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for key in ("repeats", "budget", "examples", "directions"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    if args.study == "linreg":
        from fwdgrad.studies import linreg as mod
    elif args.study == "testfunctions":
        from fwdgrad.studies import testfunctions as mod
    else:
        from fwdgrad.studies import frankwolfe as mod
    t0 = time.perf_counter()
    result = mod.run_from_args(args)
    result["command"] = "fwdgrad " + shlex.join(getattr(args, "argv", []))
    result["wall_s"] = time.perf_counter() - t0
    out = new_run_dir(args.out, args.name, args.study + ("-quick" if args.quick else ""))
    for path in mod.write_report(result, out, plots=not args.no_plots):
        print(f"wrote {path}")
    for line in mod.summary_lines(result):
        print(line)
    print(f"wall time {result['wall_s']:.1f} s")
    return 0
