r"""Local losses: how a model declares blocks with their own heads, so each block learns from its own loss.

Ren, Kornblith, Liao and Hinton (ICLR 2023), "Scaling Forward Gradient With Local Losses", train every block
of a network from a loss of its own and cut both gradients and tangents between blocks. This module is the
small contract between such a model and the local-loss estimators (``"l-bp"``, ``"lg-bp"``, ``"lg-fg-w"``,
``"lg-fg-a"``, see :mod:`fwdgrad.estimators.local`).

The API, from the model's side
------------------------------
While an estimator runs the forward pass inside :func:`recording`, :func:`current` returns a
:class:`LocalRecorder` (otherwise ``None``, and the model runs as an ordinary end-to-end network). A model
that supports local losses then, in its ``forward``:

1. cuts every block's input with :func:`stop_gradient` (no gradient and no tangent crosses a block boundary);
2. for each block ``k`` calls ``recorder.add_head(block, head, head_input, split_logits)``, where ``head`` is
   the block's local classifier (an ``nn.Linear``), ``head_input`` its input ``[B, F]`` (already cut with
   :func:`stop_gradient`, so the head learns from its own loss only) and ``split_logits`` ``[B, *S, C]``
   are the logits whose loss trains the block's body: ``S`` indexes the local losses of one example (the
   paper's groups and patches, ``S = (P, G)``, when ``recorder.groups`` is true; ``S = ()`` otherwise);
3. reads out its prediction from the last block's (cut) features and registers that read-out head as well
   with ``split_logits=None``.

The loss of the model is ``loss_fn(model)``, unchanged. The local losses reuse the *same* criterion: the
estimator calls ``loss_fn`` again on a stand-in module that returns the recorded logits (see
:func:`replay_criterion`), so ``loss_fn`` must call its model argument once, as ``m(x)``, and apply a
per-example criterion to the result, e.g. ``lambda m: F.cross_entropy(m(x), y, reduction="none")``.

The objective of block ``k`` is :math:`J_k = \frac1B \sum_b \sum_{s \in S} \ell(\text{split}_k[b, s], y_b)`
for its body and :math:`\frac1B \sum_b \ell(\text{head}_k(\text{head\_input}_k[b]), y_b)` for its head.

Per-loss layouts (for the forward-gradient estimators)
------------------------------------------------------
With ``S = (P, G)`` the forward-gradient estimators get one directional derivative per example, patch and
group, ``D[b, p, g]``. A module inside a block tells them which of its outputs feed which local loss by a
method ``local_loss_layout(d) -> Tensor``: it maps ``d`` of shape ``[B, P, G]`` to a tensor that broadcasts
against its output (for example, the channel chunk ``g`` of a grouped layer gets ``d[b, p, g]``). For weight
perturbation, ``local_param_loss_layout(name, dg) -> Tensor`` maps ``dg`` of shape ``[G]`` (summed over
examples and patches) to a tensor that broadcasts against parameter ``name``. These two methods are the
declared protocol :class:`LocalLossLayer`. A module without them gets the sum over ``S`` (still unbiased,
with more variance). (The older undeclared names ``loss_layout``/``param_loss_layout`` still work for one
release, with a ``DeprecationWarning``.)

Example:
    >>> import torch, fwdgrad.local as local
    >>> local.current() is None
    True
    >>> with local.recording(groups=True) as rec:
    ...     local.current() is rec
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

Tensor = torch.Tensor


@runtime_checkable
class LocalLossLayer(Protocol):
    """A module inside a block that maps the per-loss derivatives onto its outputs and parameters."""

    def local_loss_layout(self, d: Tensor) -> Tensor:
        """``d [B, P, G]`` → a tensor broadcasting against the module's output."""
        ...

    def local_param_loss_layout(self, name: str, dg: Tensor) -> Tensor:
        """``dg [G]`` → a tensor broadcasting against parameter ``name``."""
        ...


_WARNED: set[tuple[type, str]] = set()


def layer_method(module: Any, name: str, deprecated: str) -> Any:
    """``module.<name>`` (a protocol member), else the deprecated undeclared ``module.<deprecated>`` with a
    ``DeprecationWarning`` (once per class), else ``None``."""
    found = getattr(module, name, None)
    if found is not None:
        return found
    found = getattr(module, deprecated, None)
    if found is not None and (type(module), deprecated) not in _WARNED:
        _WARNED.add((type(module), deprecated))
        warnings.warn(
            f"{type(module).__name__}.{deprecated} is deprecated and will stop working in the next release; "
            f"implement {name} (the declared protocol) instead",
            DeprecationWarning,
            stacklevel=3,
        )
    return found


def stop_gradient(x: Tensor) -> Tensor:
    """The primal value of ``x`` with neither a gradient path nor a forward-mode tangent.

    ``stop_gradient(x)`` equals ``x`` numerically; ``backward`` does not reach past it and a dual tensor loses
    its tangent (``Tensor.detach`` drops both).
    """
    return x.detach()


@dataclasses.dataclass
class LocalHead:
    """One local head recorded during a forward pass.

    Attributes:
        block: the module whose parameters this head's loss trains (``None`` for the read-out head).
        head: the head module (an ``nn.Linear``); it learns from ``ℓ(head(head_input), y)``.
        head_input: ``[B, F]``, the head's input, with no gradient or tangent attached.
        logits: ``[B, C]``, ``head(head_input)``.
        split_logits: ``[B, *S, C]`` logits whose losses train ``block`` (``None`` for the read-out head).
    """

    block: nn.Module | None
    head: nn.Linear
    head_input: Tensor
    logits: Tensor
    split_logits: Tensor | None


