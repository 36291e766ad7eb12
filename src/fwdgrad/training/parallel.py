r"""Seed-sharing parallelism in the training loop (``fwdgrad train --nproc N`` / ``--parallel data|tangent``).

With ``config.parallel`` set, :func:`fwdgrad.training.loop.train_run` replaces the method's estimator by a
:class:`fwdgrad.distributed.SeedSharingSGD` over the world's ``comm`` (a
:class:`~fwdgrad.distributed.comm.LocalComm` in a single process): every step is
``shared.accumulate(loss_fn)`` followed by the optimizer's step, exactly as with the estimator; in ``data``
mode ``loss_fn`` sees this rank's shard of the batch. The directions of step
``t`` are drawn from ``step_seed(derived_seed(seed, "estimator"), t, stream)``, the same on every rank and
in a single process. A plain run (no ``--parallel``) of a method that can be shared by seed takes the same
seed-shared steps in a world of one (:func:`seed_shared_mode`), so a data-parallel run over ``W`` processes
equals the plain single-process run of the same command on the whole batch up to rounding. The last batch of
an epoch, smaller than the others, is split into shards that differ by at most one example, each rank's
values weighted by its share (:func:`~fwdgrad.distributed.shard_bounds`): both runs see the same examples.

Example:
    >>> from fwdgrad.training.config import MethodSpec
    >>> check_shareable(MethodSpec("fg-w"), "data")
    >>> check_shareable(MethodSpec("bp"), "data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fwdgrad: method 'bp' cannot train with --parallel/--nproc/--replay-log (seed sharing): ...
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fwdgrad.training.config import MethodSpec
from fwdgrad.training.fairness import derived_seed


def shared_seed(seed: int) -> int:
    """The base seed of the shared directions of the run with seed ``seed`` (the same on every rank)."""
    return derived_seed(seed, "estimator")


def make_shared(spec: MethodSpec, seed: int, model: nn.Module, mode: str, comm: Any) -> Any:
    """A :class:`~fwdgrad.distributed.SeedSharingSGD` for ``spec`` on ``model`` (collective: every rank of
    ``comm`` must call it; it compares the configuration and initial weights of all ranks)."""
    from fwdgrad.distributed import SeedSharingSGD

    try:
        return SeedSharingSGD(model, spec.name, seed=shared_seed(seed), mode=mode, comm=comm, **spec.options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fwdgrad: method {spec.display!r} cannot train with --parallel/--nproc/--replay-log "
                         "(seed sharing): "
                         f"{str(exc).splitlines()[0]}") from None


def seed_shared_mode(config: Any, spec: MethodSpec) -> str | None:
    """How :func:`~fwdgrad.training.loop.train_run` takes the steps of ``spec``: ``config.parallel`` when set;
    else ``"data"`` (in a world of one) for every method that seed sharing can carry, so that its directions
    are the seed-shared ones and ``--nproc N`` changes nothing but rounding; else ``None`` (the estimator's
    own generator, for methods that ``--nproc`` refuses anyway)."""
    if config.parallel is not None:
        return str(config.parallel)
    try:
        check_shareable(spec, "data")
    except ValueError:
        return None
    return "data"


def check_shareable(spec: MethodSpec, mode: str) -> None:
    """Raise ``ValueError`` naming the method when ``spec`` cannot be shared by seed in ``mode``: builds it
    in a world of one on a tiny linear model and takes one step (the constructor's check, and the first
    step's check that the directions can be regenerated). Nothing is exchanged."""
    from fwdgrad.distributed import LocalComm
    from fwdgrad.estimators import recipe

    needs = getattr(recipe(spec.name), "needs", None)
    if needs is not None:  # local losses, sequence models: their steps are not one global loss's scalars
        raise ValueError(f"fwdgrad: method {spec.display!r} cannot train with --parallel/--nproc/--replay-log "
                         "(seed sharing): it "
                         f"needs a {needs} model; seed sharing covers estimators of one global loss whose "
                         "directions can be regenerated from a seed (fg-w, zo, zo-sign)")
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 0, 1])
    shared = make_shared(spec, 0, model, mode, LocalComm())
    try:
        shared.accumulate(lambda m: nn.functional.cross_entropy(m(x), y))
    except Exception as exc:  # whatever stops the step stops the run: say so now, with the method's name
        raise ValueError(f"fwdgrad: method {spec.display!r} cannot train with --parallel/--nproc/--replay-log "
                         "(seed sharing): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


__all__ = ["check_shareable", "make_shared", "seed_shared_mode", "shared_seed"]
