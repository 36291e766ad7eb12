r"""Whole-module forward-mode rules for transformers: ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``.

**nn.MultiheadAttention**: primal and tangent of one call, on the math path.

``nn.MultiheadAttention`` reads its output projection's parameters inside
``F.multi_head_attention_forward``, never calling ``out_proj``; the per-module passes of
:mod:`fwdgrad.derivatives` would see ``out_proj.weight`` used outside its module and fall back to the
reference path, which draws a model-sized tangent. This rule (a :class:`~fwdgrad.derivatives.rules.ModuleRule`)
computes the call with the module's own tensors (``in_proj_weight`` or ``q/k/v_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``) and ``out_proj``'s, each tensor's tangent drawn from the step's
source as the module runs. Per head, with scale :math:`c = 1/\sqrt{d}` and the additive mask :math:`M`
(``attn_mask``, ``key_padding_mask`` or the causal mask, ``-inf`` where attention is not allowed):

.. math::

    Q &= X_q W_q^\top + b_q, \qquad Q_t = X_{q,t} W_q^\top + X_q W_{q,t}^\top + b_{q,t}
    \quad\text{(and } K, V\text{; } K, V \text{ get } b_k, b_v \text{ rows and zero rows when asked)}\\
    S &= c\,Q K^\top + M, \qquad S_t = c\,(Q_t K^\top + Q K_t^\top)\\
    P &= \operatorname{softmax}(S), \qquad P_t = P \odot \big(S_t - (P \odot S_t)\mathbf 1\,\mathbf 1^\top\big)\\
    O &= P V, \qquad O_t = P_t V + P V_t\\
    Y &= O W_o^\top + b_o, \qquad Y_t = O_t W_o^\top + O W_{o,t}^\top + b_{o,t}

(the attention weights returned with ``need_weights=True`` are :math:`P` and :math:`P_t`, averaged over the
heads with ``average_attn_weights``). This is PyTorch's math path (``need_weights=True``: ``softmax``;
``need_weights=False``: SDPA's math backend, whose softmax gives a zero row where every key is masked), so
the primal equals the module's output up to rounding; no fused kernel is involved, so none needs a
forward-AD rule. ``batch_first``, unbatched inputs, self- and cross-attention, ``kdim``/``vdim``, boolean and
float masks and ``is_causal`` follow ``F.multi_head_attention_forward`` exactly. Calls the rule does not
describe run the module's own forward with dual parameters instead (``None`` from :func:`mha_jvp`): dropout
in training mode, a mask carrying a tangent, masks of mixed kinds, inputs of a dtype other than the
parameters', nested tensors, shapes the module would refuse.

**nn.TransformerEncoderLayer** (:func:`encoder_layer_jvp`): the layer's own forward, its children called as
modules, with the feed-forward activation's tangent formed before its output (the same kernels as PyTorch's
forward AD, bit for bit) so that the layer's largest tensors, ``linear1``'s output and tangent and the
activation's output and tangent, are never all alive at once: three hidden-sized buffers at the peak, not four.

Example:
    >>> import torch
    >>> import torch.autograd.forward_ad as fwAD
    >>> from fwdgrad.derivatives.transformer import mha_jvp
    >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
    >>> x = torch.randn(2, 3, 4, dtype=torch.float64)
    >>> values = {n: (p.detach(), None) for n, p in mha.named_parameters()}
    >>> with torch.no_grad(), fwAD.dual_level():
    ...     y, w = mha_jvp(mha, (x, x, x), {}, values)
    >>> bool(torch.allclose(y, mha(x, x, x)[0]))
    True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fwdgrad.derivatives.rules import ModuleRule, register_module_rule

Tensor = torch.Tensor

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_OWN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")


def _parameters(m: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    names = {n: (m, n) for n in _OWN if m._parameters.get(n) is not None}
    for n in ("weight", "bias"):
        if m.out_proj._parameters.get(n) is not None:
            names["out_proj." + n] = (m.out_proj, n)
    return names


def _eligible(m: nn.Module) -> bool:
    # out_proj is read, never called: its type and parameters must be the plain ones (no parametrization)
    out = m.out_proj
    return type(out) in (NonDynamicallyQuantizableLinear, nn.Linear) and "weight" in out._parameters


# -- tangents as rank-1 factors or dense tensors ----------------------------------------------------------


def _rows(w_t: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a matrix tangent (rank-1 ``(u, v)``: rows of ``u``)."""
    if w_t is None:
        return None
    if isinstance(w_t, tuple):
        return w_t[0][start:stop], w_t[1]
    return w_t[start:stop]


