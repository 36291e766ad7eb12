"""The exact gradient of a diagonal recurrence, propagated forward in time (memory independent of T).

**Exact forward-propagated gradient for diagonal recurrences** (the e-prop / HYPR setting: Bellec et al.
2020; Baronig et al. 2025, "A scalable hybrid training approach for recurrent spiking neural networks").
For a layer ``pre_t = W x_t + b``, ``v_t = f(pre_t, v_{t−1}; a)`` element-wise in ``(pre, v, a)``,
``s_t = g(v_t)`` element-wise, ``o_t = β o_{t−1} + c s_t`` and logits ``= R(o_T)``, the Jacobian
``∂v_t/∂v_{t−1} = diag(A_t)`` is diagonal, so the sensitivity of neuron ``i`` to ``W_ij`` is a trace of the
size of ``W`` per example:

``E_t[b,i,j] = A_t[b,i]·E_{t−1}[b,i,j] + P_t[b,i]·x_t[b,j]``  (``P_t = ∂f/∂pre``),
``O_t[b,i,j] = β·O_{t−1}[b,i,j] + c·G_t[b,i]·E_t[b,i,j]``   (``G_t = g'(v_t)``),
``∂L/∂W_ij = Σ_b (∂L/∂o_T)[b,i]·O_T[b,i,j]``,

and likewise for ``b`` (trace ``[B, H]``) and each per-neuron parameter ``a`` (trace ``[B, H]``). The
diagonals ``A_t, P_t, ∂f/∂a, G_t`` come from a local reverse pass through one step's element-wise maps
(the gradient of ``Σ f`` of an element-wise ``f`` is its Jacobian's diagonal); nothing spans two steps. This is
the exact gradient (RTRL restricted to a diagonal recurrence), O(parameters) per example and step, memory
independent of ``T``. ``∂L/∂o_T`` and the readout's gradient come from a *local* backward through ``R``
and the loss only, never through time.

The **subsequence-parallel variant** (``chunk=C``, HYPR's hybrid scheme): the cheap state recursion runs
step by step over a subsequence of ``C`` steps storing the diagonals ``[C, B, H]``; two backward
recursions over those diagonals give the weights ``q_s = Π_{r>s} A_r`` and
``w_s = β^{C−1−s}G_s + A_{s+1}w_{s+1}``, and the whole subsequence's contribution to the traces is one
batched matrix product over time, ``Σ_s (w_s P_s) ⊗ x_s``:
``E_out = (A_0 q_0) E_in + Σ_s (q_s P_s) ⊗ x_s``, ``O_out = β^C O_in + c[(A_0 w_0) E_in + Σ_s (w_s P_s) ⊗ x_s]``.
Same gradient to rounding; memory grows with ``C``, not ``T``.

The model follows the sequence protocol of :mod:`fwdgrad.derivatives.through_time` with a
:class:`~fwdgrad.derivatives.through_time.DiagonalCell` as its ``cell`` (e.g. the spiking models of
:mod:`fwdgrad.models.spiking`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fwdgrad.derivatives.through_time import as_sequence, check_diagonal_model, check_window

Tensor = torch.Tensor

__all__ = ["forward_exact_gradient"]


# --- exact forward-propagated gradient for diagonal recurrences ---------------------------------------------
@dataclass
class _Traces:
    weight: Tensor  # O-trace [B, H, F]
    bias: Tensor  # [B, H]
    neuron: dict[str, Tensor]  # name -> [B, H]
    e_weight: Tensor  # E-trace [B, H, F]
    e_bias: Tensor
    e_neuron: dict[str, Tensor]

    @classmethod
    def zeros(cls, seq: Tensor, hidden: int, neuron: dict[str, Tensor]) -> _Traces:
        """All traces zero for a ``[B, T, F]`` input sequence and ``hidden`` neurons."""
        batch, feats = seq.shape[0], seq.shape[2]
        return cls(
            seq.new_zeros(batch, hidden, feats), seq.new_zeros(batch, hidden),
            {n: seq.new_zeros(batch, hidden) for n in neuron},
            seq.new_zeros(batch, hidden, feats), seq.new_zeros(batch, hidden),
            {n: seq.new_zeros(batch, hidden) for n in neuron},
        )  # fmt: skip


def _cell_pieces(where: str, cell: Any) -> tuple[Tensor, Tensor | None, dict[str, Tensor], float, float]:
    lin = cell.input_layer
    neuron = dict(cell.neuron_parameters())
    hidden = lin.weight.shape[0]
    for n, a in neuron.items():
        if a.shape != (hidden,):
            raise ValueError(f"{where}: neuron parameter {n!r} must have shape [{hidden}], got {tuple(a.shape)}")
    return lin.weight, lin.bias, neuron, float(cell.output_decay), float(cell.output_scale)


def _step_diagonals(
    cell: Any, pre: Tensor, v: Tensor, neuron: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor, Tensor]:
    """One step: ``(v', A, P, {name: ∂f/∂a}, s, G)``.

    The diagonals come from a local reverse pass through this step's element-wise maps only: for an
    element-wise ``f`` the gradient of ``Σ f`` is the diagonal of its Jacobian (per-neuron parameters are
    broadcast to ``[B, H]`` first, so that their diagonal is per example). A reverse pass costs less here than
    forward-mode JVPs, whose mixed dual/non-dual element-wise ops are slow on CPU in torch 2.13.
    """
    batch = pre.shape[0]
    with torch.enable_grad():
        v_in, pre_in = v.detach().requires_grad_(), pre.detach().requires_grad_()
        a_in = {n: a.detach().expand(batch, -1).clone().requires_grad_() for n, a in neuron.items()}
        v_new = cell.neuron_step(pre_in, v_in, a_in)
        wrt = [v_in, pre_in, *a_in.values()]
        diags = torch.autograd.grad(v_new.sum(), wrt, allow_unused=True)
        a_d, p_d, *q_list = (torch.zeros_like(t) if d is None else d for t, d in zip(wrt, diags))
        v_out = v_new.detach().requires_grad_()
        s = cell.neuron_output(v_out)
        (g_d,) = torch.autograd.grad(s.sum(), v_out, allow_unused=True)
    g_d = torch.zeros_like(v_out) if g_d is None else g_d
    return v_new.detach(), a_d, p_d, dict(zip(a_in, q_list)), s.detach(), g_d


def _traces_sequential(cell: Any, seq: Tensor, v: Tensor, o: Tensor) -> tuple[Tensor, Tensor, _Traces]:
    weight, bias, neuron, beta, c = _cell_pieces("forward_exact_gradient", cell)
    tr = _Traces.zeros(seq, weight.shape[0], neuron)
    for t in range(seq.shape[1]):
        x_t = seq[:, t]
        pre = torch.nn.functional.linear(x_t, weight, bias)
        v, a_d, p_d, q_d, s, g_d = _step_diagonals(cell, pre, v, neuron)
        tr.e_weight.mul_(a_d[..., None]).addcmul_(p_d[..., None], x_t[:, None, :])  # in place: no [B, H, F] temporaries
        tr.e_bias.mul_(a_d).add_(p_d)
        for n in neuron:
            tr.e_neuron[n].mul_(a_d).add_(q_d[n])
        gc = c * g_d
        if beta != 1.0:
            tr.weight.mul_(beta)
        tr.weight.addcmul_(gc[..., None], tr.e_weight)
        tr.bias.mul_(beta).add_(gc * tr.e_bias)
        for n in neuron:
            tr.neuron[n].mul_(beta).add_(gc * tr.e_neuron[n])
        o = beta * o + c * s
    return v, o, tr


def _traces_chunked(cell: Any, seq: Tensor, v: Tensor, o: Tensor, chunk: int) -> tuple[Tensor, Tensor, _Traces]:
    weight, bias, neuron, beta, c = _cell_pieces("forward_exact_gradient", cell)
    tr = _Traces.zeros(seq, weight.shape[0], neuron)
    for start in range(0, seq.shape[1], chunk):
        xs = seq[:, start : start + chunk].transpose(0, 1)  # [C, B, F]
        length = xs.shape[0]
        a_s, p_s, g_s, q_s = [], [], [], {n: [] for n in neuron}
        for t in range(length):  # the cheap state recursion, O(B·H) per step
            pre = torch.nn.functional.linear(xs[t], weight, bias)
            v, a_d, p_d, q_d, s, g_d = _step_diagonals(cell, pre, v, neuron)
            a_s.append(a_d)
            p_s.append(p_d)
            g_s.append(g_d)
            for n in neuron:
                q_s[n].append(q_d[n])
            o = beta * o + c * s
        # backward recursions over the stored diagonals: q_s = Π_{r>s} A_r, w_s = β^{C-1-s} G_s + A_{s+1} w_{s+1}
        q = [torch.ones_like(a_s[0])] * length
        w = [g_s[-1]] * length
        for s in range(length - 2, -1, -1):
            q[s] = a_s[s + 1] * q[s + 1]
            w[s] = beta ** (length - 1 - s) * g_s[s] + a_s[s + 1] * w[s + 1]
        qq, ww, pp = torch.stack(q), torch.stack(w), torch.stack(p_s)  # [C, B, H]
        carry_e, carry_o = a_s[0] * qq[0], c * a_s[0] * ww[0]  # coefficients of the incoming E-trace
        decay = beta**length
        # the parallel part: one batched product over the subsequence's time steps
        tr.weight = decay * tr.weight + carry_o[..., None] * tr.e_weight + c * torch.einsum("sbi,sbj->bij", ww * pp, xs)
        tr.e_weight = carry_e[..., None] * tr.e_weight + torch.einsum("sbi,sbj->bij", qq * pp, xs)
        tr.bias = decay * tr.bias + carry_o * tr.e_bias + c * (ww * pp).sum(0)
        tr.e_bias = carry_e * tr.e_bias + (qq * pp).sum(0)
        for n in neuron:
            qn = torch.stack(q_s[n])
            tr.neuron[n] = decay * tr.neuron[n] + carry_o * tr.e_neuron[n] + c * (ww * qn).sum(0)
            tr.e_neuron[n] = carry_e * tr.e_neuron[n] + (qq * qn).sum(0)
    return v, o, tr


class _ExactRun(nn.Module):
    """Stands in for the model inside ``loss_fn``: computes the traces, returns ``readout((v_T, o_leaf))``."""

    def __init__(self, model: nn.Module, chunk: int | None) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.result: tuple[Tensor, Tensor, _Traces] | None = None

    def forward(self, x: Tensor) -> Tensor:
        where = "fwdgrad.derivatives.diagonal_recurrence.forward_exact_gradient"
        if self.result is not None:
            raise ValueError(f"{where}: loss_fn called the model more than once; it must call it once")
        model = self.model
        with torch.no_grad():
            seq = as_sequence(where, model, x)
            state = model.init_state(seq.shape[0], seq)
            if not (isinstance(state, tuple) and len(state) == 2):
                raise ValueError(f"{where}: a diagonal model's state must be (v, o), got {type(state).__name__}")
            v, o = (s.detach() for s in state)
            if self.chunk is None:
                v, o, tr = _traces_sequential(model.cell, seq, v, o)
            else:
                v, o, tr = _traces_chunked(model.cell, seq, v, o, self.chunk)
        v_leaf, o_leaf = v.requires_grad_(), o.requires_grad_()
        self.result = (v_leaf, o_leaf, tr)
        return model.readout((v_leaf, o_leaf))


def forward_exact_gradient(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], *, chunk: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The exact gradient of ``loss_fn(model)`` for a model with diagonal recurrence, propagated forward in time.

    Math, shapes and the subsequence-parallel variant in the module docstring (HYPR, Baronig et al. 2025).
    ``loss_fn(m)`` must call ``m(x)`` once (e.g. ``F.cross_entropy(m(x), y)``); it is run on a stand-in that
    computes the traces forward and returns the readout. The only backward is local: through ``readout`` and
    the loss, to get ``∂L/∂o_T`` and the readout's gradient.

    Args:
        model: a :class:`SequenceModel` whose ``cell`` is a :class:`DiagonalCell`.
        loss_fn: ``loss_fn(model) -> scalar``.
        chunk: ``None`` for the step-by-step trace update; an int ``C >= 1`` for the subsequence-parallel
            variant over subsequences of ``C`` steps.

    Returns:
        ``(loss, {name: gradient})`` for every trainable parameter.
    """
    where = "fwdgrad.derivatives.diagonal_recurrence.forward_exact_gradient"
    check_diagonal_model(where, model)
    chunk = check_window(where, chunk, "chunk")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cell = model.cell  # type: ignore[attr-defined]
    lin = cell.input_layer
    neuron = dict(cell.neuron_parameters())
    cell_ids = {id(p) for p in cell.parameters()}
    role: dict[int, tuple[str, str]] = {id(lin.weight): ("weight", "")}
    if lin.bias is not None:
        role[id(lin.bias)] = ("bias", "")
    for n, a in neuron.items():
        role[id(a)] = ("neuron", n)
    stray = [n for n, p in params.items() if id(p) in cell_ids and id(p) not in role]
    if stray:
        raise ValueError(
            f"{where}: parameters {stray} of the cell are neither input_layer's nor listed by neuron_parameters()"
        )
    run = _ExactRun(model, chunk)
    with torch.enable_grad():
        loss = loss_fn(run)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"{where}: loss_fn must return a scalar tensor")
        if run.result is None:
            raise ValueError(f"{where}: loss_fn never called the model")
        v_leaf, o_leaf, tr = run.result
        readout = [n for n, p in params.items() if id(p) not in cell_ids]
        grads = torch.autograd.grad(loss, [o_leaf, v_leaf, *(params[n] for n in readout)], allow_unused=True)
    g_o, g_v = grads[0], grads[1]
    if g_v is not None and bool((g_v != 0).any()):
        raise ValueError(f"{where}: {type(model).__name__}.readout reads v; a diagonal model's readout reads o only")
    if g_o is None:
        g_o = torch.zeros_like(o_leaf)
    out: dict[str, Tensor] = {}
    for n, g in zip(readout, grads[2:]):
        out[n] = torch.zeros_like(params[n]) if g is None else g
    for n, p in params.items():
        if n in out:
            continue
        kind, sub = role[id(p)]
        if kind == "weight":
            out[n] = torch.einsum("bi,bij->ij", g_o, tr.weight).to(p.dtype)
        elif kind == "bias":
            out[n] = (g_o * tr.bias).sum(0).to(p.dtype)
        else:
            out[n] = (g_o * tr.neuron[sub]).sum(0).to(p.dtype)
    return loss.detach(), out
