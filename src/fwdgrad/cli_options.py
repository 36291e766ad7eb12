"""The options of ``fwdgrad train`` and ``fwdgrad compare``: one argument per
:class:`~fwdgrad.training.config.RunConfig` field, in help groups (data and model, methods, budget,
optimisation, seeds and behaviour, parallelism, output), each built by a small function.

Every default is ``argparse.SUPPRESS``, so only the options actually given override the config file, and the
help text shows the real default.

Example:
    >>> import argparse
    >>> from fwdgrad.training.config import RunConfig
    >>> p = argparse.ArgumentParser()
    >>> add_run_options(p, RunConfig(), many_methods=False)
    >>> vars(p.parse_args(["--epochs", "3"]))
    {'epochs': 3}
"""

from __future__ import annotations

import argparse
import math

from fwdgrad.training.config import ON_NONFINITE, OPTIMIZERS, PARALLEL_MODES, SCHEDULES, RunConfig

__all__ = ["add_run_options"]

S = argparse.SUPPRESS  # no default in the namespace: an option not given leaves the config's value


def _positive_float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(not (0 < v < math.inf) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def _data_and_model_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: the dataset, its folder and prompt protocol, the model."""
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=S, help=f"dataset name, see `fwdgrad datasets`, or your own factory "
                                                 f"module.path:function, see docs/cli.md (default: {d.dataset})")
    g.add_argument("--data-dir", default=S, metavar="DIR",
                   help="folder with the dataset files (default: $FWDGRAD_DATA_DIR, else ./data)")
    g.add_argument("--prompt", default=S, metavar="PROTOCOL[,seed=N][,words=A|B]",
                   help="with --dataset sst2 and --model hf:DIR: prompts scored by the LM head at the label words "
                        "(MeZO's protocol: k16, k512, k=N per class, or opt = 1000/500/1000); see docs/integrations.md "
                        "(default: off, a classifier head)")
    g.add_argument("--download", action="store_true", default=S,
                   help="download missing dataset files into --data-dir, checksum-verified (default: off)")
    g.add_argument("--model", default=S, metavar="NAME[:KEY=VALUE,...]",
                   help=f"model and its options, e.g. mlp:width=512,depth=3 or mlp:widths=1024x1024 or "
                        f"cnn:channels=32; see `fwdgrad models`; or your own factory module.path:function"
                        f"[:KEY=VALUE,...], see docs/cli.md (default: {d.model})")


def _method_options(p: argparse.ArgumentParser, d: RunConfig, many_methods: bool) -> None:
    """Help group: the methods to train."""
    g = p.add_argument_group("methods")
    default_methods = ",".join(m.to_text() for m in d.methods)
    g.add_argument("--method", action="append", default=S, metavar="SPEC",
                   help="estimator name with options, NAME[:KEY=VALUE,...], e.g. fg-w:num_directions=8,"
                        "tangents=rademacher; reserved keys: lr (this method's learning rate) and label "
                        "(its name in reports); see `fwdgrad methods`"
                        + (" (repeatable; default: none, see --methods)" if many_methods
                           else f" (default: {default_methods})"))
    if many_methods:
        g.add_argument("--methods", action="append", default=S, metavar="LIST",
                       help="methods separated by ';' or ','; after a ',' a piece with '=' and no ':' is another "
                            "option of the method before it, e.g. \"bp,fg-w:num_directions=8,tangents=rademacher"
                            ",fg-w\" (three methods); 'all' = every registered estimator that can train the "
                            f"model; combines with --method (default: {default_methods})")


def _budget_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: epochs, time budget, batch size, training subset."""
    g = p.add_argument_group("budget")
    g.add_argument("--epochs", type=int, default=S, help=f"epochs per run, the same for every method "
                                                          f"(default: {d.epochs})")
    g.add_argument("--time-budget", type=float, default=S, metavar="SECONDS",
                   help="also stop each run after this many seconds of training, evaluation excluded "
                        "(default: no limit)")
    g.add_argument("--batch-size", type=int, default=S, help=f"training batch size (default: {d.batch_size})")
    g.add_argument("--train-subset", type=int, default=S, metavar="N",
                   help="train on N examples of the training split only (default: all)")


def _optimisation_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: optimizer, learning rate and its sweep and schedule, validation split."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S,
                   help=f"optimizer of every method: SGD with momentum, or Adam (default: {d.optimizer})")
    g.add_argument("--momentum", type=float, default=S, help=f"SGD momentum (default: {d.momentum:g})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"L2 weight decay of the optimizer "
                                                               f"(default: {d.weight_decay:g})")
    g.add_argument("--clip-grad-norm", type=float, default=S, metavar="MAX_NORM",
                   help="rescale each step's gradient or estimate to a 2-norm of at most MAX_NORM, for every "
                        "method (default: off)")
    g.add_argument("--lr", type=float, default=S,
                   help="learning rate for every method without its own lr= (default: per-method defaults "
                        "measured on the default task, see `fwdgrad methods`)")
    g.add_argument("--lr-sweep", type=_positive_float_list, default=S, metavar="LR,LR,...",
                   help="pick each method's lr among these by validation accuracy after --sweep-epochs "
                        "(first seed; the validation split comes from the training set) (default: off)")
    g.add_argument("--schedule", choices=SCHEDULES, default=S,
                   help=f"learning-rate schedule, per step: constant, cosine decay to 0, linear warm-up then cosine, "
                        f"or ×--step-gamma every --step-epochs (default: {d.schedule})")
    g.add_argument("--warmup-epochs", type=float, default=S, metavar="EPOCHS",
                   help="linear warm-up length in epochs, for any schedule (default: 1 for warmup-cosine, else 0)")
    g.add_argument("--step-epochs", type=int, default=S, metavar="EPOCHS",
                   help="step schedule: epochs between decays (default: a third of --epochs)")
    g.add_argument("--step-gamma", type=float, default=S,
                   help=f"step schedule: factor of each decay (default: {d.step_gamma:g})")
    g.add_argument("--sweep-epochs", type=int, default=S, help=f"epochs of each sweep trial "
                                                                f"(default: {d.sweep_epochs})")
    g.add_argument("--val-fraction", type=float, default=S,
                   help=f"share of the training set held out for validation (default: {d.val_fraction:g})")