class LocalRecorder:
    """Collects the local heads of one forward pass; see the module docstring for the protocol.

    Attributes:
        groups: ``True`` for one loss per group and patch (the paper's "LG"), ``False`` for one per block.
        heads: the recorded heads, in forward order.
    """

    def __init__(self, groups: bool) -> None:
        self.groups = groups
        self.heads: list[LocalHead] = []

    def add_head(
        self, block: nn.Module | None, head: nn.Linear, head_input: Tensor, split_logits: Tensor | None
    ) -> Tensor:
        """Record a head and return its logits ``head(head_input)`` (``[B, C]``)."""
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"fwdgrad.local.LocalRecorder.add_head: head must be an nn.Linear, got {type(head).__name__}"
            )
        if head_input.dim() != 2:
            raise ValueError(
                "fwdgrad.local.LocalRecorder.add_head: head_input must have shape [B, F], got "
                f"{tuple(head_input.shape)}"
            )
        logits = head(head_input)
        self.heads.append(LocalHead(block, head, head_input, logits, split_logits))
        return logits


_CURRENT: list[LocalRecorder] = []


def current() -> LocalRecorder | None:
    """The active recorder, or ``None`` when no local-loss estimator is running the model."""
    return _CURRENT[-1] if _CURRENT else None


@contextlib.contextmanager
def recording(groups: bool) -> Iterator[LocalRecorder]:
    """Run the model's forward in local-loss mode within this context; yields the :class:`LocalRecorder`."""
    rec = LocalRecorder(bool(groups))
    _CURRENT.append(rec)
    try:
        yield rec
    finally:
        _CURRENT.pop()


def split_head_logits(features: Tensor, head: nn.Linear, groups: bool) -> tuple[Tensor, Tensor]:
    r"""The head input, and the logits that train the body, for features ``[B, P, G, c]``.

    The head sees the mean over patches of the features, groups concatenated: ``h = mean_p f`` (``[B, G·c]``)
    and ``logits = W h + b``. The body's logits have the same value but route gradients and tangents
    locally:

    * ``groups=False`` (one loss per block): ``split[b] = sg(logits[b]) + sg(W) (h[b] − sg(h[b]))``;
    * ``groups=True`` (one loss per patch and group, shape ``[B, P, G, C]``):
      ``split[b, p, g] = sg(logits[b]) + sg(W_g) (f[b, p, g] − sg(f[b, p, g])) / P``, where ``W_g`` are the
      head's columns of group ``g``. The loss at ``(p, g)`` reaches only the features of patch ``p`` and
      group ``g``; the sum over ``(p, g)`` of these losses has the same gradient with respect to the last
      features as the block's single loss.

    ``sg`` is :func:`stop_gradient`. Returns ``(head_input, split_logits)``, ``head_input`` cut.
    """
    b, p, g, c = features.shape
    h = features.mean(1).reshape(b, g * c)
    h_cut = stop_gradient(h)
    logits = stop_gradient(head(h_cut))
    w = stop_gradient(head.weight)  # [C, G·c]
    if groups:
        delta = features - stop_gradient(features)  # value 0; carries the gradient/tangent of each (p, g)
        routed = torch.einsum("bpgc,kgc->bpgk", delta, w.view(w.shape[0], g, c)) / p
        split = logits[:, None, None, :] + routed
    else:
        split = logits + (h - h_cut) @ w.T
    return h_cut, split


class _StandIn(nn.Module):
    """A module whose forward ignores its inputs and returns fixed logits."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.logits


def replay_criterion(loss_fn: Callable[[nn.Module], Tensor], logits: Tensor) -> Tensor:
    """``loss_fn`` evaluated as if the model had returned ``logits`` (``[B, C]``): the per-example losses.

    Works for any ``loss_fn`` that calls its model argument once and applies a criterion to its output.
    """
    return loss_fn(_StandIn(logits))


def criterion_gradient(where: str, loss_fn: Callable[[nn.Module], Tensor], logits: Tensor) -> Tensor:
    r"""``∂ℓ_b/∂logits[b]`` for every example, ``[B, C]``, without a backward pass.

    ``C`` forward-mode passes through the criterion alone (not the model): pass ``c`` gives every example
    the tangent ``e_c``, so the tangent of the per-example loss vector is column ``c`` of the gradient.
    Requires per-example losses (``loss_fn`` returning shape ``[B]``).
    """
    logits = stop_gradient(logits)
    cols = []
    with fwAD.dual_level():
        for c in range(logits.shape[1]):
            tangent = torch.zeros_like(logits)
            tangent[:, c] = 1.0
            value = replay_criterion(loss_fn, fwAD.make_dual(logits, tangent))
            check_per_example(where, value, logits.shape[0])
            t = fwAD.unpack_dual(value).tangent
            cols.append(logits.new_zeros(logits.shape[0]) if t is None else t.detach())
    return torch.stack(cols, 1)


def check_per_example(where: str, value: Any, batch: int) -> Tensor:
    """Raise unless ``value`` is a floating-point vector of ``batch`` per-example losses."""
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{where}: loss_fn must return a floating-point tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(
            f"{where}: local losses need per-example losses: loss_fn must return shape [{batch}] "
            f"(e.g. F.cross_entropy(m(x), y, reduction='none')), got shape {tuple(value.shape)}"
        )
    return value


def block_of(blocks: list[nn.Module]) -> dict[int, int]:
    """``id(module) → index`` of the block containing it, for every module inside one of ``blocks``."""
    out: dict[int, int] = {}
    for k, blk in enumerate(blocks):
        for m in blk.modules():
            out[id(m)] = k
    return out
