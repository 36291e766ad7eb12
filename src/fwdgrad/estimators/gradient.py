r"""The result of one estimator step, and its two consumers: ``.grad`` or a fused in-place update.

A step of a forward-gradient estimator does not need to form its gradient. :class:`ImplicitGradient` holds
what defines it — the loss, the K directional derivatives ``d_k`` and the :class:`~fwdgrad.directions.
TangentSource` able to regenerate the directions — and the gradient of tensor ``i`` is the mean

.. math:: \hat g_i = \frac1K \sum_k d_k\, v_{ik}.

Any other estimator returns an :class:`ExplicitGradient` (the loss and a gradient per tensor). Both offer:

* :meth:`~Gradient.accumulate`: add ``ĝ`` into ``p.grad`` (what ``loss.backward()`` would do), so every
  ``torch.optim`` optimizer, scheduler, clipping and accumulation works;
* :meth:`~Gradient.sgd_`: the fused update ``θ ← θ − lr·b`` with ``b = μ b + (ĝ + wd·θ)`` (``torch.optim.SGD``
  semantics, ``dampening = 0``), tensor by tensor; an implicit gradient is formed one tensor at a time
  from regenerated tangents, so no model-sized temporary exists (with ``μ = 0``).

Before either writes anything, :meth:`~Gradient.check_finite` (the one finiteness check of the library)
raises :class:`fwdgrad.NonFiniteError` for a NaN or infinite loss or estimate and nothing is written.

Example:
    >>> import torch
    >>> from fwdgrad.directions import TangentSource
    >>> from fwdgrad.estimators.gradient import ImplicitGradient
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> src = TangentSource("rademacher", [w.detach()], 2, torch.Generator().manual_seed(0))
    >>> g = ImplicitGradient(torch.tensor(1.0), torch.tensor([0.5, -0.5]), src)
    >>> g.accumulate("demo", [w])
    >>> bool(torch.equal(w.grad, 0.25 * (src.dense(0, 0) - src.dense(0, 1))))
    True
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fwdgrad.directions import PARALLEL_DRAW_MIN, DirectionSource
from fwdgrad.errors import NonFiniteError

Tensor = torch.Tensor


def _finite_tensors(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the tensors holding a NaN or infinity.

    A sum is NaN or infinite whenever one of its terms is, so one sum per tensor clears the common case;
    only a tensor whose sum is not finite (a bad entry, or an overflow) gets the entry-wise test."""
    suspects = [i for i, t in enumerate(tensors) if not torch.isfinite(t.sum())]
    return [i for i in suspects if not torch.isfinite(tensors[i]).all()]


