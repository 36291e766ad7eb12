r"""The tangent engine: tangents drawn where they are needed, and the fast forward-gradient passes.

**Tangents, tensor by tensor.** For the per-tensor samplers (``gaussian``, ``rademacher``, ``rank1``)
``SAMPLERS[name](params, K, generator)`` draws each parameter's ``[K, *shape]`` block on its own (from a
per-tensor seed; rank-1: small factors). :class:`TangentSource` hands out exactly those numbers, tensor by
tensor: it keeps them (the ``.grad`` path, where the K = 1 tangent becomes the gradient's storage), keeps
only the rank-1 factors ``u [K, out]``, ``v [K, in]``, or, in ``lean`` mode, keeps only the per-tensor
seeds and draws a tensor again whenever a pass or the update needs it. So every path (reference, fast,
fused) uses the same tangents for the same seed, and the fused update never holds more than one tensor's.

**Windowed forward AD.** A fast step runs ``loss_fn(model)`` once per direction, under ``torch.no_grad``
inside a forward-AD level, with every trainable parameter swapped out of its module. A parameter becomes
a dual tensor ``(θ_i, v_i)`` only during the forward of a module that owns it (a *window*, opened by a
forward pre-hook and closed by a forward hook). ``nn.Linear`` and ``nn.Conv2d`` get no dual at all: the
pre-hook strips the input's tangent, the module computes the primal output only, and the forward hook
forms the whole output tangent itself (PyTorch's forward-AD rule for ``addmm`` with a plain weight would
also multiply the input by a zero weight tangent, a wasted matmul):

.. math:: y_t = x_t W^\top + x W_t^\top + b_t, \qquad x W_t^\top = (x v)\,u^\top \text{ when } W_t = u v^\top,

so with ``rank1`` tangents the weight's term costs ``O(B·(in + out))`` instead of a matmul and ``u vᵀ`` is
never formed. Any other module gets dual parameters and PyTorch's own forward-AD rules.

Outside its windows a parameter is a *watched* tensor that counts every use: a loss that touches a
parameter outside its module's forward (a weight penalty in ``loss_fn``, ``module.forward`` called
directly) would make the fast pass wrong, so the step is then redone on the reference path (every tangent
materialised, ``torch.func`` JVPs through ``functional_call``), with the buffers restored first. Both
paths give the same estimate up to floating-point rounding (tested in float64 to 1e-10).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.engine import TangentSource, fast_directions
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> params = dict(model.named_parameters())
    >>> source = TangentSource("rank1", [p.detach() for p in params.values()], 2, torch.Generator().manual_seed(0))
    >>> loss, dirs = fast_directions(model, lambda m: F.cross_entropy(m(x), y), params, source, where="demo")
    >>> tuple(dirs.shape)
    (2,)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from fwdgrad._validation import check_real_scalar
from fwdgrad.tangents import PARALLEL_DRAW_MIN, SAMPLERS, _draw_device, draw_tensor, rank1_factors, tensor_seeds

Tensor = torch.Tensor
LossFn = Callable[[nn.Module], Tensor]

#: Samplers that draw each tensor's tangent on its own (from a per-tensor seed; rank-1: small factors), so
#: that a tensor's tangent can be drawn again, alone, whenever it is needed.
PER_TENSOR_SAMPLERS = ("gaussian", "rademacher", "rank1")

Direction = Tensor | tuple[Tensor, Tensor]


class TangentSource:
    r"""The tangents of one step, exactly ``SAMPLERS[name](primals, K, generator)``, handed out tensor by
    tensor and direction by direction.

    Args:
        name: ``gaussian``, ``rademacher`` or ``rank1``.
        primals: the parameters (detached), in the estimator's order; index ``i`` is ``primals[i]``.
        num_directions: K.
        generator: the step's source of randomness (``None``: torch's global RNG); it is advanced exactly
            as ``SAMPLERS[name]`` advances it, whatever the mode.
        lean: keep no tangent. Only the per-tensor seeds are drawn (:func:`fwdgrad.tangents.tensor_seeds`,
            exactly what the sampler draws from the generator), and :meth:`direction` draws a tensor's
            block from its seed whenever it is needed: a tangent is a function of (generator state at the
            step, parameter index), never stored for the whole model. ``rank1`` keeps its factors
            (``K·(out + in)`` numbers per matrix), which are all it ever needs.

    Example:
        >>> import torch
        >>> from fwdgrad.engine import TangentSource
        >>> from fwdgrad.tangents import SAMPLERS
        >>> w = torch.zeros(3, 2)
        >>> lean = TangentSource("gaussian", [w], 1, torch.Generator().manual_seed(0), lean=True)
        >>> ref = SAMPLERS["gaussian"]([w], 1, torch.Generator().manual_seed(0))
        >>> bool(torch.equal(lean.direction(0, 0), ref[0][0]))
        True
    """

    def __init__(
        self, name: str, primals: Sequence[Tensor], num_directions: int, generator: torch.Generator | None,
        *, lean: bool = False,
    ) -> None:
        if name not in PER_TENSOR_SAMPLERS:
            raise ValueError(
                f"fwdgrad.engine.TangentSource: tangents {name!r} are drawn jointly over all tensors; "
                f"choose one of {PER_TENSOR_SAMPLERS}"
            )
        self.name, self.primals, self.num_directions = name, list(primals), num_directions
        self._blocks: list[Any] | None = None
        self._seeds: list[tuple[int, torch.device | str]] | None = None
        if name == "rank1":
            self._blocks = list(rank1_factors(self.primals, num_directions, generator))
        elif lean:
            seeds = tensor_seeds(len(self.primals), generator)
            self._seeds = [(seed, _draw_device(p, generator)) for p, seed in zip(self.primals, seeds)]
        else:
            self._blocks = SAMPLERS[name](self.primals, num_directions, generator)

    @property
    def factored(self) -> bool:
        """Whether matrix-shaped tensors come as rank-1 factors ``(u, v)``."""
        return self.name == "rank1"

    def _block(self, index: int) -> Any:
        if self._blocks is not None:
            return self._blocks[index]
        seed, device = self._seeds[index]
        return draw_tensor(self.name, self.primals[index], self.num_directions, seed, device)

    def direction(self, index: int, k: int) -> Direction:
        """Tensor ``index``'s tangent in direction ``k``: ``(u [out], v [in])`` for a rank-1 matrix, else a
        tensor of the parameter's shape (regenerated in ``lean`` mode)."""
        block = self._block(index)
        if isinstance(block, tuple):
            return block[0][k], block[1][k]
        return block[k]

    def dense(self, index: int, k: int) -> Tensor:
        """:meth:`direction`, with rank-1 factors multiplied out to the parameter's shape."""
        d = self.direction(index, k)
        if isinstance(d, tuple):
            return torch.outer(*d).view(self.primals[index].shape)
        return d

    def materialise(self) -> list[Tensor]:
        """Every tangent, ``[K, *p.shape]`` per tensor: equal to ``SAMPLERS[name](primals, K, generator)``."""
        out = []
        for i, p in enumerate(self.primals):
            block = self._block(i)
            if isinstance(block, tuple):
                u, v = block
                block = (u.unsqueeze(2) * v.unsqueeze(1)).reshape(self.num_directions, *p.shape)
            out.append(block)
        return out

    def weighted_sum(self, index: int, weights: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor:
        """``out + alpha · Σ_k weights[k] · v_{index,k}`` (``out`` updated in place; ``None``: from zero).

        Rank-1 matrices cost one ``[out, K] @ [K, in]`` product (``addmm_``), no ``u vᵀ`` per direction."""
        p = self.primals[index]
        block = self._block(index)
        if isinstance(block, tuple):
            u, v = block
            w = weights.to(u.dtype)
            if out is None:
                return ((u * w.unsqueeze(1)).T @ v).mul_(alpha).view(p.shape)
            if out.is_contiguous():
                out.view(u.shape[1], v.shape[1]).addmm_((u * w.unsqueeze(1)).T, v, alpha=alpha)
                return out
            return out.add_(((u * w.unsqueeze(1)).T @ v).view(p.shape), alpha=alpha)
        if block.shape[0] == 1:  # one direction: no K-sized contraction, no extra temporary
            scale = alpha * float(weights[0])
            return block[0].mul(scale) if out is None else out.add_(block[0], alpha=scale)
        term = torch.tensordot(weights.to(block.dtype), block, dims=1)
        return term.mul_(alpha) if out is None else out.add_(term, alpha=alpha)


# --------------------------------------------------------------------------------------------------------
# Watched parameters: any use outside a window is recorded.


class _UseFlag(threading.local):
    hits = 0


_USE = _UseFlag()


class _Watched(Tensor):
    """A parameter's data while it is outside its module's forward; every torch call on it is counted."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        _USE.hits += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _watched(p: Tensor) -> Tensor:
    return Tensor._make_subclass(_Watched, p.detach(), False)


# --------------------------------------------------------------------------------------------------------
# Fast tangent terms of Linear and Conv2d: y_t += x W_tᵀ + b_t with W, b plain.


def _is_fast_module(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def _linear_term(m: nn.Linear, x: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor:
    if isinstance(w_t, tuple):  # rank-1: x W_tᵀ = (x·v) uᵀ
        u, v = w_t
        term = (x @ v).unsqueeze(-1) * u
        return term if b_t is None else term.add_(b_t)
    return F.linear(x, w_t, b_t)


def _conv_term(m: nn.Conv2d, x: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor:
    if isinstance(w_t, tuple):  # rank-1: conv(x, u ⊗ v) = u · conv(x, v), one output map per group
        u, v = w_t
        g = m.groups
        shape = (m.in_channels // g, *m.kernel_size)
        kernel = v.view(1, *shape).expand(g, *shape)
        z = F.conv2d(x, kernel, None, m.stride, m.padding, m.dilation, g)  # [B, g, H, W]
        if g > 1:
            z = z.repeat_interleave(m.out_channels // g, dim=1)
        term = z * u.view(1, -1, 1, 1)
    else:
        term = F.conv2d(x, w_t, None, m.stride, m.padding, m.dilation, m.groups)
    return term if b_t is None else term.add_(b_t.view(1, -1, 1, 1))


def _fits(m: nn.Module, x: Tensor) -> bool:
    if type(m) is nn.Linear:
        return x.dim() >= 1 and x.shape[-1] == m.in_features
    return x.dim() == 4


def _add_input_term(m: nn.Module, term: Tensor, x_t: Tensor, weight: Tensor, inplace: bool = True) -> Tensor:
    """``term + x_t W^T`` (conv: ``+ conv(x_t, W)``), in place (one ``addmm_``) unless ``inplace`` is off."""
    if type(m) is nn.Linear:
        if inplace and x_t.dim() == 2 and term.dim() == 2 and term.is_contiguous():
            return term.addmm_(x_t, weight.t())
        return term + F.linear(x_t, weight)
    return term + F.conv2d(x_t, weight, None, m.stride, m.padding, m.dilation, m.groups)


def _primal(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The output of a fast module for plain tensors (what its own ``forward`` computes)."""
    if type(m) is nn.Linear:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def _fast_term(m: nn.Module, x: Tensor, out: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor:
    """The output-tangent term of the module's own parameters, ``x W_tᵀ + b_t`` (or its conv analogue)."""
    if w_t is None:  # frozen weight, trainable bias
        bias = b_t.view(-1, *([1] * (out.dim() - 2))) if type(m) is nn.Conv2d else b_t
        return torch.zeros_like(out) + bias
    if type(m) is nn.Linear:
        return _linear_term(m, x, w_t, b_t)
    return _conv_term(m, x, w_t, b_t)


# --------------------------------------------------------------------------------------------------------
# One direction through the model.


class _Slot:
    """One entry ``module._parameters[name]`` holding trainable parameter number ``index``."""

    __slots__ = ("index", "name", "param", "primal", "watched")

    def __init__(self, name: str, param: Tensor, index: int, primal: Tensor) -> None:
        self.name, self.param, self.index, self.primal = name, param, index, primal
        self.watched = _watched(primal)


class WindowedPass:
    """Evaluates ``loss_fn(model)`` and its derivative along direction ``k`` of ``source``.

    Args:
        model: the module; its trainable parameters are ``params`` (index = position in ``params``).
        params: the trainable parameters, as :func:`fwdgrad.estimators.base.trainable_parameters` lists them.
        source: the step's tangents.
        fast_modules: add the tangent terms of ``nn.Linear`` / ``nn.Conv2d`` in their forward hook
            (``False``: dual parameters in every module).
    """

    def __init__(
        self, model: nn.Module, params: Sequence[Tensor], source: TangentSource, *, fast_modules: bool = True
    ) -> None:
        self.model, self.source = model, source
        index_of = {id(p): i for i, p in enumerate(params)}
        primals = source.primals
        self.slots: dict[nn.Module, list[_Slot]] = {}
        for m in model.modules():
            found = [
                _Slot(name, p, index_of[id(p)], primals[index_of[id(p)]])
                for name, p in m._parameters.items()
                if p is not None and id(p) in index_of
            ]
            if found:
                self.slots[m] = found
        self.fast = {m for m in self.slots if fast_modules and _is_fast_module(m)}
        self._direction = 0
        self._depth: dict[nn.Module, int] = {}
        self._input_tangent: dict[nn.Module, Tensor | None] = {}
        self._generic: set[nn.Module] = set()

    def _open(self, m: nn.Module, args: Any) -> Any:
        depth = self._depth.get(m, 0)
        self._depth[m] = depth + 1
        if depth:
            return None
        slots = self.slots[m]
        if m in self.fast and args and isinstance(args[0], Tensor) and _fits(m, args[0]):
            # The module computes the primal only; _close adds the whole output tangent.
            x_p, x_t = fwAD.unpack_dual(args[0])
            self._input_tangent[m] = x_t
            for s in slots:
                m._parameters[s.name] = s.primal
            return (x_p, *args[1:])
        self._generic.add(m)
        for s in slots:
            m._parameters[s.name] = fwAD.make_dual(s.primal, self.source.dense(s.index, self._direction))
        return None

    def _close(self, m: nn.Module, args: Any, output: Any) -> Any:
        self._depth[m] -= 1
        if self._depth[m]:
            return None
        result = None
        if m in self._generic:
            self._generic.discard(m)
        elif m in self._input_tangent:
            result = self._fast_output(m, args[0], output, self._input_tangent.pop(m))
        for s in self.slots[m]:
            m._parameters[s.name] = s.watched
        return result

    def _fast_output(self, m: nn.Module, x: Tensor, out: Tensor, x_t: Tensor | None) -> Tensor:
        """``make_dual(y, x_t W^T + x W_t^T + b_t)`` (conv: the same with convolutions)."""
        tangents: dict[str, Any] = {"weight": None, "bias": None}
        for s in self.slots[m]:
            tangents[s.name] = self.source.direction(s.index, self._direction)
        term = _fast_term(m, x, out, tangents["weight"], tangents["bias"])
        if x_t is not None:
            term = _add_input_term(m, term, x_t, m.weight)
        return fwAD.make_dual(out, term)

    @contextmanager
    def _installed(self) -> Iterator[None]:
        handles = []
        try:
            for m, slots in self.slots.items():
                for s in slots:
                    m._parameters[s.name] = s.watched
                handles.append(m.register_forward_pre_hook(self._open))
                handles.append(m.register_forward_hook(self._close, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for m, slots in self.slots.items():
                for s in slots:
                    m._parameters[s.name] = s.param
            self._depth.clear()
            self._input_tangent.clear()
            self._generic.clear()

    def run(self, loss_fn: LossFn, direction: int, where: str) -> tuple[Tensor, Tensor, bool]:
        """``(loss, ⟨∇L, v_k⟩, clean)``; ``clean`` is ``False`` when a parameter was used outside a window."""
        self._direction = direction
        before = _USE.hits
        with torch.no_grad(), fwAD.dual_level(), self._installed():
            out = check_real_scalar(where, loss_fn(self.model))
            primal, tangent = fwAD.unpack_dual(out)
            tangent = torch.zeros_like(primal) if tangent is None else tangent
        return primal.detach(), tangent.detach(), _USE.hits == before


# --------------------------------------------------------------------------------------------------------
# Directions, estimates and fused updates of one step.


def _snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.clone()) for b in model.buffers()]


def _restore_buffers(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)


def reference_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], tangents: list[Tensor], *,
    chunk_size: int | None, where: str,
) -> tuple[Tensor, Tensor]:
    """The reference path: ``(loss, dirs [K])`` by ``torch.func`` JVPs through ``functional_call`` with
    the materialised ``tangents`` (:func:`fwdgrad.directional_derivatives`, ``chunk_size`` at a time)."""
    from fwdgrad.estimators.base import call_with_parameters
    from fwdgrad.functional import directional_derivatives

    names = list(params)
    primals = [p.detach() for p in params.values()]

    def f(xs: list[Tensor]) -> Tensor:
        return check_real_scalar(where, call_with_parameters(model, loss_fn, dict(zip(names, xs))))

    value, dirs, _ = directional_derivatives(f, primals, tangents, chunk_size=chunk_size, where=where)
    return value, dirs


