"""Kept import path: the training loop moved to the package :mod:`fwdgrad.training`, split by concern
(``fairness``, ``loop``, ``lr``, ``experiment``, ``memory``, ...); the names below are re-exported."""

from fwdgrad.training.experiment import (  # noqa: F401
    Experiment,
    check_method_suits,
    check_methods,
    choose_lr,
    load_data,
    resolve_methods,
    run_experiment,
    sweep_lr,
)
from fwdgrad.training.fairness import (  # noqa: F401
    DatasetLike,
    Splits,
    derived_seed,
    epoch_order,
    initial_model,
    split_dataset,
    weights_digest,
)
from fwdgrad.training.loop import RunResult, evaluate, make_estimator, make_optimizer, train_run  # noqa: F401
from fwdgrad.training.lr import default_lr  # noqa: F401
from fwdgrad.training.memory import peak_memory_probe  # noqa: F401
