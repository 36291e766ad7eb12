r"""Estimators with local losses: each block learns from its own head's loss (Ren et al., ICLR 2023).

The model declares its blocks and heads through :mod:`fwdgrad.local` (see the protocol there). Four names:

==========  ====================================================================================
``l-bp``    backprop inside each block, one loss per block (the paper's L-BP)
``lg-bp``   backprop inside each block, one loss per block, patch and group (LG-BP)
``lg-fg-w`` weight perturbation; each block's tangent derivative comes from its own losses (LG-FG-W)
``lg-fg-a`` activity perturbation with local losses (LG-FG-A), the paper's best forward-gradient method
==========  ====================================================================================

(``l-fg-w`` and ``l-fg-a`` are the same estimators with one loss per block.)

Heads (each block's local classifier and the final read-out) are single ``nn.Linear`` layers on inputs that
carry no gradient or tangent; their exact gradient needs no backward pass either: the forward-gradient
estimators get :math:`\partial\ell_b/\partial \text{logits}_b` from ``C`` forward-mode passes through the
criterion alone (:func:`fwdgrad.local.criterion_gradient`) and apply the linear layer's local rule
:math:`\hat g_W = \frac1B \sum_b \delta_b h_b^\top`.

For the block bodies, write :math:`D_k[b, s]` for the tangent of the local loss :math:`s` of example ``b``
of block ``k`` (divided by ``B``: the objective is the batch mean). Blocks are cut from one another, so
:math:`D_k` only sees block ``k``'s tangents.

* ``lg-fg-a``: the output :math:`z` of a perturbed module of block ``k`` gets tangent :math:`u`; its gradient
  estimate is :math:`\text{layout}(D_k) \odot u` (masked at inactive ReLUs), where ``layout`` hands each
  output entry the derivative of the local losses it feeds (the module's ``loss_layout``; the sum over the
  losses if it has none). With one loss per patch and group, a channel chunk's estimate is driven by its own
  group's loss only: the variance scales with the group's size, not the layer's.
* ``lg-fg-w``: the parameters get tangents :math:`v`; the estimate is :math:`\text{layout}(\sum_{b,p} D_k)
  \odot v` (the module's ``param_loss_layout`` per group, else the total).

Both are unbiased for the gradient of the sum of block ``k``'s local losses with respect to its parameters:
cross terms between independent tangents have mean zero.

``loss_fn`` must return per-example losses for the forward-gradient estimators (``reduction="none"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad import local
from fwdgrad.derivatives import call_with_parameters, forward_mode, once_per_step
from fwdgrad.directions import SAMPLERS
from fwdgrad.estimators.activity import (
    FG_A_LR,
    ActivityPerturbation,
    ModuleSelection,
    Site,
    accumulate_site_grads,
    masked,
    refuse_batch_coupling,
    select_modules,
)
from fwdgrad.estimators.backprop import BP_LR
from fwdgrad.estimators.base import Estimator, LossFn, SampledEstimator
from fwdgrad.estimators.forward_gradient import FG_W_LR
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor


def _check_heads(where: str, rec: local.LocalRecorder, model: nn.Module) -> list[local.LocalHead]:
    if not rec.heads:
        raise ValueError(
            f"{where}: {type(model).__name__} recorded no local head; local-loss estimators need a model that "
            "follows the fwdgrad.local protocol (e.g. fwdgrad.models.LocalMixer)"
        )
    return rec.heads


def _zeros_like_params(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for n, p in params.items()}


def _add_head_grads(
    where: str, loss_fn: LossFn, heads: list[local.LocalHead], params: dict[str, nn.Parameter],
    grads: dict[str, Tensor],
) -> None:
    """Exact gradients of every head's own loss, by the linear local rule (no backward pass)."""
    name_of = {id(p): n for n, p in params.items()}
    seen: set[int] = set()
    for h in heads:
        if id(h.head) in seen:  # a block head that is also the read-out: its loss counts once
            continue
        seen.add(id(h.head))
        delta = local.criterion_gradient(where, loss_fn, h.logits)  # [B, C]
        b = delta.shape[0]
        x = h.head_input.detach()
        pairs = [(h.head.weight, delta.T @ x.to(delta.dtype) / b)]
        if h.head.bias is not None:
            pairs.append((h.head.bias, delta.sum(0) / b))
        for p, g in pairs:
            n = name_of.get(id(p))
            if n is not None:
                grads[n] = grads[n] + g.to(grads[n].dtype)


def _split_derivatives(where: str, loss_fn: LossFn, head: local.LocalHead) -> Tensor:
    """``D[b, *S]``: the tangent of every local loss of the block, divided by the batch size."""
    split = head.split_logits
    b, c = split.shape[0], split.shape[-1]
    extra = split.shape[1:-1]
    flat = split.reshape(b, -1, c)
    cols = []
    for j in range(flat.shape[1]):
        value = local.check_per_example(where, local.replay_criterion(loss_fn, flat[:, j]), b)
        t = fwAD.unpack_dual(value).tangent
        cols.append(split.new_zeros(b) if t is None else t.detach())
    return (torch.stack(cols, 1) / b).reshape(b, *extra)


