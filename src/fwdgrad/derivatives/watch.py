r"""What every per-module pass shares: parameter *slots*, *watched* parameters, window depth, buffers.

A per-module pass swaps every trainable parameter out of its module (``module._parameters[name]``) and puts
it back only while that module runs (its *window*). Outside its windows a parameter is a *watched* tensor
that counts every torch call on it: a loss that touches a parameter outside its module's forward (a weight
penalty in ``loss_fn``, ``module.forward`` called directly, a tied weight used through ``F.linear``) would
make the pass wrong, so the pass reports it and the caller takes the reference path instead, with the
buffers restored first (:func:`snapshot_buffers`).

Every substitution of parameters by name goes through :func:`swapped` / :func:`functional_call_once`, which
swap each slot exactly once (a module registered under two names keeps its ``nn.Parameter`` objects).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fwdgrad.directions import TangentSource

Tensor = torch.Tensor
LossFn = Callable[[nn.Module], Tensor]


class _UseFlag(threading.local):
    hits = 0


USES = _UseFlag()


class _Watched(Tensor):
    """A parameter's data while it is outside its module's forward; every torch call on it is counted."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        USES.hits += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class Slot:
    """One entry ``module._parameters[name]`` holding trainable parameter number ``index``."""

    __slots__ = ("index", "name", "param", "primal", "watched")

    def __init__(self, name: str, param: Tensor, index: int, primal: Tensor) -> None:
        self.name, self.param, self.index, self.primal = name, param, index, primal
        self.watched = watched_view(param, primal)


#: id(parameter) → (weak reference to it, the layout its view was made for, its watched view), reused from
#: step to step while the parameter's data keeps that layout (tensors compare elementwise, so a
#: WeakKeyDictionary cannot hold them; the view's own attributes would count as uses, so the layout is kept)
_WATCHED: dict[int, tuple[weakref.ref, tuple[Any, ...], Tensor]] = {}


def watched_view(param: Tensor, primal: Tensor) -> Tensor:
    """A :class:`_Watched` view of ``primal`` (the parameter's data), made once per parameter and reused
    while the data keeps its storage, shape, strides, dtype and device (``p.data = ...`` makes a new one)."""
    layout = (primal.data_ptr(), primal.shape, primal.stride(), primal.dtype, primal.device)
    key = id(param)
    entry = _WATCHED.get(key)
    if entry is not None and entry[0]() is param and entry[1] == layout:
        return entry[2]
    w = Tensor._make_subclass(_Watched, primal.detach(), False)
    _WATCHED[key] = (weakref.ref(param, lambda _, key=key: _WATCHED.pop(key, None)), layout, w)
    return w


def slot_names(module: nn.Module) -> dict[int, list[str]]:
    """``id(tensor)`` → one qualified name per distinct slot (``owner._parameters[attr]`` or
    ``owner._buffers[attr]``, owners distinct by identity) that holds the tensor.

    A module instance registered twice (``nn.Sequential(lin, act, lin)``) is *one* owner: its weight has one
    slot, reachable under two names. A weight tied into two modules (``b.weight = a.weight``) has two."""
    out: dict[int, list[str]] = {}
    for prefix, owner in module.named_modules():  # duplicates removed: each owner once, by identity
        for attr, t in (*owner._parameters.items(), *owner._buffers.items()):
            if t is not None:
                out.setdefault(id(t), []).append(f"{prefix}.{attr}" if prefix else attr)
    return out


