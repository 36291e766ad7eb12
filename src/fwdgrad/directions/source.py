r"""Direction sources: where the tangents of one step come from, and how they are handed out.

A *source* hands out the tangents of one step, tensor by tensor and direction by direction.
:class:`TangentSource` draws them from a stateless sampler of :mod:`fwdgrad.directions.samplers`: for the
per-tensor samplers (``gaussian``, ``rademacher``, ``rank1``) each parameter's ``[K, *shape]`` block comes
from its own seed, so the source can keep the blocks (the ``.grad`` path), keep only the rank-1 factors
``u [K, out]``, ``v [K, in]``, or, in ``lean`` mode, keep only the per-tensor seeds and draw a tensor again
whenever a pass or the update needs it (the MeZO trick). Every path (reference, fast, fused) therefore sees
the same tangents for the same seed, and the fused update never holds more than one tensor's.

*Stateful* sources (:class:`DirectionState`) make directions depend on the past — momentum of past estimates,
guesses from local losses, feedback matrices — through the pair ``init(params) -> state`` and
``update(state, ...) -> state``, in the style of optax's transforms.

Example:
    >>> import torch
    >>> from fwdgrad.directions import TangentSource, SAMPLERS
    >>> w = torch.zeros(3, 2)
    >>> lean = TangentSource("gaussian", [w], 1, torch.Generator().manual_seed(0), lean=True)
    >>> ref = SAMPLERS["gaussian"]([w], 1, torch.Generator().manual_seed(0))
    >>> bool(torch.equal(lean.direction(0, 0), ref[0][0]))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from fwdgrad.directions.samplers import (
    SAMPLERS,
    draw_direction,
    draw_tensor,
    per_tensor_blocks,
    rank1_factors,
    tensor_seeds,
)

Tensor = torch.Tensor

#: Samplers that draw each tensor's tangent on its own (from a per-tensor seed; rank-1: small factors), so
#: that a tensor's tangent can be drawn again, alone, whenever it is needed.
PER_TENSOR_SAMPLERS = ("gaussian", "rademacher", "rank1")

Direction = Tensor | tuple[Tensor, Tensor]

#: Tangents of at most this many bytes (all tensors, all K directions) are kept for the ``.grad`` writer
#: rather than drawn again (:meth:`TangentSource.worth_keeping`).
KEEP_SMALL_BYTES = 1 << 23


@runtime_checkable
class DirectionSource(Protocol):
    """What a consumer of a step's directions (an implicit gradient, a fused update) needs: the K tangents
    of every tensor, handed out one tensor at a time. :class:`TangentSource` is one; a concatenation of
    several (seed-sharing across processes) is another."""

    primals: list[Tensor]
    num_directions: int

    @property
    def regenerable(self) -> bool: ...

    @property
    def stored(self) -> bool: ...

    @property
    def factored(self) -> bool: ...

    def dense(self, index: int, k: int) -> Tensor: ...

    def mean(self, index: int, dirs: Tensor) -> Tensor: ...

    def weighted_sum(self, index: int, weights: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor: ...



def add_weighted_directions(
    draw: Callable[[int], Tensor], weights: Tensor, num_directions: int, out: Tensor | None, alpha: float
) -> Tensor:
    """``out + alpha · Σ_k weights[k] · draw(k)`` over ``k < num_directions``, one direction at a time
    (``out`` updated in place with ``addcmul_``; ``None``: a new tensor from the first direction), so the only
    temporary is one direction. ``weights`` is a ``[K]`` tensor of the directions' dtype; no weight is read
    on the host.

    Example:
        >>> import torch
        >>> dirs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> add_weighted_directions(lambda k: dirs[k], torch.tensor([3.0, 1.0]), 2, None, 0.5)
        tensor([1.5000, 1.0000])
    """
    for k in range(num_directions):
        d = draw(k)
        if out is None:
            out = d * weights[k] if alpha == 1.0 else d * (weights[k] * alpha)
        else:
            out.addcmul_(d, weights[k], value=alpha)
    assert out is not None
    return out

class TangentSource:
    r"""The tangents of one step, exactly ``SAMPLERS[name](primals, K, generator)``, handed out tensor by
    tensor and direction by direction.

    Args:
        name: a sampler of :data:`fwdgrad.directions.SAMPLERS`. The joint samplers (``sphere``,
            ``orthogonal``) normalise across tensors, so their blocks are always kept.
        primals: the parameters (detached), in the estimator's order; index ``i`` is ``primals[i]``.
        num_directions: K.
        generator: the step's source of randomness (``None``: torch's global RNG); it is advanced exactly
            as ``SAMPLERS[name]`` advances it, whatever the mode.
        into: K = 1 kept (not ``lean``), ``gaussian``/``rademacher`` only: tensors (``None`` entries allowed) in
            whose storage tensor ``i``'s tangent is drawn, of ``primals[i]``'s shape, dtype and device, contiguous
            (a zero ``.grad`` lent by the ``.grad`` writer: the estimate ``d·v`` is then formed there in place,
            :meth:`add_scaled`, with no model-sized temporary and no second draw).
        lean: keep no tangent. Only the per-tensor seeds are drawn (:func:`fwdgrad.directions.tensor_seeds`,
            exactly what the sampler draws from the generator), and :meth:`direction` draws a tensor's
            block from its seed whenever it is needed: a tangent is a function of (generator state at the
            step, parameter index), never stored for the whole model. ``rank1`` keeps its factors
            (``K·(out + in)`` numbers per matrix), which are all it ever needs.

    Example:
        >>> import torch
        >>> from fwdgrad.directions import SAMPLERS, TangentSource
        >>> w = torch.zeros(3, 2)
        >>> lean = TangentSource("gaussian", [w], 1, torch.Generator().manual_seed(0), lean=True)
        >>> ref = SAMPLERS["gaussian"]([w], 1, torch.Generator().manual_seed(0))
        >>> bool(torch.equal(lean.direction(0, 0), ref[0][0]))
        True
    """

    _first: list[Tensor] | None = None  # K = 1 kept: the directions themselves (also for given())

    def __init__(
        self, name: str, primals: Sequence[Tensor], num_directions: int, generator: torch.Generator | None,
        *, lean: bool = False, into: Sequence[Tensor | None] | None = None,
    ) -> None:
        if lean and name not in PER_TENSOR_SAMPLERS:
            raise ValueError(
                f"fwdgrad.directions.TangentSource: tangents {name!r} are drawn jointly over all tensors and "
                f"cannot be drawn again one tensor at a time (lean=True); choose one of {PER_TENSOR_SAMPLERS}"
            )
        self.name, self.primals, self.num_directions = name, list(primals), num_directions
        self._blocks: list[Any] | None = None
        self._seeds: list[int] | None = None
        self._homes: list[Tensor | None] | None = None
        if name == "rank1":
            self._blocks = list(rank1_factors(self.primals, num_directions, generator))
        elif name in PER_TENSOR_SAMPLERS:
            # the seeds are all the generator gives; blocks drawn from them equal SAMPLERS[name]'s
            self._seeds = tensor_seeds(len(self.primals), generator)
            if not lean and num_directions == 1:  # the one direction itself: handing it out costs no select op
                if into is not None:
                    self._homes = list(into)
                self._first = per_tensor_blocks(name, self.primals, None, self._seeds, self._homes)
                self._blocks = [d.unsqueeze(0) for d in self._first]
            elif not lean:
                self._blocks = per_tensor_blocks(name, self.primals, num_directions, self._seeds)
        else:
            self._blocks = SAMPLERS[name](self.primals, num_directions, generator)

    @classmethod
    def given(cls, primals: Sequence[Tensor], blocks: Sequence[Tensor]) -> TangentSource:
        """A source handing out given tangents ``blocks`` (``[K, *p.shape]`` per tensor of ``primals``: a
        guess, a feedback signal): stored, not regenerable. Its name is ``"given"``."""
        self = cls.__new__(cls)
        self.name, self.num_directions = "given", blocks[0].shape[0]
        self.primals = list(primals)
        self._blocks, self._seeds = list(blocks), None
        return self

    def gram(self) -> Tensor:
        """``BᵀB``, ``[K, K]``: the inner products of the K directions over all tensors (float64)."""
        k = self.num_directions
        g = torch.zeros(k, k, dtype=torch.float64, device=self.primals[0].device)
        for i in range(len(self.primals)):
            block = self.materialise_one(i).reshape(k, -1).to(torch.float64)
            g += block @ block.T
        return g

    def inner(self, index: int, other: Tensor) -> Tensor:
        """``⟨v_{index,k}, other⟩`` for every direction k, ``[K]``."""
        block = self.materialise_one(index).reshape(self.num_directions, -1)
        return block @ other.reshape(-1).to(block.dtype)

    def materialise_one(self, index: int) -> Tensor:
        """Tensor ``index``'s tangents ``[K, *shape]`` (rank-1 factors multiplied out)."""
        block = self._block(index)
        if isinstance(block, tuple):
            u, v = block
            return (u.unsqueeze(2) * v.unsqueeze(1)).reshape(self.num_directions, *self.primals[index].shape)
        return block

    @staticmethod
    def worth_keeping(
        name: str, num_directions: int, primals: Sequence[Tensor], grads_unset: bool, chunk_size: int | None = None,
    ) -> bool:
        """Whether a ``.grad`` consumer should keep the step's tangents rather than draw them again.

        Kept, a tensor's tangents are drawn once and held to the end of the step; lean, they are drawn for
        the pass and again when added to ``.grad``, and the step holds one tensor's tangent (or one chunk's)
        at most, as the fused update does. Keeping is chosen only where it costs no memory: K > 1 directions
        in one chunk (the pass holds them all anyway), or one direction into a ``.grad`` that is ``None``
        (the spent tangent becomes ``.grad``), and for small models (at most :data:`KEEP_SMALL_BYTES` of
        tangents), where a second draw's kernel launches cost more than the memory is worth. With ``.grad``
        kept between steps the second draw is the
        price of bounded memory: on the CPU, torch's Gaussian generator takes about 4 ns of CPU time an
        entry, about a tenth of a backprop step on an MLP 8×1024 with batch 512 (Rademacher: eight signs
        per random byte)."""
        if name not in PER_TENSOR_SAMPLERS or name == "rank1":
            return True  # joint samplers cannot be drawn again; rank-1 keeps its small factors anyway
        if num_directions * sum(p.numel() * p.element_size() for p in primals) <= KEEP_SMALL_BYTES:
            return True  # a small model: the temporary is negligible, a second draw is not
        if num_directions > 1:
            return chunk_size is None or chunk_size >= num_directions
        return grads_unset

    def lent(self, index: int, t: Tensor | None) -> bool:
        """Whether ``t`` is the storage lent (``into``) to tensor ``index``'s tangent, the tangent still in it."""
        homes, first = self._homes, self._first
        return (homes is not None and t is not None and homes[index] is t and first is not None
                and first[index] is not None)

    @staticmethod
    def lean_possible(name: str) -> bool:
        """Whether sampler ``name`` can run ``lean`` (its tensors drawn again one at a time)."""
        return name in PER_TENSOR_SAMPLERS

    @property
    def regenerable(self) -> bool:
        """Whether each tensor's tangent can be drawn again alone (a per-tensor sampler)."""
        return self.name in PER_TENSOR_SAMPLERS

    @property
    def stored(self) -> bool:
        """Whether every tensor's block is held (not ``lean``)."""
        return self._blocks is not None

    @property
    def factored(self) -> bool:
        """Whether matrix-shaped tensors come as rank-1 factors ``(u, v)``."""
        return self.name == "rank1"

    def _kept(self, index: int) -> Any:
        """Tensor ``index``'s kept block (rank-1 factors, a ``[K, *shape]`` tensor), or ``None`` if drawn."""
        return self._blocks[index] if self._blocks is not None else None

    def _block(self, index: int) -> Any:
        block = self._kept(index)
        if block is not None:
            return block
        return draw_tensor(self.name, self.primals[index], self.num_directions, self._seeds[index])

    def release(self, index: int) -> None:
        """Drop tensor ``index``'s kept dense block (its consumer is done with it); a later use draws it
        again from its seed. Rank-1 factors and joint samplers' blocks are kept."""
        if self._blocks is not None and self._seeds is not None:
            self._blocks[index] = None
            if self._first is not None:
                self._first[index] = None  # type: ignore[call-overload]

    def direction(self, index: int, k: int) -> Direction:
        """Tensor ``index``'s tangent in direction ``k``: ``(u [out], v [in])`` for a rank-1 matrix, else a
        tensor of the parameter's shape (a lean source draws that one direction alone, from its seed)."""
        if self._first is not None and self._first[index] is not None:
            return self._first[index]
        block = self._kept(index)
        if block is None:
            return draw_direction(self.name, self.primals[index], self._seeds[index], k)
        if isinstance(block, tuple):
            return block[0][k], block[1][k]
        return block[k]

    def dense(self, index: int, k: int) -> Tensor:
        """:meth:`direction`, with rank-1 factors multiplied out to the parameter's shape."""
        d = self.direction(index, k)
        if isinstance(d, tuple):
            return torch.outer(*d).view(self.primals[index].shape)
        return d

    def chunk(self, index: int, start: int, stop: int) -> Tensor:
        """Directions ``start..stop-1`` of tensor ``index`` as one dense ``[stop - start, *shape]`` tensor
        (a lean source draws just those: memory bounded by the chunk, not by K)."""
        block = self._kept(index)
        if isinstance(block, Tensor):
            return block[start:stop]
        if block is not None:  # rank-1 factors
            u, v = block[0][start:stop], block[1][start:stop]
            return (u.unsqueeze(2) * v.unsqueeze(1)).reshape(stop - start, *self.primals[index].shape)
        if stop - start == 1:
            return self.dense(index, start).unsqueeze(0)
        return torch.stack([self.dense(index, k) for k in range(start, stop)])

    def mean(self, index: int, dirs: Tensor) -> Tensor:
        """``(1/K) Σ_k dirs[k] · v_{index,k}``, the mean forward gradient of one tensor. With K = 1 and a
        kept dense tangent, the tangent's own storage is scaled in place and returned (it is spent)."""
        block = self._kept(index)
        if self.num_directions == 1 and isinstance(block, Tensor):
            return block[0].mul_(dirs[0].to(block.dtype))
        return self.weighted_sum(index, dirs, alpha=1.0 / self.num_directions)

    def materialise(self) -> list[Tensor]:
        """Every tangent, ``[K, *p.shape]`` per tensor: equal to ``SAMPLERS[name](primals, K, generator)``."""
        return [self.materialise_one(i) for i in range(len(self.primals))]

    def add_scaled(self, index: int, out: Tensor, weights: Tensor, scales: Sequence[Tensor]) -> None:
        """``out += Σ_k scales[k] · v_{index,k}`` in place, with ``scales[k] = weights[k] / K`` as 0-dim tensors
        of ``out``'s dtype (the ``.grad`` writer computes them once per step): one ``addcmul_`` per direction
        (a lean source drawing one direction at a time), one ``addmm_`` for rank-1 factors."""
        block = self._kept(index)
        if self.lent(index, out):  # out holds the tangent itself (a zero .grad lent as its storage): 0 + d·v
            out.mul_(scales[0])
            return
        if isinstance(block, tuple) or (isinstance(block, Tensor) and block.shape[0] > 1):
            self.weighted_sum(index, weights, out=out, alpha=1.0 / self.num_directions)
            return
        for k, scale in enumerate(scales):
            out.addcmul_(self.direction(index, k), scale)

    def weighted_sum(self, index: int, weights: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        """``out + alpha · Σ_k weights[k] · v_{index,k}`` (``out`` updated in place; ``None``: from zero).

        Rank-1 matrices cost one ``[out, K] @ [K, in]`` product (``addmm_``), no ``u vᵀ`` per direction; a
        lean source draws one direction at a time (``addcmul_``), so the only temporary is one tensor's
        tangent. No weight is read on the host (no device synchronisation)."""
        p = self.primals[index]
        block = self._kept(index)
        if isinstance(block, tuple):
            u, v = block
            w = weights.to(u.dtype)
            if out is None:
                return ((u * w.unsqueeze(1)).T @ v).mul_(alpha).view(p.shape)
            if out.is_contiguous():
                out.view(u.shape[1], v.shape[1]).addmm_((u * w.unsqueeze(1)).T, v, alpha=alpha)
                return out
            return out.add_(((u * w.unsqueeze(1)).T @ v).view(p.shape), alpha=alpha)
        w = weights.to(p.dtype)
        if block is not None and block.shape[0] > 1:
            term = torch.tensordot(w, block, dims=1)
            return term.mul_(alpha) if out is None else out.add_(term, alpha=alpha)
        # one direction at a time, kept (K = 1) or drawn again
        return add_weighted_directions(
            lambda k: block[k] if block is not None else draw_direction(self.name, p, self._seeds[index], k),
            w, self.num_directions, out, alpha)