def _block_losses(
    where: str, loss_fn: LossFn, model: nn.Module, step_loss: LossFn
) -> tuple[Tensor, list[local.LocalHead], list[Tensor]]:
    """Run the model once (``step_loss``, the loss whose buffer updates count once per step) in local mode
    inside an active dual level; ``(mean loss, heads, D per block)``."""
    rec = local.current()
    assert rec is not None
    value = step_loss(model)
    heads = _check_heads(where, rec, model)
    local.check_per_example(where, value, heads[0].logits.shape[0])
    loss = fwAD.unpack_dual(value).primal.detach().mean()
    derivs = [_split_derivatives(where, loss_fn, h) for h in heads if h.split_logits is not None]
    return loss, heads, derivs


class LocalActivityForwardGradient(SampledEstimator):
    r"""Activity-perturbed forward gradient with local losses (``groups=True``: LG-FG-A, registered as
    ``lg-fg-a``; ``groups=False``: L-FG-A, ``l-fg-a``).

    Args:
        num_directions: K forward passes averaged per call.
        tangents: sampler name of :mod:`fwdgrad.directions`.
        modules: modules to perturb (see :func:`fwdgrad.estimators.activity.select_modules`); only those inside
            a recorded block are used.
        skip_inactive: zero the estimate at outputs that feed an ``nn.ReLU`` and are not positive.
        groups: one local loss per patch and group (``True``) or one per block.
        seed, generator: the source of randomness.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> from fwdgrad.models.localmixer import LocalMixer
        >>> model = LocalMixer((1, 8, 8), 3, num_blocks=2, num_patches=2, channels=8, groups=2)
        >>> x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
        >>> loss = fwdgrad.estimator("lg-fg-a", seed=0)(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
        >>> model.blocks[0].channel.weight.grad is not None
        True
    """

    per_example_loss = True

    def __init__(
        self,
        num_directions: int = 1,
        tangents: str = "gaussian",
        *,
        modules: ModuleSelection = None,
        skip_inactive: bool = True,
        groups: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_directions, tangents, seed=seed, generator=generator)
        self.modules = modules
        self.skip_inactive = bool(skip_inactive)
        self.groups = bool(groups)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        refuse_batch_coupling(where, model)
        chosen = select_modules(where, model, self.modules)
        grads = _zeros_like_params(params)
        loss, heads = None, []
        step_loss = once_per_step(model, loss_fn)
        for _ in range(self.num_directions):
            pert = ActivityPerturbation(model, chosen, self.tangents, self._generator, skip_inactive=self.skip_inactive)
            with forward_mode(where, model), local.recording(self.groups), pert:
                value, heads, derivs = _block_losses(where, loss_fn, model, step_loss)
            blocks = [h.block for h in heads if h.split_logits is not None]
            owner = local.block_of(blocks)
            head_ids = {id(h.head) for h in heads}
            sites: list[Site] = []
            g_outs: list[Tensor] = []
            for s in pert.sites:
                k = owner.get(id(s.module))
                if k is None or id(s.module) in head_ids:
                    continue
                sites.append(s)
                g_outs.append(masked(s, self._layout(s, derivs[k]) * s.tangent))
            accumulate_site_grads(sites, g_outs, params, grads)
            loss = value if loss is None else loss
        self.average(grads)
        _add_head_grads(where, loss_fn, heads, params, grads)
        return loss, grads

    def _layout(self, site: Site, d: Tensor) -> Tensor:
        u = site.tangent
        if d.dim() > 1:
            fn = local.layer_method(site.module, "local_loss_layout", "loss_layout")
            if self.groups and fn is not None:
                return fn(d).to(u.dtype)
            d = d.reshape(d.shape[0], -1).sum(1)
        return d.view(d.shape[0], *([1] * (u.dim() - 1))).to(u.dtype)


