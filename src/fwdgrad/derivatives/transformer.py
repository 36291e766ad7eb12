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


def mha_jvp(
    m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], values: dict[str, tuple[Any, Any]],
) -> tuple[Tensor, Tensor | None] | None:
    """``m(*args, **kwargs)`` for ``nn.MultiheadAttention`` ``m`` under forward AD: ``(output, weights)``
    with their tangents (dual tensors; a plain tensor where the tangent is zero), or ``None`` for a call this
    rule does not describe. ``values``: ``name → (primal, tangent)`` for the names of ``_parameters(m)``."""
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    need_weights, average, is_causal = a["need_weights"], a["average_attn_weights"], a["is_causal"]
    if not all(isinstance(x, Tensor) and not x.is_nested for x in (query, key, value)):
        return None
    if m.training and m.dropout > 0.0:  # the RNG draw of the math path is not reproduced here
        return None
    if not all(isinstance(f, bool) for f in (need_weights, average, is_causal)):
        return None
    (xq, xq_t), (xk, xk_t), (xv, xv_t) = _plain(query), _plain(key), _plain(value)
    dtype = values["out_proj.weight"][0].dtype
    if not (xq.dtype == xk.dtype == xv.dtype == dtype):
        return None
    masks = []
    for mask in (a["key_padding_mask"], a["attn_mask"]):
        if mask is not None:
            if not isinstance(mask, Tensor) or fwAD.unpack_dual(mask).tangent is not None:
                return None  # a learned mask: its tangent would be lost
            mask = fwAD.unpack_dual(mask).primal
            if mask.dtype != torch.bool and mask.dtype != dtype:
                return None
        masks.append(mask)
    kpm, attn_mask = masks
    if kpm is not None and attn_mask is not None and (kpm.dtype == torch.bool) != (attn_mask.dtype == torch.bool):
        return None  # PyTorch warns and converts; not reproduced
    if is_causal and attn_mask is None:
        return None  # PyTorch raises: the general path says so

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
    n, tgt, e = xq.shape
    src = xk.shape[1]
    h = m.num_heads
    d = e // h
    if e != m.embed_dim or xk.shape[0] != n or xv.shape[:2] != xk.shape[:2]:
        return None
    if xk.shape[2] != m.kdim or xv.shape[2] != m.vdim or (m._qkv_same_embed_dim and xk.shape != xv.shape):
        return None
    if kpm is not None:
        if kpm.dim() != (2 if batched else 1):
            return None
        kpm = kpm if batched else kpm.unsqueeze(0)
        if kpm.shape != (n, src):
            return None
        kpm = _float_mask(kpm, dtype)
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape == (tgt, src):
            attn_mask = attn_mask.unsqueeze(0)
        elif not (attn_mask.dim() == 3 and attn_mask.shape == (n * h, tgt, src)):
            return None
        attn_mask = _float_mask(attn_mask, dtype)
    causal = is_causal and kpm is None and not need_weights  # PyTorch then drops attn_mask for SDPA's own
    if causal:
        attn_mask = None

    # in-projections
    def param(name: str) -> tuple[Any, Any]:
        return values.get(name, (None, None))

    b_in, b_in_t = param("in_proj_bias")
    biases = [(None, None)] * 3 if b_in is None else [
        (b_in[i * e:(i + 1) * e], None if b_in_t is None else b_in_t[i * e:(i + 1) * e]) for i in range(3)
    ]
    if m._qkv_same_embed_dim:
        w_in, w_in_t = param("in_proj_weight")
        weights = [(w_in[i * e:(i + 1) * e], _rows(w_in_t, i * e, (i + 1) * e)) for i in range(3)]
    else:
        weights = [param(f"{c}_proj_weight") for c in "qkv"]
    projected = []
    for (x, x_t), (w, w_t), (b, b_t) in zip(((xq, xq_t), (xk, xk_t), (xv, xv_t)), weights, biases):
        projected.append((F.linear(x, w, b), _linear_tangent(x, x_t, w, w_t, b_t)))
    (q, q_t), (k, k_t), (v, v_t) = projected
    # (PyTorch projects self-attention inputs with one packed matmul: the same values, rounding aside)

    bias_k, bias_k_t = param("bias_k")
    bias_v, bias_v_t = param("bias_v")
    if (bias_k is None) != (bias_v is None):
        return None
    if bias_k is not None:
        bias_k_t, bias_v_t = _dense(bias_k_t, bias_k), _dense(bias_v_t, bias_v)
        k, k_t = _cat(k, k_t, bias_k.expand(n, 1, e), None if bias_k_t is None else bias_k_t.expand(n, 1, e), 1)
        v, v_t = _cat(v, v_t, bias_v.expand(n, 1, e), None if bias_v_t is None else bias_v_t.expand(n, 1, e), 1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))

    def heads(x: Tensor | None) -> Tensor | None:  # [N, S, E] → [N, H, S, d]
        return None if x is None else x.view(n, x.shape[1], h, d).transpose(1, 2)

    q, q_t, k, k_t, v, v_t = (heads(x) for x in (q, q_t, k, k_t, v, v_t))
    if m.add_zero_attn:
        zeros = torch.zeros(n, h, 1, d, dtype=dtype, device=k.device)
        k, k_t = _cat(k, k_t, zeros, None, 2)
        v, v_t = _cat(v, v_t, zeros, None, 2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    s_len = k.shape[2]

    # the additive mask, [N or 1, H or 1, L, S']
    bias = None
    if attn_mask is not None:
        bias = attn_mask.view(1, 1, tgt, s_len) if attn_mask.shape[0] == 1 else attn_mask.view(n, h, tgt, s_len)
    if kpm is not None:
        kpm = kpm.view(n, 1, 1, s_len)
        bias = kpm if bias is None else bias + kpm
    if causal:
        allowed = torch.ones(tgt, s_len, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(tgt, s_len, dtype=dtype, device=q.device).masked_fill_(~allowed, float("-inf"))

    scale = 1.0 / math.sqrt(d)
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
    del v, v_t

    def merge(x: Tensor | None) -> Tensor | None:  # [N, H, L, d] → [N, L, E]
        return None if x is None else x.transpose(1, 2).reshape(n, tgt, e)

    o, o_t = merge(o), merge(o_t)
    w_o, w_o_t = param("out_proj.weight")
    b_o, b_o_t = param("out_proj.bias")
    y = F.linear(o, w_o, b_o)
    y_t = _linear_tangent(o, o_t, w_o, w_o_t, b_o_t)
    del o, o_t

    def back(x: Tensor | None) -> Tensor | None:  # [N, L, E] → the caller's layout
        if x is None:
            return None
        if not batched:
            return x.squeeze(0)
        return x if m.batch_first else x.transpose(0, 1)

    out = _dual(back(y), back(y_t))
    if not need_weights:
        return out, None
    if average:
        p = p.mean(1)
        p_t = None if p_t is None else p_t.mean(1)
    if not batched:
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