def _behaviour_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: seeds, non-finite handling, evaluation batch, device, threads."""
    g = p.add_argument_group("seeds and behaviour")
    g.add_argument("--seed", type=int, default=S, help=f"first seed (default: {d.seed})")
    g.add_argument("--seeds", type=int, default=S, help=f"number of seeds: seed, seed+1, ... (default: {d.seeds})")
    g.add_argument("--on-nonfinite", choices=ON_NONFINITE, default=S,
                   help=f"on a NaN/Inf loss: stop the run, or skip that step (default: {d.on_nonfinite})")
    g.add_argument("--max-skip-fraction", type=float, default=S, metavar="SHARE",
                   help=f"with --on-nonfinite skip, a run that skips more than this share of its steps stops as "
                        f"failed (default: {d.max_skip_fraction:g})")
    g.add_argument("--eval-batch-size", type=int, default=S,
                   help=f"batch size of the evaluation passes (default: {d.eval_batch_size})")
    g.add_argument("--device", default=S,
                   help=f"torch device: cpu, cuda, cuda:N, ..., or auto (cuda when available, else cpu); "
                        f"checked before training starts (default: {d.device})")
    g.add_argument("--threads", type=int, default=S, help="torch.set_num_threads (default: torch's choice)")


def _parallel_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: seed-sharing parallelism."""
    g = p.add_argument_group("parallelism (seed sharing, see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=S, metavar="N",
                   help="run in N processes on this machine (gloo on 127.0.0.1) that exchange K scalars per step, "
                        "never a gradient; under torchrun (RANK set) the processes are torchrun's "
                        "(default: 1, one process)")
    g.add_argument("--parallel", choices=PARALLEL_MODES, default=S,
                   help="data: every process takes an equal shard of each batch along the same directions; "
                        "tangent: every process draws its own directions on the whole batch (default: data with "
                        "--nproc or torchrun, else off; a plain run of a method that --nproc accepts takes the "
                        "same seed-shared steps in one process, so --nproc N changes only the rounding)")


def _output_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Help group: the run folder and what is written into it."""
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=S, help=f"parent folder of run folders (default: {d.out_dir})")
    g.add_argument("--name", default=S,
                   help="run folder name (default: <command>-<dataset>-<model>-<UTC time>[-k], always a new "
                        "folder); a folder holding another run's files needs --overwrite or --resume")
    g.add_argument(
        "--overwrite", action="store_true", default=S,
        help="replace the files of an earlier run in the --name folder (default: refuse)")
    g.add_argument("--resume", default=S, metavar="RUN_DIR",
                   help="continue the killed or interrupted run in RUN_DIR from its last checkpoint (end of its "
                        "last complete epoch), with its own settings; the result equals an uninterrupted run "
                        "(default: a new run)")
    g.add_argument("--save-model", action="store_true", default=S,
                   help="write each run's trained weights to RUN_DIR/models/<method>_seed<k>.pt, for "
                        "`fwdgrad evaluate` (default: off)")
    g.add_argument("--replay-log", action="store_true", default=S,
                   help="write each run's replay log RUN_DIR/replay/<method>_seed<k>.log (per step: the step, the K "
                        "scalars, the loss and the lr used; 24 + 8·K bytes in data mode) and its initial weights "
                        "<method>_seed<k>.init.pt, from which `fwdgrad replay LOG --init INIT.pt --out MODEL.pt` "
                        "rebuilds the trained weights bit for bit; the steps are seed-shared, so this implies "
                        "--parallel data unless --parallel is given (default: off)")
    g.add_argument("--tensorboard", action="store_true", default=S,
                   help="also write TensorBoard scalars to RUN_DIR/tensorboard (needs: pip install "
                        "'fwdgrad[tensorboard]') (default: off)")
    g.add_argument("--no-plots", dest="plots", action="store_false", default=S,
                   help="skip the PNG plots (default: plots on)")
    g.add_argument("--quiet", "-q", action="store_true", default=S,
                   help="no progress bar and no per-run lines (default: progress bar on a terminal)")


def add_run_options(p: argparse.ArgumentParser, defaults: RunConfig, *, many_methods: bool) -> None:
    """Arguments for every RunConfig field; defaults are ``SUPPRESS`` so that only the options actually
    given override the config file, and the help text shows the real default. ``many_methods``: ``compare``'s
    ``--methods`` list beside the repeatable ``--method``."""
    d = defaults
    p.add_argument("--config", metavar="FILE.toml", default=S,
                   help="read options from a TOML file (keys: RunConfig field names; unknown keys are errors); "
                        "options given here win over the file")
    _data_and_model_options(p, d)
    _method_options(p, d, many_methods)
    _budget_options(p, d)
    _optimisation_options(p, d)
    _behaviour_options(p, d)
    _parallel_options(p, d)
    _output_options(p, d)
