r"""One registry of per-layer rules, keyed by module type (as BackPACK keys its extensions).

A :class:`LayerRule` says three things about a layer ``y = layer(x; W, b)``:

* ``primal(m, x, W, b)``: its output for plain tensors (what its ``forward`` computes);
* ``param_tangent(m, x, y, W_t, b_t)``: the output tangent of its own parameters, :math:`x W_t^\top + b_t`
  for ``nn.Linear`` (``W_t`` may come as rank-1 factors ``(u, v)``: :math:`(x v) u^\top`, no ``u vᵀ``
  formed), and ``add_input_tangent(m, term, x_t, W)``: the input's, :math:`x_t W^\top`;
* ``weight_grads(m, x, g)``: the exact parameter gradients from the output gradient ``g`` (the local rule
  of activity perturbation), :math:`\hat g_W = g^\top x`, :math:`\hat g_b = \sum g` for ``nn.Linear``.

**A fast rule is never silently wrong.** :func:`fast_rule` hands a module its rule only when the rule
describes exactly what the module computes: its type is registered *exactly* (a subclass may override
``forward``), it has no ``forward`` of its own instance, no forward hooks or pre-hooks, no global module
hooks are active (other than fwdgrad's own, marked benign), and the rule's ``eligible`` test passes (one
Conv2d test: zero padding given as numbers). Anything else takes the general path: PyTorch's own
forward-AD rules through the module as it runs, hooks included.

Modules that one input and one weight do not describe (several inputs, keyword arguments, tuple outputs,
a child's parameters read directly: ``nn.MultiheadAttention``) have a :class:`ModuleRule` instead
(:func:`register_module_rule`, :func:`module_rule`), used by the windowed pass under the same tests.

User layers join in one of two ways: register a :class:`LayerRule` for their type
(:func:`register_rule`), or implement the :class:`ActivityLayer` protocol (``activity_weight_grads``), which
activity perturbation uses to perturb the layer as a whole.

Example:
    >>> import torch
    >>> from fwdgrad.derivatives.rules import fast_rule
    >>> lin = torch.nn.Linear(3, 2)
    >>> fast_rule(lin) is not None
    True
    >>> handle = lin.register_forward_hook(lambda m, a, o: o * 2)
    >>> fast_rule(lin) is None    # the rule cannot see the hook: general path
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from fwdgrad.derivatives.watch import restore_buffers, snapshot_buffers, swapped
from fwdgrad.local import layer_method

Tensor = torch.Tensor


@runtime_checkable
class ActivityLayer(Protocol):
    """A layer that activity perturbation perturbs as a whole, with its own exact local weight rule.

    ``activity_weight_grads(x, grad_output)`` returns ``{parameter name: gradient}`` for the layer's own
    parameters, given its (single) input ``x`` and the gradient ``grad_output`` of its output: the exact
    vector-Jacobian product of the layer alone. (Replaces the undeclared ``local_grads`` method and the
    ``fwdgrad_activity_unit`` flag, which still work for one release with a ``DeprecationWarning``.)
    """

    def activity_weight_grads(self, x: Tensor, grad_output: Tensor) -> dict[str, Tensor]: ...


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """The per-layer rule of one module type; see the module docstring."""

    primal: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]
    param_tangent: Callable[[nn.Module, Tensor, Tensor, Any, Tensor | None], Tensor]
    add_input_tangent: Callable[..., Tensor]
    weight_grads: Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
    fits: Callable[[nn.Module, Tensor], bool]
    eligible: Callable[[nn.Module], bool] = lambda m: True


RULES: dict[type, LayerRule] = {}


def register_rule(cls: type, rule: LayerRule) -> None:
    """Register ``rule`` for modules of exactly type ``cls``; a type registered twice raises ``ValueError``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"fwdgrad.derivatives.register_rule: {cls!r} is not an nn.Module subclass")
    if cls in RULES:
        raise ValueError(f"fwdgrad.derivatives.register_rule: {cls.__name__} already has a rule")
    RULES[cls] = rule


# --- what a rule cannot see ------------------------------------------------------------------------------


