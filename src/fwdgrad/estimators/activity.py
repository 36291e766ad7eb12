r"""Activity perturbation (FG-A): forward gradients that perturb the outputs of modules, not their weights.

Ren, Kornblith, Liao and Hinton (ICLR 2023), "Scaling Forward Gradient With Local Losses", Sections 3–4.

The estimator
-------------
Pick modules :math:`m_1 … m_L` (default: every ``nn.Linear`` and ``nn.Conv2d``). During one forward pass
with dual tensors, the output :math:`z_l` of each picked module gets an extra tangent :math:`u_l`, drawn
independently for every example (and module). For per-example losses :math:`\ell_b` (``loss_fn`` returns a
vector ``[B]``; the loss is its mean :math:`L = \frac1B\sum_b \ell_b`), the tangent of :math:`\ell_b` is

.. math:: d_b = \sum_l \langle \partial \ell_b / \partial z_{l,b},\, u_{l,b} \rangle

(examples do not interact, so only example ``b``'s tangents reach :math:`\ell_b`). The activation-gradient
estimate of module ``l`` and example ``b`` is :math:`\hat g_{z_{l,b}} = \frac1B d_b\, u_{l,b}`. Because the
:math:`u` are independent across modules and examples with :math:`E[u]=0`, :math:`E[u u^\top]=I`, every cross
term has mean zero and :math:`E[\hat g_{z_{l,b}}] = \partial L / \partial z_{l,b}`: one pass gives an unbiased
estimate for every module at once (the other modules' terms only add variance).

Weight gradients follow from each module's *local rule*, the exact vector-Jacobian product of the module
alone, applied to :math:`\hat g_z`. For ``nn.Linear`` (:math:`z = x W^\top + b`):
:math:`\hat g_W = \sum_b \hat g_{z_b}^\top x_b`, :math:`\hat g_b = \sum_b \hat g_{z_b}`; ``nn.Conv2d`` uses
``torch.nn.grad.conv2d_weight``; any other module is re-run on its stored input and differentiated with a
backward graph that spans that module only. Being linear in :math:`\hat g_z`, the weight estimate is unbiased
too. No backward pass through the network runs.

Variance (the paper's Table 1): for a layer with fan-in ``p`` and fan-out ``q``, weight perturbation has
:math:`E\|\hat g - g\|^2 \approx (pq+1)\,S` and activity perturbation :math:`(q+1)\,S` (Gaussian tangents,
one direction): about ``p`` times lower. Independent per-example tangents further divide the squared-norm
term by the batch size.

Options
-------
* ``skip_inactive=True`` (the paper's choice): an output that goes straight into an ``nn.ReLU`` module and is
  not positive has an exact zero gradient, so its estimate is set to zero (less variance, still unbiased).
  Only ``nn.ReLU`` *modules* are detected (not ``F.relu`` calls).
* ``shared_noise=True``: one tangent shared by all examples of the batch (per-example losses still required).
* A scalar ``loss_fn`` (no per-example losses): the tangents stay independent per example but only their
  joint derivative :math:`d = \sum_b \langle \partial L/\partial z_b, u_b\rangle` is observed; the estimate
  :math:`d\,u_b` is still unbiased but its variance grows with the whole batch's activation size (like weight
  perturbation of the batch). A tangent *shared* across the batch cannot be used with a scalar loss: the
  estimate :math:`d\,u` of :math:`\partial L/\partial z_b` would then contain the other examples' gradients
  (its mean is :math:`\sum_{b'} \partial L/\partial z_{b'}`), i.e. it is biased; that combination raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad import local
from fwdgrad.derivatives import (
    RULES,
    forward_mode,
    is_activity_layer,
    local_weight_grads,
    module_directions,
    once_per_step,
)
from fwdgrad.derivatives.watch import UsesOutside
from fwdgrad.directions import SAMPLERS, TangentSource
from fwdgrad.directions.stateful import BoundMomentum, MomentumDirections, MomentumState
from fwdgrad.estimators.base import LossFn, SampledEstimator
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor
ModuleSelection = Sequence[type] | Sequence[str] | Callable[[str, nn.Module], bool] | None

#: Default learning rates of fg-a, by optimizer (docs/cli.md). SGD: 3e-3 was the best of a 50-epoch sweep on
#: MNIST-1D's mlp (37.5 % against 30.5 % at 1e-3) but diverged in one epoch on MNIST's fdfa-cnn (loss 2.33 →
#: 6.39), and fg-a-momentum at 3e-3 on MNIST's fdfa-mlp (→ 5.00): the estimate's variance grows with the
#: number of perturbed activations (1,610 per example in fdfa-mlp, the convolutions' feature maps in fdfa-cnn,
#: 522 in the reference mlp). 1e-3 stayed stable on every pair measured.
FG_A_LR = {"sgd": 1e-3, "adam": 1e-3}


def _default_pick(name: str, m: nn.Module) -> bool:
    """Every module with a registered per-layer rule (``nn.Linear``, ``nn.Conv2d`` and their subclasses) and
    every :class:`fwdgrad.derivatives.ActivityLayer`."""
    return isinstance(m, tuple(RULES)) or is_activity_layer(m)


def select_modules(where: str, model: nn.Module, modules: ModuleSelection = None) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are perturbed, as ``(qualified name, module)`` in registration order.

    ``modules`` may be ``None`` (every ``nn.Linear``, ``nn.Conv2d`` and
    :class:`~fwdgrad.derivatives.ActivityLayer`), a sequence of module types, a sequence of qualified names,
    or a predicate
    ``(name, module) -> bool``. A module inside an already picked module is skipped: the outer one wins.
    """
    named = list(model.named_modules())
    if modules is None:
        pick = _default_pick
    elif callable(modules) and not isinstance(modules, type):
        pick = modules
    else:
        items = list(modules)
        if items and all(isinstance(t, type) for t in items):
            types = tuple(items)
            pick = lambda n, m: isinstance(m, types)
        elif items and all(isinstance(t, str) for t in items):
            known = {n for n, _ in named}
            unknown = [t for t in items if t not in known]
            if unknown:
                raise ValueError(f"{where}: modules {unknown} are not in the model; known: {sorted(known)[:10]}…")
            wanted = set(items)
            pick = lambda n, m: n in wanted
        else:
            raise ValueError(f"{where}: modules must be types, qualified names or a predicate, got {modules!r}")
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in named:
        if any(name.startswith(c + ".") or c == "" for c, _ in chosen):
            continue
        if pick(name, m):
            chosen.append((name, m))
    if not chosen:
        raise ValueError(f"{where}: no module of {type(model).__name__} matches modules={modules!r}")
    return chosen