def _dense(t: Any, like: Tensor) -> Tensor | None:
    if isinstance(t, tuple):
        return torch.outer(*t).view(like.shape)
    return t


def _linear_tangent(x: Tensor, x_t: Tensor | None, w: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor | None:
    """Tangent of ``F.linear(x, w, b)``: ``x_t wᵀ + x w_tᵀ + b_t`` (``None`` when all three are zero)."""
    t = None if x_t is None else F.linear(x_t, w)
    if w_t is not None:
        if isinstance(w_t, tuple):  # x (u vᵀ)ᵀ = (x v) uᵀ
            u, v = w_t
            term = (x @ v).unsqueeze(-1) * u
        else:
            term = F.linear(x, w_t)
        t = term if t is None else t.add_(term)
    if b_t is not None:
        t = b_t.expand(*x.shape[:-1], b_t.shape[-1]).clone() if t is None else t.add_(b_t)
    return t


def _cat(a: Tensor, a_t: Tensor | None, b: Tensor, b_t: Tensor | None, dim: int) -> tuple[Tensor, Tensor | None]:
    if a_t is None and b_t is None:
        return torch.cat([a, b], dim), None
    a_t = torch.zeros_like(a) if a_t is None else a_t
    b_t = torch.zeros_like(b) if b_t is None else b_t
    return torch.cat([a, b], dim), torch.cat([a_t, b_t], dim)


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive float mask PyTorch makes of it (``-inf`` where ``True``)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _plain(x: Any) -> tuple[Any, Tensor | None]:
    if isinstance(x, Tensor):
        p, t = fwAD.unpack_dual(x)
        return p, t
    return x, None


# -- the rule ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One ``nn.MultiheadAttention`` call the rule describes: inputs and their tangents as ``[N, L, E]`` /
    ``[N, S, kdim]`` / ``[N, S, vdim]`` views, the masks as additive float masks (``key_padding_mask``
    ``[N, S]``, ``attn_mask`` ``[1 or N·H, L, S]``), and the flags of the call."""

    x: tuple[Tensor, Tensor, Tensor]
    x_t: tuple[Tensor | None, Tensor | None, Tensor | None]
    kpm: Tensor | None
    attn_mask: Tensor | None
    causal: bool
    batched: bool
    need_weights: bool
    average: bool


def _call_masks(a: dict[str, Any], dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None] | None:
    """``(key_padding_mask, attn_mask)`` as primal tensors, or ``None`` where the rule does not describe them:
    a mask with a tangent (a learned mask: its tangent would be lost), a float mask of another dtype, masks of
    mixed kinds (PyTorch warns and converts; not reproduced), ``is_causal`` without a mask (PyTorch raises)."""
    masks = []
    for mask in (a["key_padding_mask"], a["attn_mask"]):
        if mask is not None:
            if not isinstance(mask, Tensor) or fwAD.unpack_dual(mask).tangent is not None:
                return None
            mask = fwAD.unpack_dual(mask).primal
            if mask.dtype != torch.bool and mask.dtype != dtype:
                return None
        masks.append(mask)
    kpm, attn_mask = masks
    if kpm is not None and attn_mask is not None and (kpm.dtype == torch.bool) != (attn_mask.dtype == torch.bool):
        return None
    if a["is_causal"] and attn_mask is None:
        return None
    return kpm, attn_mask


def _bind_call(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype) -> _Call | None:
    """The call ``m(*args, **kwargs)`` in the rule's layout, or ``None`` for a call it does not describe
    (dropout in training mode, nested or mistyped inputs, masks as in :func:`_call_masks`, shapes the module
    would refuse)."""
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    need_weights, average, is_causal = a["need_weights"], a["average_attn_weights"], a["is_causal"]
    if not all(isinstance(x, Tensor) and not x.is_nested for x in (a["query"], a["key"], a["value"])):
        return None
    if m.training and m.dropout > 0.0:  # the RNG draw of the math path is not reproduced here
        return None
    if not all(isinstance(f, bool) for f in (need_weights, average, is_causal)):
        return None
    (xq, xq_t), (xk, xk_t), (xv, xv_t) = _plain(a["query"]), _plain(a["key"]), _plain(a["value"])
    masks = _call_masks(a, dtype) if xq.dtype == xk.dtype == xv.dtype == dtype else None
    if masks is None:
        return None
    batched = xq.dim() == 3
    if xq.dim() not in (2, 3) or xk.dim() != xq.dim() or xv.dim() != xq.dim():
        return None

    def to_nle(x: Tensor | None) -> Tensor | None:  # [N, L, E] views
        if x is None:
            return None
        if not batched:
            return x.unsqueeze(0)
        return x if m.batch_first else x.transpose(0, 1)

    xq, xq_t, xk, xk_t, xv, xv_t = (to_nle(x) for x in (xq, xq_t, xk, xk_t, xv, xv_t))
    kpm, attn_mask = _shaped_masks(m, masks, batched, xq.shape, xk.shape[1], dtype)
    if kpm is False or _refused_shapes(m, xq, xk, xv):
        return None
    causal = is_causal and kpm is None and not need_weights  # PyTorch then drops attn_mask for SDPA's own
    return _Call((xq, xk, xv), (xq_t, xk_t, xv_t), kpm, None if causal else attn_mask, causal, batched,
                 need_weights, average)


def _refused_shapes(m: nn.Module, xq: Tensor, xk: Tensor, xv: Tensor) -> bool:
    """Whether the inputs' shapes are ones ``m`` would refuse (embedding sizes, batch sizes)."""
    if xq.shape[2] != m.embed_dim or xk.shape[0] != xq.shape[0] or xv.shape[:2] != xk.shape[:2]:
        return True
    return xk.shape[2] != m.kdim or xv.shape[2] != m.vdim or (m._qkv_same_embed_dim and xk.shape != xv.shape)


def _shaped_masks(
    m: nn.Module, masks: tuple[Tensor | None, Tensor | None], batched: bool, q_shape: torch.Size, src: int,
    dtype: torch.dtype,
) -> tuple[Any, Tensor | None]:
    """The masks as additive float masks in the rule's shapes: ``key_padding_mask`` ``[N, S]``, ``attn_mask``
    ``[1 or N·H, L, S]``; ``(False, None)`` where a mask's shape is one the module would refuse."""
    kpm, attn_mask = masks
    n, tgt, _ = q_shape
    if kpm is not None:
        if kpm.dim() != (2 if batched else 1):
            return False, None
        kpm = kpm if batched else kpm.unsqueeze(0)
        if kpm.shape != (n, src):
            return False, None
        kpm = _float_mask(kpm, dtype)
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape == (tgt, src):
            attn_mask = attn_mask.unsqueeze(0)
        elif not (attn_mask.dim() == 3 and attn_mask.shape == (n * m.num_heads, tgt, src)):
            return False, None
        attn_mask = _float_mask(attn_mask, dtype)
    return kpm, attn_mask


def _in_projections(
    m: nn.Module, call: _Call, values: dict[str, tuple[Any, Any]]
) -> list[tuple[Tensor, Tensor | None]]:
    """``[(Q, Q_t), (K, K_t), (V, V_t)]``, each ``[N, ·, E]``: the inputs through the module's in-projections.
    (PyTorch projects self-attention inputs with one packed matmul: the same values, rounding aside.)"""
    e = m.embed_dim
    b_in, b_in_t = values.get("in_proj_bias", (None, None))
    biases = [(None, None)] * 3 if b_in is None else [
        (b_in[i * e:(i + 1) * e], None if b_in_t is None else b_in_t[i * e:(i + 1) * e]) for i in range(3)
    ]
    if m._qkv_same_embed_dim:
        w_in, w_in_t = values.get("in_proj_weight", (None, None))
        weights = [(w_in[i * e:(i + 1) * e], _rows(w_in_t, i * e, (i + 1) * e)) for i in range(3)]
    else:
        weights = [values.get(f"{c}_proj_weight", (None, None)) for c in "qkv"]
    return [(F.linear(x, w, b), _linear_tangent(x, x_t, w, w_t, b_t))
            for x, x_t, (w, w_t), (b, b_t) in zip(call.x, call.x_t, weights, biases)]


def _extra_keys(
    m: nn.Module, call: _Call, values: dict[str, tuple[Any, Any]], kv: list[tuple[Tensor, Tensor | None]]
) -> list[tuple[Tensor, Tensor | None]] | None:
    """``[(K, K_t), (V, V_t)]`` as ``[N, H, S', d]`` heads with the ``bias_k``/``bias_v`` row and the
    ``add_zero_attn`` zero row appended where the module asks, the call's masks padded to match; ``None``
    where only one of ``bias_k``/``bias_v`` is set."""
    (k, k_t), (v, v_t) = kv
    n, e, h = k.shape[0], m.embed_dim, m.num_heads
    bias_k, bias_k_t = values.get("bias_k", (None, None))
    bias_v, bias_v_t = values.get("bias_v", (None, None))
    if (bias_k is None) != (bias_v is None):
        return None
    pads = 0
    if bias_k is not None:
        bias_k_t, bias_v_t = _dense(bias_k_t, bias_k), _dense(bias_v_t, bias_v)
        k, k_t = _cat(k, k_t, bias_k.expand(n, 1, e), None if bias_k_t is None else bias_k_t.expand(n, 1, e), 1)
        v, v_t = _cat(v, v_t, bias_v.expand(n, 1, e), None if bias_v_t is None else bias_v_t.expand(n, 1, e), 1)
        pads += 1
    k, k_t, v, v_t = (_heads(x, h) for x in (k, k_t, v, v_t))
    if m.add_zero_attn:
        zeros = torch.zeros(n, h, 1, e // h, dtype=k.dtype, device=k.device)
        k, k_t = _cat(k, k_t, zeros, None, 2)
        v, v_t = _cat(v, v_t, zeros, None, 2)
        pads += 1
    if pads:
        call.attn_mask = None if call.attn_mask is None else F.pad(call.attn_mask, (0, pads))
        call.kpm = None if call.kpm is None else F.pad(call.kpm, (0, pads))
    return [(k, k_t), (v, v_t)]


def _heads(x: Tensor | None, h: int) -> Tensor | None:
    """``[N, S, E] → [N, H, S, d]``."""
    return None if x is None else x.view(x.shape[0], x.shape[1], h, x.shape[2] // h).transpose(1, 2)


def _attention_bias(call: _Call, h: int, tgt: int, s_len: int, like: Tensor) -> Tensor | None:
    """The additive mask :math:`M`, ``[N or 1, H or 1, L, S']``: ``attn_mask`` plus ``key_padding_mask``, or
    the causal mask (``-inf`` above the diagonal)."""
    n = like.shape[0]
    bias = None
    if call.attn_mask is not None:
        mask = call.attn_mask
        bias = mask.view(1, 1, tgt, s_len) if mask.shape[0] == 1 else mask.view(n, h, tgt, s_len)
    if call.kpm is not None:
        kpm = call.kpm.view(n, 1, 1, s_len)
        bias = kpm if bias is None else bias + kpm
    if call.causal:
        allowed = torch.ones(tgt, s_len, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(tgt, s_len, dtype=like.dtype, device=like.device).masked_fill_(~allowed, float("-inf"))
    return bias


def _attend(
    q: Tensor, q_t: Tensor | None, kv: list[tuple[Tensor, Tensor | None]], bias: Tensor | None, need_weights: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(O, O_t, P, P_t)`` per head (module docstring): :math:`S = cQK^\top + M`, :math:`P = softmax(S)`,
    :math:`O = PV` and their tangents; ``q`` ``[N, H, L, d]``, ``kv`` ``[N, H, S', d]``."""
    (k, k_t), (v, v_t) = kv
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale
    kt = k.transpose(-2, -1)
    scores = q @ kt
    if bias is not None:
        scores.add_(bias)
    p = F.softmax(scores, dim=-1) if need_weights else torch._safe_softmax(scores, -1)
    del scores
    s_t = None
    if q_t is not None:
        s_t = (q_t * scale) @ kt
    if k_t is not None:
        term = q @ k_t.transpose(-2, -1)
        s_t = term if s_t is None else s_t.add_(term)
    del q, kt
    p_t = None
    if s_t is not None:  # P ⊙ (S_t − Σ_j P S_t)
        p_t = s_t.sub_((p * s_t).sum(-1, keepdim=True)).mul_(p)
    o = p @ v
    o_t = None if p_t is None else p_t @ v
    if v_t is not None:
        term = p @ v_t
        o_t = term if o_t is None else o_t.add_(term)
    return o, o_t, p, p_t


def mha_jvp(
    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], values: dict[str, tuple[Any, Any]],
) -> tuple[Tensor, Tensor | None] | None:
    """``m(*args, **kwargs)`` for ``nn.MultiheadAttention`` ``m`` under forward AD: ``(output, weights)``
    with their tangents (dual tensors; a plain tensor where the tangent is zero), or ``None`` for a call this
    rule does not describe. ``values``: ``name → (primal, tangent)`` for the names of ``_parameters(m)``."""
    call = _bind_call(m, args, kwargs, values["out_proj.weight"][0].dtype)
    if call is None:
        return None
    (q, q_t), *kv = _in_projections(m, call, values)
    kv = _extra_keys(m, call, values, kv)
    if kv is None:
        return None
    n, tgt, e = q.shape
    h = m.num_heads
    q, q_t = _heads(q, h), _heads(q_t, h)
    bias = _attention_bias(call, h, tgt, kv[0][0].shape[2], q)
    o, o_t, p, p_t = _attend(q, q_t, kv, bias, call.need_weights)
    del kv

    def merge(x: Tensor | None) -> Tensor | None:  # [N, H, L, d] → [N, L, E]
        return None if x is None else x.transpose(1, 2).reshape(n, tgt, e)

    o, o_t = merge(o), merge(o_t)
    w_o, w_o_t = values.get("out_proj.weight", (None, None))
    b_o, b_o_t = values.get("out_proj.bias", (None, None))
    y = F.linear(o, w_o, b_o)
    y_t = _linear_tangent(o, o_t, w_o, w_o_t, b_o_t)
    del o, o_t

    def back(x: Tensor | None) -> Tensor | None:  # [N, L, E] → the caller's layout
        if x is None:
            return None
        if not call.batched:
            return x.squeeze(0)
        return x if m.batch_first else x.transpose(0, 1)

    out = _dual(back(y), back(y_t))
    if not call.need_weights:
        return out, None
    if call.average:
        p = p.mean(1)
        p_t = None if p_t is None else p_t.mean(1)
    if not call.batched:
        p = p.squeeze(0)
        p_t = None if p_t is None else p_t.squeeze(0)
    return out, _dual(p, p_t)


def _dual(x: Tensor, t: Tensor | None) -> Tensor:
    return x if t is None else fwAD.make_dual(x, t)


register_module_rule(nn.MultiheadAttention, ModuleRule(parameters=_parameters, jvp=mha_jvp, eligible=_eligible))


# -- nn.TransformerEncoderLayer: the feed-forward block in tangent-lean order ------------------------------

# activation → the kernel of PyTorch's own forward-AD formula for it: tangent = kernel(x_t, x) elementwise
_ACTIVATION_TANGENT = {
    F.gelu: lambda t, x: torch.ops.aten.gelu_backward(t, x),  # gelu'(x) ⊙ t (derivatives.yaml: gelu)
    F.relu: lambda t, x: torch.ops.aten.threshold_backward(t, x, 0),  # t where x > 0 (same mask as relu(x) > 0)
}


def _layer_parameters(m: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {}  # the children read their own tensors, each in its own module call


def _layer_eligible(m: nn.Module) -> bool:
    return "_ff_block" not in m.__dict__ and any(m.activation is f for f in _ACTIVATION_TANGENT)


def encoder_layer_jvp(
    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], values: dict[str, tuple[Any, Any]],
) -> Any:
    r"""``nn.TransformerEncoderLayer``'s own forward, its feed-forward block run in an order that holds
    three hidden-sized tensors where PyTorch's forward AD holds four.

    With ``A = linear1(x)`` and its tangent ``A_t``, PyTorch's dual activation keeps ``A``, ``A_t``, ``σ(A)``
    and ``σ'(A) ⊙ A_t`` alive together. Here the tangent is formed first by the same kernel
    (``gelu_backward(A_t, A)``, ``threshold_backward(A_t, A, 0)``), ``A_t`` is released, then ``σ(A)`` is
    formed and ``A`` released: the same values, bit for bit, one hidden-sized buffer less at the peak
    (the feed-forward width is usually 4× the model's, so this buffer is the largest of the layer). The
    child modules (norms, attention, linears, dropouts) are called as modules, so their own rules, windows
    and hooks apply as in the layer's forward."""
    tangent_of = next(k for f, k in _ACTIVATION_TANGENT.items() if m.activation is f)

    def ff_block(x: Tensor) -> Tensor:
        h = m.linear1(x)
        if not isinstance(h, Tensor):  # a replaced linear1: the layer's own block
            return m.dropout2(m.linear2(m.dropout(m.activation(h))))
        a, a_t = fwAD.unpack_dual(h)
        del h
        if a_t is None:
            y = m.activation(a)
        else:
            y_t = tangent_of(a_t, a)
            del a_t
            y = fwAD.make_dual(m.activation(a), y_t)
            del y_t
        del a
        return m.dropout2(m.linear2(m.dropout(y)))

    m._ff_block = ff_block
    try:
        return type(m).forward(m, *args, **kwargs)
    finally:
        del m._ff_block


register_module_rule(nn.TransformerEncoderLayer, ModuleRule(
    parameters=_layer_parameters, jvp=encoder_layer_jvp, eligible=_layer_eligible,
))