def benign_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark one of fwdgrad's own global hooks as not changing what a module computes."""
    fn._fwdgrad_benign = True  # type: ignore[attr-defined]
    return fn


def _foreign(hooks: dict[int, Any]) -> bool:
    return any(not getattr(h, "_fwdgrad_benign", False) for h in hooks.values())


def global_hooks_active() -> bool:
    """Whether a global module forward hook or pre-hook other than fwdgrad's own is registered."""
    return _foreign(_module._global_forward_hooks) or _foreign(_module._global_forward_pre_hooks)


def has_hidden_behaviour(m: nn.Module) -> bool:
    """A forward of its own instance, or forward hooks / pre-hooks of its own (fwdgrad's benign ones aside)."""
    return "forward" in m.__dict__ or _foreign(m._forward_hooks) or _foreign(m._forward_pre_hooks)


def fast_rule(m: nn.Module, *, global_hooks: bool | None = None) -> LayerRule | None:
    """The rule of ``m`` when it describes ``m`` exactly, else ``None`` (take the general path).

    ``global_hooks``: whether foreign global hooks are active (computed when ``None``)."""
    rule = RULES.get(type(m))
    if rule is None or not rule.eligible(m) or has_hidden_behaviour(m):
        return None
    if global_hooks_active() if global_hooks is None else global_hooks:
        return None
    return rule