class Gradient(abc.ABC):
    """One step's gradient estimate (see the module docstring)."""

    loss: Tensor

    @abc.abstractmethod
    def tensor(self, index: int) -> Tensor:
        """``ĝ`` of tensor ``index`` (a new tensor or, once, a spent tangent's storage)."""

    @abc.abstractmethod
    def _non_finite(self) -> list[int]:
        """Indices of the tensors whose estimate holds a NaN or infinity."""

    def check_finite(self, where: str, names: Sequence[str] | None = None) -> None:
        """Raise :class:`fwdgrad.NonFiniteError` when the loss or the estimate is NaN or infinite."""
        if not torch.isfinite(self.loss):
            raise NonFiniteError(f"{where}: the loss is {self.loss.item()}; nothing was written")
        bad = self._non_finite()
        if bad:
            what = [names[i] for i in bad[:3]] if names is not None else f"{len(bad)} tensor(s)"
            raise NonFiniteError(f"{where}: the estimate for {what} is not finite; nothing was written")

    def accumulate(self, where: str, params: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        """``p.grad += ĝ`` for every parameter (``p.grad = ĝ`` when it is ``None``), after the check."""
        self.check_finite(where, names)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = self.tensor(i)
                if p.grad is None:
                    p.grad = g.detach().to(p.dtype)
                else:
                    p.grad.add_(g)

    def sgd_(
        self, where: str, params: Sequence[Tensor], lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
        buffers: dict[Tensor, Tensor] | None = None,
    ) -> None:
        """The fused SGD update in place (``torch.optim.SGD`` semantics); ``.grad`` is not touched.

        ``buffers`` holds the momentum buffers between steps (required when ``momentum > 0``)."""
        self.check_finite(where)
        with torch.no_grad():
            if momentum:
                assert buffers is not None
                for i, p in enumerate(params):
                    g = self.tensor(i)
                    if weight_decay:
                        g = g.add(p, alpha=weight_decay)
                    buf = buffers.get(p)
                    buffers[p] = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                    p.add_(buffers[p], alpha=-lr)
                return
            self._plain_sgd(params, lr, weight_decay)

    def _plain_sgd(self, params: Sequence[Tensor], lr: float, weight_decay: float) -> None:
        for i, p in enumerate(params):
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            p.sub_(self.tensor(i), alpha=lr)


class ExplicitGradient(Gradient):
    """A gradient formed tensor by tensor: ``(loss, [ĝ_i])``."""

    def __init__(self, loss: Tensor, grads: Sequence[Tensor]) -> None:
        self.loss, self.grads = loss, list(grads)

    def tensor(self, index: int) -> Tensor:
        return self.grads[index]

    def _non_finite(self) -> list[int]:
        return _finite_tensors(self.grads)


class ImplicitGradient(Gradient):
    """``ĝ_i = (1/K) Σ_k dirs[k] · v_{ik}``, with the tangents ``v`` of ``source`` (regenerated on demand)."""

    def __init__(self, loss: Tensor, dirs: Tensor, source: DirectionSource) -> None:
        self.loss, self.dirs, self.source = loss, dirs, source

    def tensor(self, index: int) -> Tensor:
        return self.source.mean(index, self.dirs)

    def check_finite(self, where: str, names: Sequence[str] | None = None) -> None:
        # one host read for the common case (a finite loss and finite derivatives)
        if not bool(torch.isfinite(self.loss) & torch.isfinite(self.dirs).all()):
            super().check_finite(where, names)

    def _non_finite(self) -> list[int]:
        # the tangents are finite by construction: a non-finite derivative spoils every tensor
        return [] if bool(torch.isfinite(self.dirs).all()) else list(range(len(self.source.primals)))

    def accumulate(self, where: str, params: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        r"""``p.grad += ĝ`` tensor by tensor, straight into ``.grad``, after the finiteness check (which needs
        only ``dirs``, so nothing is written when it fails).

        A ``.grad`` that exists gets ``(1/K) Σ_k d_k v_{ik}`` added in place (``addcmul_`` per direction,
        ``addmm_`` for rank-1 factors); a ``.grad`` that is ``None`` becomes the estimate, formed in the spent
        tangent's own storage when the source kept it (K = 1). Each tensor's kept tangent is released as soon
        as it is added, so no model-sized temporary outlives its tensor."""
        self.check_finite(where, names)
        src, k_total = self.source, self.dirs.shape[0]
        # d_k / K, once per dtype (no per-tensor ops)
        scales = {dtype: (self.dirs.to(dtype) / k_total).unbind() for dtype in {p.dtype for p in params}}

        # TangentSource's in-place adder and early release; other DirectionSources may lack them
        add_scaled, release = getattr(src, "add_scaled", None), getattr(src, "release", None)

        def add(i: int) -> None:
            p = params[i]
            with torch.no_grad():  # grad mode is per thread
                if p.grad is None:
                    g = src.mean(i, self.dirs)
                    p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
                elif add_scaled is not None:
                    add_scaled(i, p.grad, self.dirs, scales.get(p.grad.dtype) or scales[p.dtype])
                else:  # any DirectionSource (e.g. the ranks' ConcatSource): its weighted sum, in place
                    src.weighted_sum(i, self.dirs, out=p.grad, alpha=1.0 / k_total)
                if release is not None:
                    release(i)

        _for_each_tensor(add, params, src, k_total)

    def materialise(self) -> list[Tensor]:
        """Every tensor's estimate."""
        return [self.tensor(i) for i in range(len(self.source.primals))]

    def _plain_sgd(self, params: Sequence[Tensor], lr: float, weight_decay: float) -> None:
        r"""``θ_i ← (1 − lr·wd)·θ_i − (lr/K) Σ_k d_k v_{ik}`` in place, the tangent drawn again (rank-1: one
        ``addmm_`` of the factors): the only temporary is one tensor's tangent. Tensors regenerated from
        their own seeds are independent, so large models update on several threads."""
        src, k_total = self.source, self.dirs.shape[0]

        def update(i: int) -> None:
            p = params[i]
            with torch.no_grad():  # grad mode is per thread
                if weight_decay:
                    p.mul_(1.0 - lr * weight_decay)
                src.weighted_sum(i, self.dirs, out=p.data, alpha=-lr / k_total)

        _for_each_tensor(update, params, src, k_total)


def _for_each_tensor(fn: Callable[[int], None], params: Sequence[Tensor], src: DirectionSource, k_total: int) -> None:
    """``fn(i)`` for every tensor; on several threads when each draws its tangents again from its own seed
    (independent generators: the numbers do not depend on the threads) and the draws are large."""
    workers = min(torch.get_num_threads(), len(params))
    drawn = src.regenerable and not src.stored and not src.factored
    if drawn and workers > 1 and sum(p.numel() for p in params) * k_total >= PARALLEL_DRAW_MIN:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, range(len(params))))
    else:
        for i in range(len(params)):
            fn(i)