def fast_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], source: TangentSource, *, where: str,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor] | None:
    """The fast path: several directions batched in one pass (:mod:`fwdgrad.engine_batched`, ``chunk_size``
    at a time) where the model allows it, else one windowed forward-AD pass per direction.

    Returns ``(loss, dirs [K])``, or ``None`` when a parameter was used outside its module's forward; the
    buffers are then restored and the caller takes the reference path.
    """
    if source.num_directions > 1:
        from fwdgrad.engine_batched import batched_directions

        got = batched_directions(model, loss_fn, params, source, where=where, chunk_size=chunk_size)
        if got is not None:
            return got
    saved = _snapshot_buffers(model)
    run = WindowedPass(model, list(params.values()), source)
    loss, dirs = None, []
    for k in range(source.num_directions):
        value, d, clean = run.run(loss_fn, k, where)
        if not clean:
            _restore_buffers(saved)
            return None
        loss = value if loss is None else loss
        dirs.append(d.reshape(1))
    return loss, torch.cat(dirs)


def uses_fast_loop(name: str, num_directions: int) -> bool:
    """Whether the fast path applies: one direction, or ``rank1`` tangents (whose batched pass costs about
    ``1 + K`` matmul units against ``1 + 2K`` for the reference ``vmap(jvp)`` with dense tangents)."""
    return name in PER_TENSOR_SAMPLERS and (num_directions == 1 or name == "rank1")