@contextmanager
def swapped(module: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """The named parameters / buffers of ``module`` replaced by ``tensors``, every slot exactly once, and
    restored afterwards.

    Each given name is expanded to every distinct slot holding the same tensor (:func:`slot_names`: a weight
    tied into two modules follows its replacement in both; a module registered under two names has one
    slot). ``torch.func.functional_call``'s own weight tying swaps such a module's slot twice and restores it
    to the replacement, leaving the module without its ``nn.Parameter``. Two different values for one tensor
    raise ``ValueError``; a name ``module`` does not have raises ``KeyError``.
    """
    current = dict(module.named_parameters(remove_duplicate=False))
    current.update(module.named_buffers(remove_duplicate=False))
    slots = slot_names(module)
    expanded: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name not in current:
            raise KeyError(f"fwdgrad: {type(module).__name__} has no parameter or buffer {name!r}")
        for slot in slots.get(id(current[name]), [name]):
            if slot in expanded and expanded[slot] is not value:
                raise ValueError(f"fwdgrad: two values given for the tied tensor at {slot!r}")
            expanded[slot] = value
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for slot, value in expanded.items():
            prefix, _, attr = slot.rpartition(".")
            owner = module.get_submodule(prefix)
            table = owner._parameters if attr in owner._parameters else owner._buffers
            saved.append((table, attr, table[attr]))
            table[attr] = value
        yield
    finally:
        for table, attr, old in reversed(saved):
            table[attr] = old


def functional_call_once(
    module: nn.Module, tensors: dict[str, Tensor], args: Any = (), kwargs: dict[str, Any] | None = None
) -> Any:
    """``module(*args, **kwargs)`` with the named tensors substituted (:func:`swapped`): what
    ``torch.func.functional_call`` does, with every slot swapped exactly once.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> net = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
        >>> out = functional_call_once(net, {"0.weight": torch.zeros(2, 2)}, (torch.ones(1, 2),))
        >>> isinstance(net[2].weight, torch.nn.Parameter) and net[2].weight is lin.weight
        True
    """
    args = args if isinstance(args, tuple) else (args,)
    with swapped(module, tensors):
        return module(*args, **(kwargs or {}))


class ModulePass:
    """The base of the per-module passes: slots by module, window depth, installation and restoration.

    Subclasses implement ``_open(m, args)`` / ``_close(m, args, output)`` (forward pre-hook and hook of every
    module owning a trainable parameter) and may replace some modules' ``forward`` (``forwards``)."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor], source: TangentSource) -> None:
        self.model, self.source = model, source
        index_of = {id(p): i for i, p in enumerate(params)}
        self.slots: dict[nn.Module, list[Slot]] = {}
        for m in model.modules():
            found = [
                Slot(name, p, index_of[id(p)], source.primals[index_of[id(p)]])
                for name, p in m._parameters.items()
                if p is not None and id(p) in index_of
            ]
            if found:
                self.slots[m] = found
        self._depth: dict[nn.Module, int] = {}

    def _enter(self, m: nn.Module) -> bool:
        """Count a call of ``m``; ``True`` for the outermost one (re-entrant modules open one window)."""
        depth = self._depth.get(m, 0)
        self._depth[m] = depth + 1
        return depth == 0

    def _leave(self, m: nn.Module) -> bool:
        self._depth[m] -= 1
        return self._depth[m] == 0

    def _watch(self, m: nn.Module) -> None:
        for s in self.slots[m]:
            m._parameters[s.name] = s.watched

    def _reset(self) -> None:
        """Per-run state to clear when the pass is uninstalled (subclasses extend it)."""
        self._depth.clear()

    @contextmanager
    def installed(self, forwards: dict[nn.Module, Callable[..., Any]] | None = None) -> Iterator[None]:
        """Parameters watched, hooks on (or ``forwards`` replacing a module's forward), all undone after."""
        forwards = forwards or {}
        handles = []
        try:
            for m in self.slots:
                self._watch(m)
                if m not in forwards:
                    handles.append(m.register_forward_pre_hook(self._open))
                    handles.append(m.register_forward_hook(self._close, always_call=True))
            for m, fn in forwards.items():  # a replaced module may own no trainable tensor itself
                m.forward = fn
            yield
        finally:
            for h in handles:
                h.remove()
            for m in forwards:
                m.__dict__.pop("forward", None)
            for m, slots in self.slots.items():
                for s in slots:
                    m._parameters[s.name] = s.param
            self._reset()

    def _open(self, m: nn.Module, args: Any) -> Any:
        raise NotImplementedError

    def _close(self, m: nn.Module, args: Any, output: Any) -> Any:
        raise NotImplementedError


def snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """A copy of every buffer, to undo what a pass did to them."""
    return [(b, b.clone()) for b in model.buffers()]


def restore_buffers(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, copy in saved:
            b.copy_(copy)


def once_per_step(model: nn.Module, loss_fn: LossFn) -> LossFn:
    """``loss_fn`` whose effect on ``model``'s buffers is that of its first call only.

    One step evaluates the loss once per direction (or chunk); BatchNorm in training mode would move its
    running statistics, and ``num_batches_tracked``, once per call. The wrapper records the buffers after
    the first call and puts them back after every later one, so a step updates them as one forward does.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> f = once_per_step(bn, lambda m: m(torch.randn(4, 2)).sum())
        >>> _ = f(bn), f(bn), f(bn)
        >>> int(bn.num_batches_tracked)
        1
    """
    buffers = list(model.buffers())
    if not buffers:
        return loss_fn
    after_first: list[Tensor] = []

    def wrapped(m: nn.Module) -> Tensor:
        out = loss_fn(m)
        if not after_first:
            after_first.extend(b.detach().clone() for b in buffers)
        else:
            with torch.no_grad():
                for b, saved in zip(buffers, after_first):
                    b.copy_(saved)
        return out

    return wrapped


class UsesOutside(TorchFunctionMode):
    """Records the trainable parameters that a forward uses outside the modules meant to own their use.

    ``owner`` maps ``id(parameter)`` to the modules whose forward (while running) may use it; a torch call
    that receives the parameter while none of its owners runs is recorded in :attr:`outside` (as the
    parameter's id). Owners are tracked with :meth:`enter` / :meth:`leave` (a forward pre-hook and hook).
    Activity perturbation uses it to refuse, rather than silently zero, a parameter it cannot reach: a
    weight tied into another module, or used through ``F.linear`` in a parent's forward.
    """

    def __init__(self, owner: dict[int, set[nn.Module]]) -> None:
        super().__init__()
        self.owner = owner
        self.running: dict[nn.Module, int] = {}
        self.outside: set[int] = set()

    def enter(self, m: nn.Module, *_: Any) -> None:
        self.running[m] = self.running.get(m, 0) + 1

    def leave(self, m: nn.Module, *_: Any) -> None:
        self.running[m] -= 1

    def _check(self, x: Any) -> None:
        if isinstance(x, Tensor):
            owners = self.owner.get(id(x))
            if owners is not None and not any(self.running.get(m) for m in owners):
                self.outside.add(id(x))
        elif isinstance(x, list | tuple):
            for y in x:
                self._check(y)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._check(args)
        self._check(tuple(kwargs.values()))
        return func(*args, **kwargs)