@dataclasses.dataclass
class Site:
    """One call of a perturbed module during the forward pass.

    Attributes:
        name: qualified name of the module in the model.
        module: the module.
        inputs: its positional inputs (primal values, detached).
        output: its output as handed to the rest of the network (a dual tensor).
        tangent: ``u``, the tangent added to its output, shape of the output.
        mask: ``False`` where the output feeds an ``nn.ReLU`` and is not positive (``None``: no mask).
    """

    name: str
    module: nn.Module
    inputs: tuple[Any, ...]
    output: Tensor
    tangent: Tensor
    mask: Tensor | None = None


class ActivityPerturbation:
    """Context manager that adds an independent tangent to the output of every picked module.

    Use inside ``torch.autograd.forward_ad.dual_level()``. ``sites`` lists every call in forward order.
    Tangents come from ``sampler`` (a name of :data:`fwdgrad.directions.SAMPLERS`) with ``generator``; with
    ``shared_noise`` one draw of the per-example shape is broadcast over the batch (dimension 0).
    """

    def __init__(
        self,
        model: nn.Module,
        chosen: list[tuple[str, nn.Module]],
        sampler: str,
        generator: torch.Generator | None,
        *,
        shared_noise: bool = False,
        skip_inactive: bool = True,
    ) -> None:
        self.model = model
        self.chosen = chosen
        self.sampler = SAMPLERS[sampler]
        self.generator = generator
        self.shared_noise = shared_noise
        self.skip_inactive = skip_inactive
        self.sites: list[Site] = []
        self._by_output: dict[int, Site] = {}
        self._handles: list[Any] = []

    def _perturb(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor) or not output.dtype.is_floating_point:
            raise TypeError(
                f"fwdgrad.ActivityForwardGradient: module {name!r} ({type(module).__name__}) must return one "
                f"floating-point tensor to be perturbed, got {type(output).__name__}"
            )
        primal, incoming = fwAD.unpack_dual(output)
        like = primal[0] if self.shared_noise else primal
        u = self.sampler([like.detach()], 1, self.generator)[0][0]
        if self.shared_noise:
            u = u.unsqueeze(0).expand_as(primal)
        # the output keeps the tangent it already carries (from earlier perturbations) and gains u
        out = fwAD.make_dual(primal.detach(), u if incoming is None else incoming + u)
        inputs = tuple(fwAD.unpack_dual(a).primal.detach() if isinstance(a, Tensor) else a for a in args)
        site = Site(name, module, inputs, out, u)
        self.sites.append(site)
        self._by_output[id(out)] = site
        return out

    def _relu_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            site = self._by_output.get(id(args[0]))
            if site is not None and site.output is args[0]:
                site.mask = fwAD.unpack_dual(args[0]).primal.detach() > 0

    def __enter__(self) -> ActivityPerturbation:
        for name, module in self.chosen:
            hook = lambda m, a, o, _n=name: self._perturb(_n, m, a, o)
            # first of the module's own hooks: the site is what its forward returned (the weight rule's
            # output); forward hooks of the user's run after it, in forward mode, as the rest of the network
            self._handles.append(module.register_forward_hook(hook, prepend=True))
        if self.skip_inactive:
            for m in self.model.modules():
                if isinstance(m, nn.ReLU):
                    self._handles.append(m.register_forward_pre_hook(self._relu_pre))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_output.clear()


