"""Optimizers that read ``.grad`` (so they work with every fwdgrad estimator) and update rules of the family.

- :class:`FrankWolfe`: Frank-Wolfe over an ℓ1 ball, a simplex, a box or a nuclear-norm ball, with the
  variance-reduced direction of Rostami & Kia (2024) for projected forward gradients;
- :mod:`fwdgrad.optim.lmo`: the linear minimisation oracles as small pure functions;
- :func:`orthogonal_gradient`: ODICE's orthogonal-gradient update (Mao et al. 2024), see ``docs/odice.md``.

This layer imports only torch and fwdgrad's core modules.
"""

from fwdgrad.optim.frank_wolfe import FrankWolfe, default_averaging, default_step_size
from fwdgrad.optim.lmo import LMOS, lmo_box, lmo_l1, lmo_nuclear, lmo_simplex
from fwdgrad.optim.orthogonal import orthogonal_gradient

__all__ = [
    "LMOS",
    "FrankWolfe",
    "default_averaging",
    "default_step_size",
    "lmo_box",
    "lmo_l1",
    "lmo_nuclear",
    "lmo_simplex",
    "orthogonal_gradient",
]
