r"""Seeds that every rank can compute, and the directions of several ranks seen as one source.

A step's directions are a function of three integers: the run's base seed, the step number and a *stream*
(``0`` for every rank in data parallelism; the rank in tangent parallelism)::

    seed(base, step, stream) = int(blake2b(base ‖ step ‖ stream)[:8]) mod 2^63

The estimator's generator is re-seeded with it at the start of every step, so a rank needs no generator
state from the past: resuming at step ``t`` needs only ``t``, and the replay of a log needs only the base
seed. :class:`ConcatSource` joins the sources of all ranks, direction ``j = r·K + k`` being rank ``r``'s
direction ``k`` (rank-major): that order defines "one process with K·world directions".

Example:
    >>> from fwdgrad.distributed.seeds import step_seed
    >>> step_seed(0, 0, 0) == step_seed(0, 0, 0), step_seed(0, 0, 0) != step_seed(0, 0, 1)
    (True, True)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

from fwdgrad.directions import TangentSource
from fwdgrad.estimators.gradient import Gradient

Tensor = torch.Tensor


def step_seed(base: int, step: int, stream: int) -> int:
    """The seed of ``(base, step, stream)`` in ``[0, 2^63)`` (see the module docstring)."""
    raw = hashlib.blake2b(struct.pack("<QQQ", base % 2**64, step, stream), digest_size=8).digest()
    return int.from_bytes(raw, "little") % 2**63


def step_source(
    tangents: str, primals: Sequence[Tensor], num_directions: int, base: int, step: int, stream: int
) -> TangentSource:
    """The source a seed-sharing estimator draws at ``step`` on ``stream``: ``TangentSource(tangents, primals,
    K, Generator().manual_seed(step_seed(base, step, stream)), lean=<when possible>)``."""
    gen = torch.Generator().manual_seed(step_seed(base, step, stream))
    return TangentSource(tangents, primals, num_directions, gen, lean=TangentSource.lean_possible(tangents))


def shared_source(
    estimator: object, tangents: str, primals: Sequence[Tensor], num_directions: int, base: int, step: int,
    stream: int,
) -> object:
    """The directions of ``(base, step, stream)`` as ``estimator`` draws them: its ``shared_source(primals,
    generator)`` when it has one (the zeroth-order estimators: their perturbation's directions), else
    :func:`step_source` (a :class:`~fwdgrad.directions.TangentSource`, ``fg-w``)."""
    make = getattr(estimator, "shared_source", None)
    if make is None:
        return step_source(tangents, primals, num_directions, base, step, stream)
    return make(list(primals), torch.Generator().manual_seed(step_seed(base, step, stream)))


def after_exchange(estimator: object, grad: Gradient) -> Gradient:
    """The update every rank applies from the exchanged estimate ``grad``: the estimator's
    ``post_exchange(grad)`` when it has one (``zo-sign``: the sign, taken after the exchange), else ``grad``."""
    post = getattr(estimator, "post_exchange", None)
    return grad if post is None else post(grad)


class ConcatSource:
    r"""Several sources over the same parameters as one: direction ``j = r·K + k`` is ``parts[r]``'s
    direction ``k``. It offers what :class:`~fwdgrad.estimators.gradient.ImplicitGradient` needs of a source,
    so ``ImplicitGradient(loss, d [W·K], ConcatSource(parts))`` is the mean over all ``W·K`` directions:

    .. math:: \hat g_i = \frac{1}{WK} \sum_{r<W} \sum_{k<K} d_{rK+k}\, v^{(r)}_{ik}.
    """

    def __init__(self, parts: Sequence[TangentSource]) -> None:
        if not parts:
            raise ValueError("fwdgrad.distributed.ConcatSource: needs at least one source")
        self.parts = list(parts)
        first = self.parts[0]
        self.name, self.primals, self.per_part = first.name, first.primals, first.num_directions
        self.num_directions = self.per_part * len(self.parts)

    @property
    def regenerable(self) -> bool:
        return all(p.regenerable for p in self.parts)

    @property
    def stored(self) -> bool:
        return any(p.stored for p in self.parts)

    @property
    def factored(self) -> bool:
        return any(p.factored for p in self.parts)

    def direction(self, index: int, k: int) -> object:
        return self.parts[k // self.per_part].direction(index, k % self.per_part)

    def dense(self, index: int, k: int) -> Tensor:
        return self.parts[k // self.per_part].dense(index, k % self.per_part)

    def materialise(self) -> list[Tensor]:
        blocks = [p.materialise() for p in self.parts]
        return [torch.cat([b[i] for b in blocks]) for i in range(len(self.primals))]

    def weighted_sum(self, index: int, weights: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        """``out + alpha · Σ_j weights[j] · v_{index,j}``, part by part (rank-major order)."""
        k = self.per_part
        for r, part in enumerate(self.parts):
            out = part.weighted_sum(index, weights[r * k:(r + 1) * k], out=out, alpha=alpha)
        assert out is not None
        return out

    def mean(self, index: int, dirs: Tensor) -> Tensor:
        return self.weighted_sum(index, dirs, alpha=1.0 / self.num_directions)


def digest(named: Sequence[tuple[str, Tensor]]) -> int:
    """A 63-bit digest of names, shapes, dtypes and bytes of tensors (blake2b; reads every byte once)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return int.from_bytes(h.digest(), "little") % 2**63
