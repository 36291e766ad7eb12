"""Forward mode through time: derivatives of sequence losses computed forward, with memory independent of T.

Two backends for recurrent models, both carrying derivative information *with* the state instead of storing the
sequence for a backward pass (BPTT); the first lives here, the second in :mod:`fwdgrad.derivatives.diagonal_recurrence`:

1. **Online forward mode** (Silver et al. 2022, "Learning by directional gradient descent", ICLR). A direction
   ``v`` in parameter space is held over a window of ``window`` steps; the state's tangent
   ``ṡ_t = ∂u/∂s·ṡ_{t−1} + ∂u/∂θ·v`` rides along with the state ``s_t = u(s_{t−1}, x_t; θ)`` under
   ``torch.autograd.forward_ad``; the window's loss ``Σ_t ℓ_t`` and its directional derivative
   ``d_k = Σ_t ℓ̇_t = ⟨∇_θ Σ_t ℓ_t, v⟩`` are accumulated online, and ``d_k·v`` is the window's forward gradient.
   At each window boundary the state keeps its value but drops its tangent (the past states were computed
   with the parameters of the past windows), so with ``window = T`` and one direction ``d = ⟨∇L, v⟩`` exactly,
   and with a shorter window ``d`` is the directional derivative of the loss truncated at the boundary,
   like truncated BPTT. Memory: the state, its tangent and the parameters' tangents, whatever ``T``.
   :func:`online_forward_gradient` runs it with per-step losses and an optional update after every window;
   :class:`WindowedSequence` runs a model whose loss is read at the end (classification).

2. **Exact forward-propagated gradient for diagonal recurrences** (e-prop / HYPR): the traces of a diagonal
   recurrence carried forward; :func:`fwdgrad.derivatives.diagonal_recurrence.forward_exact_gradient`.

The sequence protocol (:class:`SequenceModel`): a model exposing ``cell`` (an ``nn.Module`` mapping
``(x_t [B, F], state) -> state``, e.g. ``nn.GRUCell``, ``nn.LSTMCell``, ``nn.RNNCell`` or a user's cell),
``init_state(batch, like)``, ``readout(state) -> logits`` and ``to_sequence(x) -> [B, T, F]``. Its forward
should be ``run_sequence(self, x)``. Diagonal models (:class:`DiagonalCell`) add the element-wise pieces.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cell, self.fc = nn.GRUCell(2, 3), nn.Linear(3, 2)
    ...     def to_sequence(self, x): return x
    ...     def init_state(self, batch, like): return like.new_zeros(batch, 3)
    ...     def readout(self, state): return self.fc(state)
    ...     def forward(self, x): return run_sequence(self, x)
    >>> model = Tiny()
    >>> x = torch.randn(4, 5, 2)
    >>> res = online_forward_gradient(model, x, lambda t, s: model.readout(s).pow(2).mean() if t == 4 else None,
    ...                               generator=torch.Generator().manual_seed(0))
    >>> sorted(res.estimate) == sorted(n for n, _ in model.named_parameters())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad.derivatives.watch import functional_call_once
from fwdgrad.directions import check_sampler_name, sample_tangents

Tensor = torch.Tensor
State = Union[Tensor, tuple[Tensor, ...]]  # noqa: UP007 (a runtime alias)
DirectionSource = Callable[[list[Tensor], Union[torch.Generator, None]], list[Tensor]]  # noqa: UP007

__all__ = [
    "DiagonalCell",
    "OnlineResult",
    "SequenceModel",
    "WindowedSequence",
    "as_sequence",
    "check_diagonal_model",
    "check_sequence_model",
    "check_window",
    "last_window_start",
    "online_forward_gradient",
    "run_sequence",
]


# --- the sequence protocol ----------------------------------------------------------------------------------
@runtime_checkable
class SequenceModel(Protocol):
    """A recurrent model that fwdgrad can run step by step.

    Attributes / methods:
        cell: ``nn.Module`` called as ``cell(x_t, state) -> state`` with ``x_t`` of shape ``[B, F]``
            (``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell`` with state ``(h, c)``, or a user's cell).
        init_state(batch, like): the state before the first step (``like`` gives dtype and device).
        readout(state): logits ``[B, C]`` (or any output the loss reads) from the final state.
        to_sequence(x): the model's input ``[B, *input_shape]`` as a sequence ``[B, T, F]``.
    """

    cell: nn.Module

    def init_state(self, batch: int, like: Tensor) -> State: ...

    def readout(self, state: State) -> Tensor: ...

    def to_sequence(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class DiagonalCell(Protocol):
    """A cell with element-wise (diagonal) recurrence, state ``(v, o)``, for the exact forward gradient.

    ``cell(x_t, (v, o))`` must equal ``(v', β·o + c·neuron_output(v'))`` with
    ``v' = neuron_step(input_layer(x_t), v, neuron_parameters())``, where ``neuron_step`` is element-wise in
    ``pre``, ``v`` and each per-neuron parameter (shape ``[H]``), and ``neuron_output`` is element-wise.
    Attributes: ``input_layer`` (``nn.Linear``), ``output_decay`` (β), ``output_scale`` (c). Every trainable
    parameter of the cell must be ``input_layer``'s or listed by ``neuron_parameters()``. The model's
    ``readout(state)`` must read ``o`` only.
    """

    input_layer: nn.Linear
    output_decay: float
    output_scale: float

    def neuron_parameters(self) -> dict[str, Tensor]: ...

    def neuron_step(self, pre: Tensor, v: Tensor, params: dict[str, Tensor]) -> Tensor: ...

    def neuron_output(self, v: Tensor) -> Tensor: ...


def check_sequence_model(where: str, model: object) -> None:
    """Raise ``TypeError`` naming what ``model`` lacks of :class:`SequenceModel`."""
    missing = [a for a in ("cell", "init_state", "readout", "to_sequence") if not hasattr(model, a)]
    if missing or not isinstance(model.cell, nn.Module):  # type: ignore[attr-defined]
        what = f"lacks {missing}" if missing else "has a cell that is not an nn.Module"
        raise TypeError(
            f"{where}: model {type(model).__name__} {what}; a sequence model exposes cell (an nn.Module called "
            "as cell(x_t, state)), init_state(batch, like), readout(state) and to_sequence(x) "
            "(see fwdgrad.derivatives.through_time.SequenceModel)"
        )


def check_diagonal_model(where: str, model: object) -> None:
    """Raise ``TypeError`` unless ``model`` is a :class:`SequenceModel` whose cell is a :class:`DiagonalCell`."""
    check_sequence_model(where, model)
    cell = model.cell  # type: ignore[attr-defined]
    missing = [
        a
        for a in ("input_layer", "output_decay", "output_scale", "neuron_parameters", "neuron_step", "neuron_output")
        if not hasattr(cell, a)
    ]
    if missing or not isinstance(getattr(cell, "input_layer", None), nn.Linear):
        raise TypeError(
            f"{where}: model {type(model).__name__} has no diagonal recurrence (its cell "
            f"{type(cell).__name__} lacks {missing or ['an nn.Linear input_layer']}); forward-exact needs a cell "
            "with element-wise recurrence (see fwdgrad.derivatives.through_time.DiagonalCell), e.g. model 'lif'"
        )


def check_window(where: str, window: object, name: str = "window") -> int | None:
    """``window`` as an int >= 1, or ``None`` (the whole sequence); anything else raises ``ValueError``."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{where}: {name} must be an int >= 1 or None (whole sequence), got {window!r}")
    return window