# --- whole-module rules (several inputs, parameters of child modules) ------------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    r"""The forward-mode rule of a module that a :class:`LayerRule` cannot describe: several inputs, keyword
    arguments, a tuple output, or parameters of child modules used directly (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` inside ``F.multi_head_attention_forward``, never calling ``out_proj``).

    * ``parameters(m)``: ``{name: (owner, attribute)}`` of every tensor the rule reads, ``owner`` being ``m``
      or one of its children (``"out_proj.weight": (m.out_proj, "weight")``);
    * ``jvp(m, args, kwargs, values)``: the call ``m(*args, **kwargs)`` under forward AD, the inputs possibly
      dual: its output with every tangent set (dual tensors), given ``values[name] = (primal, tangent)``
      (``tangent`` ``None`` for a frozen tensor; a matrix's may come as rank-1 factors ``(u, v)``). It
      returns ``None`` for a call it does not support (a mask carrying a tangent, dropout in training...):
      that call then runs the module's own forward with dual parameters, PyTorch's forward-AD rules;
    * ``eligible(m)``: whether the rule describes this instance (its children's types, its settings).
    """

    parameters: Callable[[nn.Module], dict[str, tuple[nn.Module, str]]]
    jvp: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], dict[str, tuple[Any, Any]]], Any | None]
    eligible: Callable[[nn.Module], bool] = lambda m: True


MODULE_RULES: dict[type, ModuleRule] = {}


def register_module_rule(cls: type, rule: ModuleRule) -> None:
    """Register a :class:`ModuleRule` for modules of exactly type ``cls`` (once per type, else ``ValueError``)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"fwdgrad.derivatives.register_module_rule: {cls!r} is not an nn.Module subclass")
    if cls in MODULE_RULES:
        raise ValueError(f"fwdgrad.derivatives.register_module_rule: {cls.__name__} already has a rule")
    MODULE_RULES[cls] = rule


def module_rule(m: nn.Module, *, global_hooks: bool | None = None) -> ModuleRule | None:
    """The :class:`ModuleRule` of ``m`` when it describes ``m`` exactly (the tests of :func:`fast_rule`: exact
    type, no ``forward`` of its own instance, no hooks of its own, no foreign global hooks, ``eligible``),
    else ``None``."""
    rule = MODULE_RULES.get(type(m))
    if rule is None or not rule.eligible(m) or has_hidden_behaviour(m):
        return None
    if global_hooks_active() if global_hooks is None else global_hooks:
        return None
    return rule


# --- the compute dtype ----------------------------------------------------------------------------------


def in_dtype(t: Any, dtype: torch.dtype) -> Any:
    """``t`` in ``dtype`` (``None`` and rank-1 factor pairs pass through, each factor cast).

    The rules form a tangent in the dtype of the module's output, the *compute dtype*: the parameters' own
    dtype, except under ``torch.autocast``, where a float32 layer computes in bfloat16 / float16 and its
    tangent must too (the dtype PyTorch's own forward-AD rules use there: the cast is part of the layer)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(in_dtype(f, dtype) for f in t)
    return t if t.dtype == dtype else t.to(dtype)


def vmapped(t: Tensor) -> bool:
    """Whether ``t`` carries a ``vmap`` batch dimension (beneath any ``jvp`` wrappers): the batched pass's
    tangents of K directions."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


# --- nn.Linear ------------------------------------------------------------------------------------------


def _linear_primal(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _linear_param_tangent(m: nn.Module, x: Tensor, out: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor:
    x, w_t, b_t = in_dtype(x, out.dtype), in_dtype(w_t, out.dtype), in_dtype(b_t, out.dtype)
    if w_t is None:  # frozen weight, trainable bias
        return torch.zeros_like(out) + b_t
    if isinstance(w_t, tuple):  # rank-1: x W_tᵀ = (x·v) uᵀ
        u, v = w_t
        term = (x @ v).unsqueeze(-1) * u
        return term if b_t is None else term.add_(b_t)
    if x.dim() >= 2 and vmapped(w_t):
        # K directions under vmap (w_t batched, x shared): W_t x2ᵀ is one [K·out, in] @ [in, rows] product;
        # vmap's rule for F.linear with a batched weight runs K narrow products (bmm) instead
        wide = w_t @ x.reshape(-1, x.shape[-1]).mT  # [out, rows] per direction, fresh: the bias goes in in place
        if b_t is not None:
            wide.add_(b_t.unsqueeze(-1))
        return wide.mT.reshape(*x.shape[:-1], w_t.shape[0])
    return F.linear(x, w_t, b_t)


def _linear_add_input(m: nn.Module, term: Tensor, x_t: Tensor, weight: Tensor, inplace: bool = True) -> Tensor:
    x_t, weight = in_dtype(x_t, term.dtype), in_dtype(weight, term.dtype)
    if inplace and term.dim() >= 2 and term.is_contiguous() and x_t.shape[:-1] == term.shape[:-1]:
        # [..., out] as [rows, out]: one addmm into the fresh term, no second output-sized buffer
        term.view(-1, term.shape[-1]).addmm_(x_t.reshape(-1, x_t.shape[-1]), weight.t())
        return term
    return F.linear(x_t, weight) + term  # the sum takes the layout of x_t·Wᵀ (term may be a transposed view)


def _linear_weight_grads(m: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    g2 = g.reshape(-1, g.shape[-1])
    out = {"weight": g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)}
    if m.bias is not None:
        out["bias"] = g2.sum(0)
    return out


register_rule(nn.Linear, LayerRule(
    primal=_linear_primal,
    param_tangent=_linear_param_tangent,
    add_input_tangent=_linear_add_input,
    weight_grads=_linear_weight_grads,
    fits=lambda m, x: x.dim() >= 1 and x.shape[-1] == m.in_features,
))


# --- nn.Conv2d ------------------------------------------------------------------------------------------


def _conv_primal(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def _conv_param_tangent(m: nn.Module, x: Tensor, out: Tensor, w_t: Any, b_t: Tensor | None) -> Tensor:
    x, w_t, b_t = in_dtype(x, out.dtype), in_dtype(w_t, out.dtype), in_dtype(b_t, out.dtype)
    if w_t is None:
        return torch.zeros_like(out) + b_t.view(-1, *([1] * (out.dim() - 2)))
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


def _conv_add_input(m: nn.Module, term: Tensor, x_t: Tensor, weight: Tensor, inplace: bool = True) -> Tensor:
    x_t, weight = in_dtype(x_t, term.dtype), in_dtype(weight, term.dtype)
    # the sum takes the layout of the input's term (under vmap the weight term's is direction-minor)
    return F.conv2d(x_t, weight, None, m.stride, m.padding, m.dilation, m.groups) + term


def _conv_weight_grads(m: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    out = {"weight": torch.nn.grad.conv2d_weight(x, m.weight.shape, g, m.stride, m.padding, m.dilation, m.groups)}
    if m.bias is not None:
        out["bias"] = g.sum((0, 2, 3))
    return out


register_rule(nn.Conv2d, LayerRule(
    primal=_conv_primal,
    param_tangent=_conv_param_tangent,
    add_input_tangent=_conv_add_input,
    weight_grads=_conv_weight_grads,
    fits=lambda m, x: x.dim() == 4,
    # the one Conv2d test: zero padding given as numbers ('same'/'valid' strings and other modes differ)
    eligible=lambda m: m.padding_mode == "zeros" and not isinstance(m.padding, str),
))


# --- activity perturbation: a module's exact local weight rule -------------------------------------------


def is_activity_layer(m: nn.Module) -> bool:
    """A module perturbed as a whole: it implements :class:`ActivityLayer` (or the deprecated flag)."""
    if isinstance(m, ActivityLayer):
        return True
    return layer_method(m, "activity_weight_grads", "fwdgrad_activity_unit") is True


def forward_rule(m: nn.Module) -> LayerRule | None:
    """The rule of ``m`` as a description of what produced its output from the input it *received*, for a
    weight rule applied to a stored input and output gradient; ``None`` when it does not describe that.

    Unlike :func:`fast_rule`, the module's own hooks do not matter: the stored input is the one its forward
    received (after every pre-hook) and the output is the one its forward returned, read before its own
    forward hooks run (fwdgrad reads it with a prepended hook). Global forward hooks run before any module
    hook, so a foreign one makes the rule inexact."""
    rule = RULES.get(type(m))
    if rule is None or not rule.eligible(m) or "forward" in m.__dict__ or _foreign(_module._global_forward_hooks):
        return None
    return rule


def local_weight_grads(m: nn.Module, inputs: tuple[Any, ...], grad_output: Tensor) -> dict[str, Tensor]:
    """Parameter gradients of ``m`` alone (names relative to ``m``) from the gradient of its output.

    ``inputs`` are the inputs ``m``'s forward received (after its pre-hooks) and ``grad_output`` is the
    gradient of what it returned, before its own forward hooks (see :func:`forward_rule`). In order: the
    layer's own :class:`ActivityLayer` rule, the registered rule of its type (when :func:`forward_rule`
    vouches for it), else a backward graph that spans this module only: ``m.forward`` re-run on the stored
    inputs with no pre-hook applied again (its children's hooks run in it: they are part of its forward)."""
    own = layer_method(m, "activity_weight_grads", "local_grads")
    if own is not None and len(inputs) == 1:
        return own(inputs[0], grad_output)
    rule = forward_rule(m)
    if rule is not None and len(inputs) == 1 and isinstance(inputs[0], Tensor):
        return rule.weight_grads(m, inputs[0], grad_output)
    return _module_vjp(m, inputs, grad_output)


def _forward_as_received(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``module.forward(*inputs)`` followed by the foreign global forward hooks: what produced the output a
    prepended forward hook of ``module`` sees, from the inputs it received (pre-hooks already applied)."""
    out = module.forward(*inputs)
    for hook in _module._global_forward_hooks.values():
        if not getattr(hook, "_fwdgrad_benign", False):
            replaced = hook(module, inputs, out)
            out = out if replaced is None else replaced
    return out


def _module_vjp(module: nn.Module, inputs: tuple[Any, ...], g: Tensor) -> dict[str, Tensor]:
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if not names:
        return {}
    saved = snapshot_buffers(module)  # the re-run must not move BatchNorm's statistics again
    with torch.enable_grad():
        ps = {n: p.detach().requires_grad_(True) for n, p in module.named_parameters() if p.requires_grad}
        with swapped(module, ps):
            out = _forward_as_received(module, inputs)
        grads = torch.autograd.grad(out, list(ps.values()), grad_outputs=g, allow_unused=True)
    restore_buffers(saved)
    return {n: torch.zeros_like(ps[n]) if gr is None else gr for n, gr in zip(names, grads)}