class LocalWeightForwardGradient(SampledEstimator):
    r"""Weight-perturbed forward gradient with local losses (``groups=True``: LG-FG-W, ``lg-fg-w``;
    ``groups=False``: L-FG-W, ``l-fg-w``).

    Every trainable parameter gets a tangent; a parameter inside block ``k`` is updated with the tangent
    derivative of block ``k``'s own losses (per group where its module implements
    :class:`fwdgrad.local.LocalLossLayer`); heads get their exact local gradient. Parameters outside every
    block and head get zero (the local-loss objective does not involve them).

    Args:
        num_directions: K weight tangents averaged per call.
        tangents: sampler name of :mod:`fwdgrad.directions`.
        groups: one local loss per patch and group (``True``: LG-FG-W) or one per block (``False``: L-FG-W).
        seed, generator: the source of randomness (at most one).
    """

    per_example_loss = True

    def __init__(
        self,
        num_directions: int = 1,
        tangents: str = "gaussian",
        *,
        groups: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_directions, tangents, seed=seed, generator=generator)
        self.groups = bool(groups)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        names = list(params)
        primals = [p.detach() for p in params.values()]
        owner_module = {}
        for mname, m in model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                owner_module[f"{mname}.{pname}" if mname else pname] = (m, pname)
        grads = _zeros_like_params(params)
        loss, heads = None, []
        step_loss = once_per_step(model, loss_fn)
        for _ in range(self.num_directions):
            tangents = [t[0] for t in SAMPLERS[self.tangents](primals, 1, self._generator)]
            with forward_mode(where, model), local.recording(self.groups):
                duals = {n: fwAD.make_dual(p, t) for n, p, t in zip(names, primals, tangents)}
                value, heads, derivs = call_with_parameters(
                    model, lambda m: _block_losses(where, loss_fn, m, step_loss), duals
                )
            blocks = [h.block for h in heads if h.split_logits is not None]
            owner = local.block_of(blocks)
            head_params = {id(p) for h in heads for p in h.head.parameters()}
            for n, t in zip(names, tangents):
                m, pname = owner_module[n]
                k = owner.get(id(m))
                if k is None or id(params[n]) in head_params:
                    continue
                grads[n] += self._layout(m, pname, derivs[k], t) * t
            loss = value if loss is None else loss
        self.average(grads)
        _add_head_grads(where, loss_fn, heads, params, grads)
        return loss, grads

    def _layout(self, module: nn.Module, pname: str, d: Tensor, t: Tensor) -> Tensor:
        fn = local.layer_method(module, "local_param_loss_layout", "param_loss_layout")
        if self.groups and d.dim() == 3 and fn is not None:
            return fn(pname, d.sum((0, 1))).to(t.dtype)
        return d.sum().to(t.dtype)


class LocalBackprop(Estimator):
    r"""Backprop inside each block on its local losses (``groups=False``: L-BP, ``l-bp``; ``groups=True``:
    LG-BP, ``lg-bp``).

    One ``backward`` of :math:`\text{read-out loss} + \sum_k (\text{head}_k \text{ loss} + \sum_s
    \ell(\text{split}_k[s]))`; the blocks are cut from one another, so every gradient stays inside its block.
    Works with scalar or per-example losses. The reported loss is the read-out's.

    Args:
        groups: one local loss per patch and group (``True``: LG-BP) or one per block (``False``: L-BP).
    """

    def __init__(self, *, groups: bool = False) -> None:
        self.groups = bool(groups)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        with torch.enable_grad(), local.recording(self.groups) as rec:
            value = loss_fn(model)
            heads = _check_heads(where, rec, model)
            total = value.mean()
            readouts = {id(h.head) for h in heads if h.split_logits is None}
            for h in heads:
                if h.split_logits is not None:  # the read-out's loss is ``value`` itself
                    if id(h.head) not in readouts:  # a block head that is also the read-out: counted once
                        total = total + local.replay_criterion(loss_fn, h.logits).mean()
                    split = h.split_logits
                    flat = split.reshape(split.shape[0], -1, split.shape[-1])
                    for j in range(flat.shape[1]):
                        total = total + local.replay_criterion(loss_fn, flat[:, j]).mean()
            out = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), out)}
        return value.detach().mean(), grads


def _local_recipe(
    name: str, cls: type[Estimator], groups: bool, base: str, lrs: dict[str, float], claims: tuple[str, ...]
) -> None:
    note = f"the {base} default (not swept for {name})"
    scales = "parameters" if cls is LocalWeightForwardGradient else None
    register_estimator(name, cls, preset={"groups": groups}, default_lr=lrs, lr_note=note, claims=claims,
                       needs="local-heads", lr_scales_with=scales)


_local_recipe("l-bp", LocalBackprop, False, "bp", BP_LR, ("grad", "fused"))
_local_recipe("lg-bp", LocalBackprop, True, "bp", BP_LR, ("grad", "fused"))
_local_recipe("l-fg-a", LocalActivityForwardGradient, False, "fg-a", FG_A_LR, ("no-backward", "grad", "fused"))
_local_recipe("lg-fg-a", LocalActivityForwardGradient, True, "fg-a", FG_A_LR, ("no-backward", "grad", "fused"))
_local_recipe("l-fg-w", LocalWeightForwardGradient, False, "fg-w", FG_W_LR, ("no-backward", "grad", "fused"))
_local_recipe("lg-fg-w", LocalWeightForwardGradient, True, "fg-w", FG_W_LR, ("no-backward", "grad", "fused"))

__all__: list[Any] = ["LocalActivityForwardGradient", "LocalBackprop", "LocalWeightForwardGradient"]
