r"""Linear minimisation oracles (LMOs): ``s = argmin_{s ∈ C} ⟨g, s⟩`` for a convex set ``C``.

Frank-Wolfe never projects; it only needs, at each step, the point of the feasible set that minimises the
linear function ``s ↦ ⟨g, s⟩``. Each oracle is a small pure function ``(g, **set_parameters) -> s`` with ``s``
of ``g``'s shape, dtype and device:

================  ===================================  ==============================================
name              set ``C``                            minimiser
================  ===================================  ==============================================
``l1``            ``{s : ‖s‖₁ ≤ r}``                    ``−r·sign(g_i)·e_i``, ``i = argmax |g_i|``
``simplex``       ``{s : s ≥ 0, Σ s = r}``              ``r·e_i``, ``i = argmin g_i``
``box``           ``{s : lo ≤ s ≤ hi}`` (entry-wise)    ``lo`` where ``g > 0``, else ``hi``
``nuclear``       ``{S : ‖S‖_* ≤ r}`` (a matrix)        ``−r·u₁v₁ᵀ``, the top singular pair of ``g``
================  ===================================  ==============================================

Ties are broken by the first index (``argmax``/``argmin``) and, for ``box``, ``g = 0`` picks ``hi``; any
minimiser is valid for Frank-Wolfe. The nuclear-norm oracle treats a tensor of more than two dimensions as
the matrix ``[shape[0], prod(shape[1:])]``.

Example:
    >>> import torch
    >>> from fwdgrad.optim.lmo import lmo_l1, lmo_box
    >>> lmo_l1(torch.tensor([0.5, -2.0, 1.0]), radius=3.0)
    tensor([0., 3., 0.])
    >>> lmo_box(torch.tensor([1.0, -1.0]), lower=-0.5, upper=0.5)
    tensor([-0.5000,  0.5000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fwdgrad._validation import check_number

Tensor = torch.Tensor


def _check_radius(where: str, radius: Any) -> float:
    return check_number(where, "radius", radius, bound="> 0", say_finite=True)


def lmo_l1(g: Tensor, radius: float = 1.0) -> Tensor:
    """``argmin_{‖s‖₁ ≤ radius} ⟨g, s⟩``: a signed vertex of the ℓ1 ball, on the largest ``|g_i|``."""
    r = _check_radius("fwdgrad.optim.lmo_l1", radius)
    flat = g.reshape(-1)
    i = int(flat.abs().argmax())
    s = torch.zeros_like(flat)
    s[i] = -r * torch.sign(flat[i]) if flat[i] != 0 else r
    return s.view_as(g)


def lmo_simplex(g: Tensor, radius: float = 1.0) -> Tensor:
    """``argmin ⟨g, s⟩`` over the scaled simplex ``{s ≥ 0, Σ s = radius}``: a vertex at ``argmin g``."""
    r = _check_radius("fwdgrad.optim.lmo_simplex", radius)
    flat = g.reshape(-1)
    s = torch.zeros_like(flat)
    s[int(flat.argmin())] = r
    return s.view_as(g)


def lmo_box(g: Tensor, lower: float = -1.0, upper: float = 1.0) -> Tensor:
    """``argmin ⟨g, s⟩`` over the box ``lower ≤ s ≤ upper``, entry by entry."""
    where = "fwdgrad.optim.lmo_box"
    for name, v in (("lower", lower), ("upper", upper)):
        check_number(where, name, v)
    if not lower < upper:
        raise ValueError(f"{where}: lower must be < upper, got lower={lower!r}, upper={upper!r}")
    return torch.where(g > 0, torch.full_like(g, float(lower)), torch.full_like(g, float(upper)))


def lmo_nuclear(g: Tensor, radius: float = 1.0) -> Tensor:
    """``argmin_{‖S‖_* ≤ radius} ⟨G, S⟩ = −radius·u₁v₁ᵀ`` with ``(u₁, v₁)`` the top singular pair of ``G``.

    A tensor with fewer than two dimensions is rejected (use ``l1`` for vectors: for a diagonal matrix the
    nuclear norm is the ℓ1 norm of the diagonal)."""
    where = "fwdgrad.optim.lmo_nuclear"
    r = _check_radius(where, radius)
    if g.dim() < 2:
        raise ValueError(f"{where}: needs a tensor with at least 2 dimensions, got shape {tuple(g.shape)}")
    m = g.reshape(g.shape[0], -1)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return (-r * torch.outer(u[:, 0], vh[0])).reshape(g.shape)


#: Oracle by constraint name, as accepted by :class:`fwdgrad.optim.FrankWolfe`.
LMOS: dict[str, Callable[..., Tensor]] = {
    "l1": lmo_l1,
    "simplex": lmo_simplex,
    "box": lmo_box,
    "nuclear": lmo_nuclear,
}

#: The keyword parameters of each oracle (the set's size), with their defaults.
LMO_PARAMETERS: dict[str, dict[str, float]] = {
    "l1": {"radius": 1.0},
    "simplex": {"radius": 1.0},
    "box": {"lower": -1.0, "upper": 1.0},
    "nuclear": {"radius": 1.0},
}


def is_feasible(name: str, x: Tensor, tol: float = 1e-6, **params: float) -> bool:
    """Whether ``x`` lies in the set ``name`` with ``params`` (up to ``tol``)."""
    p = {**LMO_PARAMETERS[name], **params}
    if name == "l1":
        return float(x.abs().sum()) <= p["radius"] * (1 + tol) + tol
    if name == "simplex":
        return bool((x >= -tol).all()) and abs(float(x.sum()) - p["radius"]) <= tol * (1 + p["radius"])
    if name == "box":
        return bool((x >= p["lower"] - tol).all() and (x <= p["upper"] + tol).all())
    m = x.reshape(x.shape[0], -1)
    return float(torch.linalg.svdvals(m).sum()) <= p["radius"] * (1 + tol) + tol