def last_window_start(steps: int, window: int | None) -> int:
    """The first step of the last window when windows start at ``0, window, 2·window, ...``.

    Example:
        >>> last_window_start(28, 10), last_window_start(28, None), last_window_start(30, 10)
        (20, 0, 20)
    """
    return 0 if window is None or window >= steps else window * ((steps - 1) // window)


def _map_state(fn: Callable[[Tensor], Tensor], state: State) -> State:
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def _primal(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


def as_sequence(where: str, model: Any, x: Tensor) -> Tensor:
    seq = model.to_sequence(x)
    if not isinstance(seq, Tensor) or seq.dim() != 3 or seq.shape[1] < 1:
        shape = tuple(seq.shape) if isinstance(seq, Tensor) else type(seq).__name__
        raise ValueError(f"{where}: {type(model).__name__}.to_sequence must return [B, T, F] with T >= 1, got {shape}")
    return seq


def run_sequence(model: Any, x: Tensor, *, window: int | None = None, truncate: bool = False) -> Tensor:
    """``model.readout`` of the final state after running ``model.cell`` over ``model.to_sequence(x)``.

    Args:
        model: a :class:`SequenceModel`.
        x: the model's input; ``to_sequence`` turns it into ``[B, T, F]``.
        window: windows start at steps ``0, window, 2·window, ...``; at each start the state drops its
            forward-mode tangent (see the module docstring). ``None``: one window.
        truncate: run the steps before the last window without recording autograd history, so that a
            backward from the output is truncated BPTT over the last window (memory ∝ ``window``).

    Returns:
        ``model.readout(state_T)``.
    """
    where = "fwdgrad.derivatives.through_time.run_sequence"
    check_window(where, window)
    seq = as_sequence(where, model, x)
    batch, steps, _ = seq.shape
    state = model.init_state(batch, seq)
    start = last_window_start(steps, window) if truncate else 0
    for t in range(steps):
        if window is not None and t > 0 and t % window == 0:
            state = _map_state(_primal, state)
        if t < start:
            with torch.no_grad():
                state = model.cell(seq[:, t], state)
        else:
            if t == start and start > 0:
                state = _map_state(torch.Tensor.detach, state)
            state = model.cell(seq[:, t], state)
    return model.readout(state)


class WindowedSequence(nn.Module):
    """``model`` run through :func:`run_sequence` with a window: ``WindowedSequence(m, 7)(x)``.

    Wraps a :class:`SequenceModel` so that an ordinary loss ``loss_fn(m) = F.cross_entropy(m(x), y)`` sees the
    windowed run: under forward AD the output's tangent is the derivative through the last window (online
    forward mode, loss at the end); with ``truncate=True`` a backward is truncated BPTT.
    """

    def __init__(self, model: nn.Module, window: int | None = None, *, truncate: bool = False) -> None:
        super().__init__()
        check_sequence_model("fwdgrad.derivatives.through_time.WindowedSequence", model)
        self.model = model
        self.window = check_window("fwdgrad.derivatives.through_time.WindowedSequence", window)
        self.truncate = bool(truncate)

    def forward(self, x: Tensor) -> Tensor:
        return run_sequence(self.model, x, window=self.window, truncate=self.truncate)


# --- online forward mode ------------------------------------------------------------------------------------
@dataclass
class OnlineResult:
    """What :func:`online_forward_gradient` returns.

    Attributes:
        loss: the sum of all step losses (detached scalar).
        estimate: ``{name: Σ_k d_k·v_k}`` over the windows (with updates between windows, the sum of what
            was handed to ``on_window``).
        window_losses: ``[K]`` each window's summed loss.
        derivatives: ``[K]`` each window's directional derivative ``d_k``.
    """

    loss: Tensor
    estimate: dict[str, Tensor]
    window_losses: Tensor
    derivatives: Tensor
    windows: list[tuple[int, int]] = field(default_factory=list)


class _WindowRunner(nn.Module):
    def __init__(self, model: nn.Module, step_loss: Callable[[int, State], Tensor | None]) -> None:
        super().__init__()
        self.model = model
        self.step_loss = step_loss

    def forward(self, seq: Tensor, state: State, start: int, stop: int) -> tuple[State, Tensor | None]:
        total: Tensor | None = None
        for t in range(start, stop):
            state = self.model.cell(seq[:, t], state)
            loss = self.step_loss(t, state)
            if loss is not None:
                total = loss if total is None else total + loss
        return state, total


class _Stateful:
    """A stateful source of :mod:`fwdgrad.directions` (``init``/``update``/``guess``, e.g.
    ``fwdgrad.directions.stateful.MomentumDirections``) as a window's direction: ``v = ε + √n·u`` with
    ``ε ~ N(0, I)`` and ``u`` the source's unit guess (``v = ε`` while it has none), so that the guess weighs
    like a typical Gaussian direction; the source sees each window's estimate. Silver et al. 2022's momentum
    candidate. ``⟨∇L, v⟩ v`` is then a descent direction biased towards the guess, not an unbiased gradient."""

    def __init__(self, source: Any) -> None:
        self.source, self.state = source, None

    def __call__(self, like: list[Tensor], generator: torch.Generator | None) -> list[Tensor]:
        if self.state is None:
            self.state = self.source.init(like)
        noise = [t[0] for t in sample_tangents("gaussian", like, 1, generator)]
        guess = self.source.guess(self.state)
        if guess is None:
            return noise
        n = math.sqrt(sum(p.numel() for p in like))
        return [e + n * u for e, u in zip(noise, guess)]

    def update(self, estimate: list[Tensor]) -> None:
        self.state = self.source.update(self.state, estimate)


def _directions(
    where: str, source: str | DirectionSource, like: list[Tensor], generator: torch.Generator | None
) -> list[Tensor]:
    if isinstance(source, str):
        return [t[0] for t in sample_tangents(source, like, 1, generator)]
    out = list(source(like, generator))
    if len(out) != len(like) or any(v.shape != p.shape for v, p in zip(out, like)):
        raise ValueError(f"{where}: the direction source returned tensors that do not match the parameters' shapes")
    return out


def online_forward_gradient(
    model: nn.Module,
    x: Tensor,
    step_loss: Callable[[int, State], Tensor | None],
    *,
    window: int | None = None,
    directions: str | DirectionSource = "gaussian",
    generator: torch.Generator | None = None,
    on_window: Callable[[int, Tensor, dict[str, Tensor]], None] | None = None,
) -> OnlineResult:
    """Online forward mode through time (Silver et al. 2022): one direction per window, tangents with the state.

    For windows ``[0, w), [w, 2w), ...`` (``w = window``, ``None``: the whole sequence), draws ``v_k`` from
    ``directions``, runs the window's steps with every trainable parameter a dual tensor ``(θ, v_k)`` (under
    ``torch.autograd.forward_ad``, no autograd graph), sums ``ℓ_t = step_loss(t, state_t)`` and its tangent
    ``d_k = ⟨∇ Σ_t ℓ_t, v_k⟩`` (through the states of this window; the state enters the window without
    tangent), and hands ``d_k·v_k`` to ``on_window``. Memory does not depend on ``T``.

    Args:
        model: a :class:`SequenceModel`.
        x: its input (``model.to_sequence(x)`` is ``[B, T, F]``).
        step_loss: ``step_loss(t, state_t)`` → scalar loss at step ``t`` or ``None`` (no loss at that step).
        window: steps per window (int >= 1) or ``None``.
        directions: a sampler name (``"gaussian"``, ``"rademacher"``, ...; see ``fwdgrad.directions.SAMPLERS``),
            a callable ``source(params: list[Tensor], generator) -> list[Tensor]`` (one with an
            ``update(estimate: list[Tensor])`` method sees each window's estimate), or a stateful source of
            :mod:`fwdgrad.directions` with ``init``/``update``/``guess`` such as
            ``fwdgrad.directions.stateful.MomentumDirections``: the window's direction is then Gaussian noise
            plus ``√n`` times its unit guess (see :class:`_Stateful`).
        generator: the randomness of the directions.
        on_window: ``on_window(k, window_loss, {name: d_k·v_k})`` after each window, e.g. to write ``.grad``
            and step an optimizer: the next window then uses the updated parameters (online learning).

    Returns:
        :class:`OnlineResult`.
    """
    where = "fwdgrad.derivatives.through_time.online_forward_gradient"
    check_sequence_model(where, model)
    window = check_window(where, window)
    if isinstance(directions, str):
        check_sampler_name(where, directions)
    elif all(hasattr(directions, a) for a in ("init", "update", "guess")):
        directions = _Stateful(directions)
    elif not callable(directions):
        raise TypeError(f"{where}: directions must be a sampler name or a callable, got {type(directions).__name__}")
    if not callable(step_loss):
        raise TypeError(f"{where}: step_loss must be callable, got {type(step_loss).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{where}: model {type(model).__name__} has no parameter with requires_grad=True")
    runner = _WindowRunner(model, step_loss)
    with torch.no_grad():
        seq = as_sequence(where, model, x)
        batch, steps, _ = seq.shape
        state = _map_state(torch.Tensor.detach, model.init_state(batch, seq))
        width = steps if window is None else window
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        losses, derivs, bounds = [], [], []
        for k, start in enumerate(range(0, steps, width)):
            stop = min(start + width, steps)
            primals = [p.detach() for p in params.values()]
            vs = _directions(where, directions, primals, generator)
            with fwAD.dual_level():
                duals = {"model." + n: fwAD.make_dual(p, v) for n, p, v in zip(params, primals, vs)}
                state, loss = functional_call_once(runner, duals, (seq, state, start, stop))
                state = _map_state(lambda s: _primal(s).clone(), state)
                if loss is None:
                    loss_p, deriv = seq.new_zeros(()), seq.new_zeros(())
                else:
                    unpacked = fwAD.unpack_dual(loss)
                    loss_p = unpacked.primal.clone()
                    deriv = unpacked.tangent if unpacked.tangent is not None else torch.zeros_like(loss_p)
                    deriv = deriv.clone()
            estimate = {n: deriv * v for n, v in zip(params, vs)}
            for n in params:
                total[n].add_(estimate[n])
            if hasattr(directions, "update"):
                directions.update(list(estimate.values()))  # type: ignore[union-attr]
            losses.append(loss_p)
            derivs.append(deriv)
            bounds.append((start, stop))
            if on_window is not None:
                on_window(k, loss_p, estimate)
    window_losses = torch.stack(losses)
    return OnlineResult(window_losses.sum(), total, window_losses, torch.stack(derivs), bounds)