def local_param_grads(site: Site, grad_output: Tensor) -> dict[str, Tensor]:
    """Parameter gradients (names relative to ``site.module``) from the gradient of its output: the
    module's local rule (:func:`fwdgrad.derivatives.local_weight_grads`)."""
    return local_weight_grads(site.module, site.inputs, grad_output)


def uncovered_parameters(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], params: dict[str, nn.Parameter]
) -> dict[str, str]:
    """Trainable parameters that perturbing ``chosen`` cannot reach, with the reason: registered in no
    perturbed module, or also registered in a module outside them (a tied weight)."""
    inside = {id(sub) for _, m in chosen for sub in m.modules()}
    reached = {id(p) for _, m in chosen for p in m.parameters()}
    outside = {id(p) for m in model.modules() if id(m) not in inside for p in m._parameters.values() if p is not None}
    out = {}
    for n, p in params.items():
        if id(p) not in reached:
            out[n] = "in no perturbed module"
        elif id(p) in outside:
            out[n] = "tied to a module that is not perturbed"
    return out


def refuse_batch_coupling(where: str, model: nn.Module) -> None:
    """Raise ``ValueError`` when a module of ``model`` normalises with *batch* statistics (BatchNorm in
    training mode, or without running statistics), before anything runs.

    Such a module couples the examples of a batch: example ``b``'s loss then depends on every example's
    perturbed activities, the per-example derivative ``d_b`` carries the other examples' tangents, and
    ``d_b/B · u_b`` is biased (measured: 0.23 from the gradient however many directions are averaged). In
    eval mode BatchNorm is a per-channel affine map and activity perturbation is exact in expectation."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            raise ValueError(
                f"{where}: {type(m).__name__} {name!r} normalises with batch statistics (training mode), which "
                "couples the examples and biases activity perturbation; call model.eval() on it, use a "
                "per-example norm (LayerNorm, GroupNorm) or weight perturbation ('fg-w')"
            )


def _coverage_error(where: str, uncovered: dict[str, str]) -> ValueError:
    listed = "; ".join(f"{n} ({why})" for n, why in list(uncovered.items())[:8])
    more = f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else ""
    return ValueError(
        f"{where}: activity perturbation cannot estimate the gradient of {len(uncovered)} parameter(s): "
        f"{listed}{more}. It would give them exactly zero. Perturb the modules that use them (modules=...), "
        "freeze them (requires_grad_(False)), or use weight perturbation ('fg-w') for this model"
    )


def accumulate_site_grads(
    sites: list[Site], grad_outputs: list[Tensor], params: dict[str, nn.Parameter], grads: dict[str, Tensor],
) -> None:
    """Add every site's local-rule parameter gradients into ``grads`` (keyed by the model's names)."""
    name_of = {id(p): n for n, p in params.items()}
    for site, g in zip(sites, grad_outputs):
        for local_name, gr in local_param_grads(site, g).items():
            p = site.module.get_parameter(local_name)
            full = name_of.get(id(p))
            if full is None:  # frozen or not trainable
                continue
            grads[full] = grads[full] + gr.to(grads[full].dtype)


def masked(site: Site, g: Tensor) -> Tensor:
    """``g`` with the entries of inactive ReLU inputs set to zero (when the site has a mask)."""
    return g if site.mask is None else g * site.mask


class ActivityForwardGradient(SampledEstimator):
    r"""Forward gradient with activity perturbation (FG-A), Ren et al. (ICLR 2023).

    See the module docstring for the math. ``loss_fn`` should return per-example losses ``[B]``
    (``F.cross_entropy(m(x), y, reduction="none")``); the reported loss is their mean. A scalar loss falls
    back to the batch-level derivative (unbiased, higher variance); see the module docstring.

    Args:
        num_directions: K independent forward passes averaged per call.
        tangents: sampler name of :mod:`fwdgrad.directions` (drawn per module output).
        modules: which modules to perturb (see :func:`select_modules`); default every ``nn.Linear``,
            ``nn.Conv2d`` and :class:`~fwdgrad.derivatives.ActivityLayer`.
        skip_inactive: zero the estimate of outputs that feed an ``nn.ReLU`` and are not positive.
        shared_noise: one tangent for the whole batch instead of one per example.
        exact_output: when the model's output ``[B, C]`` is itself the output of a perturbed module (a
            read-out ``nn.Linear``) and the losses are per example, that module is not perturbed but gets its exact
            gradient: ``∂ℓ_b/∂output_b`` comes from ``C`` forward-mode passes through the criterion alone
            (:func:`fwdgrad.local.criterion_gradient`), then the module's local rule. As in the paper, whose
            classification layer is always trained with its exact gradient.
        directions: ``"sampled"`` (fresh activity tangents every step) or ``"momentum"`` (Silver et al. 2022,
            carried to activity perturbation): the unit direction ``u`` of a running average (decay
            ``direction_beta``) of past *weight-space* estimates is a guess; one more forward-mode pass gives
            the exact derivative along it, ``⟨∇L, u⟩``, by a weight tangent, and the step is
            ``ĝ = ĝ_A + (⟨∇L,u⟩ − ⟨ĝ_A,u⟩) u = ⟨∇L,u⟩u + (I − uuᵀ)ĝ_A`` with ``ĝ_A`` the activity estimate
            above: unbiased for any ``u`` (``E[ĝ_A] = ∇L``), exact along ``u``, K + 1 passes. ``u`` covers
            the parameters with a noisy estimate only (an ``exact_output`` read-out keeps its exact
            gradient). Why the weight space: docs/directions.md.
        direction_beta: the decay of the running average for ``directions="momentum"``, in ``[0, 1)``.
        seed, generator: the source of randomness (exclusive).

    A trainable parameter that the perturbed modules cannot reach (registered in no perturbed module, tied
    into another one, or used outside their forward, as in ``nn.LSTM`` or ``nn.MultiheadAttention``)
    raises ``ValueError`` naming it: the estimate would be a silent zero. So does BatchNorm normalising with
    batch statistics (training mode): it couples the examples and biases the estimate
    (:func:`refuse_batch_coupling`); in eval mode it is supported. Buffers move once per step, whatever K is.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> est = fwdgrad.estimator("fg-a", seed=0)
        >>> loss = est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
        >>> model[0].weight.grad.shape
        torch.Size([8, 4])
    """

    per_example_loss = True

    def __init__(
        self,
        num_directions: int = 1,
        tangents: str = "gaussian",
        *,
        modules: ModuleSelection = None,
        skip_inactive: bool = True,
        shared_noise: bool = False,
        exact_output: bool = True,
        directions: str = "sampled",
        direction_beta: float = 0.9,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_directions, tangents, seed=seed, generator=generator)
        where = type(self).__name__
        if directions not in DIRECTIONS:
            raise ValueError(f"{where}: directions must be one of {DIRECTIONS}, got {directions!r}")
        if (isinstance(direction_beta, bool) or not isinstance(direction_beta, int | float)
                or not 0 <= direction_beta < 1):
            raise ValueError(f"{where}: direction_beta must be a float in [0, 1), got {direction_beta!r}")
        self.modules = modules
        self.skip_inactive = bool(skip_inactive)
        self.shared_noise = bool(shared_noise)
        self.exact_output = bool(exact_output)
        self._momentum: BoundMomentum | None = None
        if directions != "sampled":  # non-default choices only: the default repr stays as it was
            self.directions = directions
            self.direction_beta = float(direction_beta)
            self._momentum = BoundMomentum(MomentumDirections(direction_beta))

    _state_attributes = ("_momentum",)

    def _extra_state(self) -> dict[str, Any] | None:
        """The running average of ``directions="momentum"`` (``{"average", "count"}``), else ``None``."""
        return None if self._momentum is None else self._momentum.state_dict()

    def _load_extra_state(self, state: dict[str, Any] | None) -> None:
        if self._momentum is None:
            if state is not None:
                raise ValueError(f"{type(self).__name__}.load_state_dict: this estimator keeps no state "
                                 "(directions='sampled'), got a saved state")
            return
        self._momentum.load_state_dict(state)

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        step_loss = once_per_step(model, loss_fn)
        loss, grads, exact = self._sampled(where, model, step_loss, loss_fn, params)
        if self._momentum is not None:
            self._add_guess(where, model, step_loss, params, grads, exact)
        return loss, grads

    def _add_guess(
        self, where: str, model: nn.Module, step_loss: LossFn, params: dict[str, nn.Parameter],
        grads: dict[str, Tensor], exact: set[str],
    ) -> None:
        """``ĝ ← ĝ + (⟨∇L,u⟩ − ⟨ĝ,u⟩) u`` on the noisy parameters (in place), then the average's update."""
        assert self._momentum is not None
        state = self._momentum.bind(list(params.values()))
        noisy = [i for i, n in enumerate(params) if n not in exact]
        names = list(params)
        u = self._momentum.source.guess(MomentumState([state.average[i] for i in noisy], state.count))
        if u is not None:
            sub = {names[i]: params[names[i]] for i in noisy}
            along = TangentSource.given([p.detach() for p in sub.values()], [t.unsqueeze(0) for t in u])
            _, du = module_directions(model, lambda m: step_loss(m).mean(), sub, along, where=where)
            c = sum((grads[n].to(t.dtype) * t).sum() for n, t in zip(sub, u))
            alpha = float(du[0] - c)
            for n, t in zip(sub, u):
                grads[n].add_(t.to(grads[n].dtype), alpha=alpha)
        if all(bool(torch.isfinite(g).all()) for g in grads.values()):  # a non-finite step leaves the state
            self._momentum.update(state, [grads[n] for n in names])

    def _sampled(
        self, where: str, model: nn.Module, step_loss: LossFn, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor], set[str]]:
        """The activity estimate averaged over K passes, and the names of the parameters it gives exactly
        (an ``exact_output`` read-out's, in every pass)."""
        refuse_batch_coupling(where, model)
        chosen = select_modules(where, model, self.modules)
        uncovered = uncovered_parameters(model, chosen, params)
        if uncovered:
            raise _coverage_error(where, uncovered)
        grads = {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for n, p in params.items()}
        loss = None
        exact: set[str] | None = None
        name_of = {id(p): n for n, p in params.items()}
        for k in range(self.num_directions):
            pert = ActivityPerturbation(
                model, chosen, self.tangents, self._generator,
                shared_noise=self.shared_noise, skip_inactive=self.skip_inactive,
            )
            outputs: list[Tensor] = []
            with forward_mode(where, model), pert:
                handle = model.register_forward_hook(lambda m, a, o, c=outputs: c.append(o))
                try:
                    if k == 0:  # the first pass also checks that no parameter is used outside its module
                        value = _watching_uses(where, model, chosen, params, lambda: step_loss(model))
                    else:
                        value = step_loss(model)
                finally:
                    handle.remove()
                primal, d = _unpack_loss(where, value)
            sites = pert.sites
            if not sites:
                raise ValueError(f"{where}: loss_fn(model) did not call any perturbed module")
            output_site, delta = None, None
            if self.exact_output and d.dim() == 1 and outputs:
                output_site = next((s for s in sites if s.output is outputs[0] and s.output.dim() == 2), None)
            if output_site is not None:
                # exact ∂ℓ_b/∂output_b; remove the output's own (now known) term from every d_b
                delta = local.criterion_gradient(where, loss_fn, output_site.output).to(d.dtype)
                d = d - (delta * output_site.tangent).reshape(d.shape[0], -1).sum(1)
            g_outs = []
            for s in sites:
                if s is output_site:
                    g_outs.append(delta / d.shape[0])
                else:
                    g_outs.append(masked(s, _spread(where, s, d, self.shared_noise)))
            accumulate_site_grads(sites, g_outs, params, grads)
            loss = primal if loss is None else loss
            here = set() if output_site is None else {
                name_of[id(p)] for p in output_site.module.parameters() if id(p) in name_of}
            exact = here if exact is None else exact & here
        return loss, self.average(grads), exact or set()