def step_directions(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], source: TangentSource, *,
    chunk_size: int | None, where: str, fast: bool,
) -> tuple[Tensor, Tensor]:
    """``(loss, dirs [K])`` for the tangents of ``source``: the fast path when it applies, else (or when
    it gives up) the reference path."""
    got = None
    if fast and uses_fast_loop(source.name, source.num_directions):
        got = fast_directions(model, loss_fn, params, source, where=where, chunk_size=chunk_size)
    if got is None:
        got = reference_directions(model, loss_fn, params, source.materialise(), chunk_size=chunk_size, where=where)
    return got


def estimate_from_directions(source: TangentSource, dirs: Tensor) -> list[Tensor]:
    """``ĝ_i = (1/K) Σ_k dirs[k] · v_{ik}`` for every tensor (with K = 1 a stored tangent is scaled in place,
    as :func:`fwdgrad.functional.combine` does)."""
    k_total = dirs.shape[0]
    out = []
    for i in range(len(source.primals)):
        if k_total == 1 and not source.factored and source._blocks is not None:
            t = source._blocks[i][0]
            out.append(t.mul_(dirs[0].to(t.dtype)))
        else:
            out.append(source.weighted_sum(i, dirs, alpha=1.0 / k_total))
    return out


def apply_sgd(source: TangentSource, params: Sequence[Tensor], dirs: Tensor, lr: float, weight_decay: float) -> None:
    r"""``θ_i ← (1 − lr·wd)·θ_i − (lr/K) Σ_k d_k v_{ik}`` tensor by tensor, the tangents drawn again (or,
    for rank-1, the factors reused): the only temporary is one tensor's tangent."""
    k_total = dirs.shape[0]

    def update(i: int) -> None:
        p = params[i]
        with torch.no_grad():
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            source.weighted_sum(i, dirs, out=p.data, alpha=-lr / k_total)

    workers = min(torch.get_num_threads(), len(params))
    drawn = not source.factored and source._blocks is None  # each tensor's tangent is drawn again here
    if drawn and workers > 1 and sum(p.numel() for p in params) * k_total >= PARALLEL_DRAW_MIN:
        # Tensors are independent (each has its own seed): update them on several threads.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(update, range(len(params))))
    else:
        for i in range(len(params)):
            update(i)
