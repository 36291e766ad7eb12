"""Training: the loop behind ``fwdgrad train`` and ``fwdgrad compare``, split by concern.

- :mod:`~fwdgrad.training.config`: :class:`RunConfig` and the method-spec syntax;
- :mod:`~fwdgrad.training.fairness`: derived seeds, the train/validation split, the batch order of every
  epoch, initial weights and their digests (the same for every method of a seed);
- :mod:`~fwdgrad.training.loop`: one run (:func:`train_run`), its optimizer and evaluation;
- :mod:`~fwdgrad.training.lr`: default learning rates and schedules;
- :mod:`~fwdgrad.training.experiment`: methods, learning-rate choice and sweeps, :func:`run_experiment`;
- :mod:`~fwdgrad.training.memory`: the peak memory of one step;
- :mod:`~fwdgrad.training.checkpoint`: checkpoints (resume bit for bit) and saved models;
- :mod:`~fwdgrad.training.rundir`: run folders that never mix two runs' files;
- :mod:`~fwdgrad.training.factories`: models and datasets from the user's ``module:function``;
- :mod:`~fwdgrad.training.report`: ``results.json``, ``results.md``, CSV logs and plots.

Imports run bottom-up in that order (config → fairness → checkpoint/lr/memory → loop → experiment →
report), never back.
"""

from fwdgrad.training.config import MethodSpec, RunConfig, load_config, parse_method, parse_method_list
from fwdgrad.training.experiment import Experiment, choose_lr, resolve_methods, run_experiment
from fwdgrad.training.fairness import Splits, derived_seed, epoch_order, initial_model, split_dataset, weights_digest
from fwdgrad.training.loop import RunResult, evaluate, make_estimator, train_run
from fwdgrad.training.lr import default_lr, make_scheduler

__all__ = [
    "Experiment", "MethodSpec", "RunConfig", "RunResult", "Splits", "choose_lr", "default_lr", "derived_seed",
    "epoch_order", "evaluate", "initial_model", "load_config", "make_estimator", "make_scheduler",
    "parse_method", "parse_method_list", "resolve_methods", "run_experiment", "split_dataset", "train_run",
    "weights_digest",
]