DIRECTIONS = ("sampled", "momentum")

register_estimator(
    "fg-a", ActivityForwardGradient, default_lr=FG_A_LR, claims=("unbiased", "no-backward", "grad", "fused")
)
register_estimator(
    "fg-a-momentum", ActivityForwardGradient, preset={"directions": "momentum"}, default_lr=FG_A_LR,
    lr_note="fg-a's default learning rates (not swept for the momentum guess)",
    claims=("unbiased", "no-backward", "grad", "fused"),
)


def _watching_uses(
    where: str, model: nn.Module, chosen: list[tuple[str, nn.Module]], params: dict[str, nn.Parameter],
    run: Callable[[], Any],
) -> Any:
    """``run()`` while recording any use of a trainable parameter outside the perturbed module that owns it;
    such a use (a tied weight through ``F.linear``, a submodule's weight used by its parent) raises."""
    trainable = {id(p) for p in params.values()}  # a frozen weight used elsewhere (a tied lm_head) needs no estimate
    owner: dict[int, set[nn.Module]] = {}
    for _, m in chosen:
        for p in m.parameters():
            if id(p) in trainable:
                owner.setdefault(id(p), set()).add(m)
    tracker = UsesOutside(owner)
    handles = []
    for _, m in chosen:
        handles.append(m.register_forward_pre_hook(tracker.enter))
        handles.append(m.register_forward_hook(tracker.leave, always_call=True))
    try:
        with tracker:
            value = run()
    finally:
        for h in handles:
            h.remove()
    names = {id(p): n for n, p in params.items()}
    outside = {names[i]: "used outside its module's forward" for i in tracker.outside if i in names}
    if outside:
        raise _coverage_error(where, outside)
    return value