class MappedGradient(Gradient):
    r"""``ĝ_i = fn(inner.tensor(i))``: an entry-wise map of another gradient's estimate, tensor by tensor (e.g.
    ``Tensor.sign_`` for ZO-SGD-Sign). Seed sharing applies it *after* the ranks' scalars were exchanged
    (:meth:`~fwdgrad.estimators.zeroth_order.ZerothOrder.post_exchange`), so the map sees the estimate of
    the whole batch (data parallel) or of all ``K·W`` directions (tangent parallel).

    ``fn`` gets a fresh estimate of one tensor and may work on it in place. The finiteness check is
    ``inner``'s (a finite estimate stays finite under the maps used here).

    Example:
        >>> import torch
        >>> g = MappedGradient(ExplicitGradient(torch.tensor(1.0), [torch.tensor([-2.0, 0.5])]), torch.Tensor.sign_)
        >>> g.tensor(0).tolist()
        [-1.0, 1.0]
    """

    def __init__(self, inner: Gradient, fn: Callable[[Tensor], Tensor]) -> None:
        self.loss, self.inner, self.fn = inner.loss, inner, fn

    def tensor(self, index: int) -> Tensor:
        return self.fn(self.inner.tensor(index))

    def check_finite(self, where: str, names: Sequence[str] | None = None) -> None:
        self.inner.check_finite(where, names)

    def _non_finite(self) -> list[int]:
        return self.inner._non_finite()


class PartlyImplicitGradient(Gradient):
    """Some tensors from an :class:`ImplicitGradient` (the perturbed ones), the others given explicitly
    (e.g. a read-out layer's exact local gradient).

    Args:
        implicit: the perturbed tensors' gradient; its tensor ``j`` is overall tensor ``implicit_index[j]``.
        explicit: overall index → gradient, for the other tensors.
    """

    def __init__(self, implicit: ImplicitGradient, implicit_index: Sequence[int], explicit: dict[int, Tensor]) -> None:
        self.loss, self.implicit, self.explicit = implicit.loss, implicit, explicit
        self._local = {i: j for j, i in enumerate(implicit_index)}

    def tensor(self, index: int) -> Tensor:
        j = self._local.get(index)
        return self.explicit[index] if j is None else self.implicit.tensor(j)

    def _non_finite(self) -> list[int]:
        bad = [i for i, j in self._local.items() if j in self.implicit._non_finite()]
        order = sorted(self.explicit)
        return sorted(bad + [order[k] for k in _finite_tensors([self.explicit[i] for i in order])])