def _unpack_loss(where: str, value: Any) -> tuple[Tensor, Tensor]:
    """``(mean loss, tangent)`` of ``loss_fn``'s output: tangent ``[B]`` (vector) or ``[]`` (scalar)."""
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{where}: loss_fn must return a floating-point tensor, got {type(value).__name__}")
    if value.dim() > 1:
        raise ValueError(f"{where}: loss_fn must return a scalar or per-example losses [B], got {tuple(value.shape)}")
    primal, tangent = fwAD.unpack_dual(value)
    if tangent is None:
        tangent = torch.zeros_like(primal)
    return primal.detach().mean(), tangent.detach()


def _spread(where: str, site: Site, d: Tensor, shared_noise: bool) -> Tensor:
    """The activation-gradient estimate of a site from the loss tangent ``d``: ``d_b/B · u_b`` (vector
    loss) or ``d · u`` (scalar loss)."""
    u = site.tangent
    if d.dim() == 0:
        if shared_noise:
            raise ValueError(
                f"{where}: shared_noise=True needs per-example losses; with a scalar loss the estimate is "
                "biased. Return F.cross_entropy(..., reduction='none') or use shared_noise=False"
            )
        return d * u
    b = d.shape[0]
    if u.shape[0] != b:
        raise ValueError(
            f"{where}: module {site.name!r} has output batch size {u.shape[0]} but loss_fn returned {b} "
            "per-example losses; the first dimension of every perturbed output must be the batch"
        )
    return (d / b).view(b, *([1] * (u.dim() - 1))).to(u.dtype) * u
