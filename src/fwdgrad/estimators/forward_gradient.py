"""Weight perturbation: the forward gradient of Baydin et al. (2022), "Gradients without Backpropagation"."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad import local
from fwdgrad.derivatives import local_weight_grads, module_directions, once_per_step
from fwdgrad.derivatives.watch import restore_buffers, snapshot_buffers
from fwdgrad.directions import TangentSource
from fwdgrad.directions import source as tangent_source
from fwdgrad.directions.stateful import BoundMomentum, MomentumDirections, MomentumState
from fwdgrad.estimators.base import LossFn, SampledEstimator
from fwdgrad.estimators.gradient import ExplicitGradient, Gradient, ImplicitGradient, PartlyImplicitGradient
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

#: Default learning rates of fg-w, by optimizer: chosen by validation accuracy on the default task (MNIST-1D,
#: mlp width 256 depth 2, batch 128, 50-60 epochs, SGD momentum 0.9 or Adam); sweeps in docs/cli.md.
FG_W_LR = {"sgd": 1e-4, "adam": 1e-3}


class ForwardGradient(SampledEstimator):
    r"""Forward gradient with weight perturbation (FG-W).

    For the trainable parameters ``θ`` (all of them, flattened, ``n`` entries) and K tangents ``v_k``:

    .. math:: \hat g = \frac1K \sum_k \langle \nabla_\theta L(\theta), v_k\rangle\, v_k

    Each ``⟨∇L, v_k⟩`` is a forward-mode JVP through ``loss_fn(model)``; no backward pass runs and no
    activation is kept for one. ``E[ĝ] = ∇L``; the variance grows with ``n`` (see
    :func:`fwdgrad.variance_factor`), so forward gradients want smaller learning rates than backprop.

    Args:
        num_directions: K, tangents averaged per call.
        tangents: sampler name, see :mod:`fwdgrad.directions`.
        seed: seed of a private ``torch.Generator`` (exclusive with ``generator``).
        generator: the generator to draw from; ``None`` with no seed uses torch's global RNG.
        chunk_size: at most this many directions per forward pass (bounds memory).
        fast_paths: use the per-module passes of :mod:`fwdgrad.derivatives`; ``False`` forces the reference
            path. Both draw the same tangents and give the same estimate up to rounding.
        readout: ``"perturb"`` (Baydin et al.: every parameter is perturbed) or ``"exact"`` (Ren et al.'s
            official FG-W: the read-out layer is not perturbed and gets its exact local gradient
            :math:`\hat g_W = \delta^\top x`, :math:`\hat g_b = \sum_b \delta_b`, from
            :math:`\delta = \partial L/\partial \text{logits}` obtained in forward mode through the
            criterion alone — no backward through the network). The read-out is ``model.fwdgrad_readout``
            (a module or its qualified name) when the model names it, else the last ``nn.Linear``; its
            output must be the model's output, and ``loss_fn`` must call the model once and apply a
            criterion to its output (see :func:`fwdgrad.local.replay_criterion`).
        directions: ``"sampled"`` (fresh tangents every step) or ``"momentum"`` (Silver et al. 2022: the unit
            direction ``u`` of a running average of past estimates, decay ``direction_beta``, is a guess;
            the step adds the exact derivative along ``u`` to K fresh directions projected off it,
            ``ĝ = ⟨∇L,u⟩u + (I − uuᵀ)(1/K)Σ⟨∇L,v_k⟩v_k``: unbiased, exact along ``u``, K + 1 derivatives;
            :mod:`fwdgrad.directions.stateful`).
            ``"mixed"`` (Silver et al.'s own, biased form, one derivative per direction as ``"sampled"``): each
            tangent mixes the guess with fresh noise, ``v_k = β·√n·u + √(1 − β²)·ε_k`` (``β = guess_weight``,
            ``n`` parameters), and ``ĝ = (1/K)Σ⟨∇L,v_k⟩v_k``. Its mean given ``u`` is
            ``(1 − β²)∇L + β²n⟨∇L,u⟩u``, a positive-definite rescaling of ``∇L`` (a descent direction, not
            ``∇L``): biased, its component along ``u`` scaled by ``1 − β² + β²n``, at the cost of plain
            directions (Silver et al. 2022; ``docs/directions.md`` measures it on MNIST).
        direction_beta: the decay of the running average for ``directions="momentum"`` and ``"mixed"``.
        guess_weight: ``β`` of ``directions="mixed"``, in ``(0, 1)`` (default 0.3); only with ``"mixed"``.
        aggregation: ``"mean"`` (the mean over the K directions) or ``"projection"`` (Flügel et al. 2025:
            the orthogonal projection of ``∇L`` onto the span of the K directions, scaled to be unbiased,
            ``ĝ = (n/K)·B(BᵀB)⁻¹Bᵀ∇L`` with ``B = [v_1 … v_K]``; needs a rotation-invariant sampler,
            ``gaussian`` or ``sphere``, for which ``E[B(BᵀB)⁻¹Bᵀ] = (K/n)·I``).

    A step yields an implicit gradient (the loss, the K directional derivatives and the tangent source), so
    :meth:`sgd_step` updates the parameters tensor by tensor from regenerated tangents without forming
    ``ĝ``. Speed and memory: ``docs/performance.md``.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> est = fwdgrad.estimator("fg-w", num_directions=4, seed=0)
        >>> loss = est(model, lambda m: F.cross_entropy(m(x), y))
        >>> model.weight.grad.shape
        torch.Size([2, 4])
    """

    batches_directions: ClassVar[bool] = True

    def __init__(
        self,
        num_directions: int = 1,
        tangents: str = "gaussian",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        fast_paths: bool = True,
        readout: str = "perturb",
        directions: str = "sampled",
        direction_beta: float = 0.9,
        aggregation: str = "mean",
        guess_weight: float | None = None,
    ) -> None:
        super().__init__(num_directions, tangents, seed=seed, generator=generator, chunk_size=chunk_size)
        if not isinstance(fast_paths, bool):
            raise TypeError(f"{type(self).__name__}: fast_paths must be a bool, got {fast_paths!r}")
        if readout not in READOUTS:
            raise ValueError(f"{type(self).__name__}: readout must be one of {READOUTS}, got {readout!r}")
        if directions not in DIRECTIONS:
            raise ValueError(f"{type(self).__name__}: directions must be one of {DIRECTIONS}, got {directions!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if aggregation == "projection" and tangents not in ("gaussian", "sphere"):
            raise ValueError(
                f"{type(self).__name__}: aggregation='projection' is unbiased only for rotation-invariant "
                f"directions; use tangents='gaussian' or 'sphere', got {tangents!r}"
            )
        if directions != "sampled" and (readout != "perturb" or aggregation != "mean"):
            raise ValueError(f"{type(self).__name__}: directions={directions!r} goes with readout='perturb' and "
                             "aggregation='mean'")
        if guess_weight is not None and directions != "mixed":
            raise ValueError(f"{type(self).__name__}: guess_weight is an option of directions='mixed', got "
                             f"guess_weight={guess_weight!r} with directions={directions!r}")
        if directions == "mixed":
            guess_weight = 0.3 if guess_weight is None else guess_weight
            if isinstance(guess_weight, bool) or not isinstance(guess_weight, int | float) or not 0 < guess_weight < 1:
                raise ValueError(f"{type(self).__name__}: guess_weight must be in (0, 1), got {guess_weight!r}")
            self.guess_weight = float(guess_weight)
        self._fast_paths = fast_paths  # private: the repr shows the estimator's hyperparameters only
        # non-default choices only, so the repr of the default estimator stays as it was
        for key, value, default in (("readout", readout, "perturb"), ("directions", directions, "sampled"),
                                    ("aggregation", aggregation, "mean")):
            if value != default:
                setattr(self, key, value)
        self._momentum: BoundMomentum | None = None
        if directions != "sampled":
            self._momentum = BoundMomentum(MomentumDirections(direction_beta))
            self.direction_beta = float(direction_beta)

    @property
    def fast_paths(self) -> bool:
        """Whether the per-module passes are used (``False``: the reference path)."""
        return self._fast_paths

    _state_attributes = ("_momentum",)

    def _extra_state(self) -> dict[str, Any] | None:
        """The running average of stateful directions (``directions="momentum"`` or ``"mixed"``):
        ``{"average": [tensors], "count": int}``, or ``None``."""
        return None if self._momentum is None else self._momentum.state_dict()

    def _load_extra_state(self, state: dict[str, Any] | None) -> None:
        if self._momentum is not None:
            self._momentum.load_state_dict(state)
        elif state is not None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: this estimator keeps no direction state "
                             "(directions='sampled'), got a saved one")

    def _step_into_grad(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> Tensor:
        """``p.grad += ĝ``. When every ``.grad`` is zero (``zero_grad(set_to_none=False)``) and one dense
        direction is drawn, each tangent is drawn into its ``.grad``'s storage and scaled there by
        ``⟨∇L, v⟩``: one draw a step and no model-sized temporary (else the tangents are drawn again when
        added); an error or a non-finite estimate leaves the ``.grad`` zero."""
        homes = self._zero_grads(params)
        if homes is None:
            return super()._step_into_grad(where, model, loss_fn, params)
        try:
            grad = self._perturbed(where, model, loss_fn, params, False, homes=homes)
            grad.accumulate(where, list(params.values()), list(params))
        except BaseException:
            for h in homes:  # they held tangents: zero again, as they were
                h.zero_()
            raise
        return grad.loss.detach()

    def _zero_grads(self, params: dict[str, nn.Parameter]) -> list[Tensor] | None:
        """Every ``.grad``, when all are zero and may hold the step's one dense tangent each, else ``None`` (also
        for a small model, :data:`~fwdgrad.directions.source.KEEP_SMALL_BYTES`: its kept tangents cost less
        than the zero test's ops)."""
        plain = (type(self).step is ForwardGradient.step and self.tangents in ("gaussian", "rademacher")
                 and self.num_directions == 1 and self._momentum is None
                 and getattr(self, "readout", "perturb") == "perturb"
                 and getattr(self, "aggregation", "mean") == "mean")
        if not plain or sum(p.numel() * p.element_size() for p in params.values()) <= tangent_source.KEEP_SMALL_BYTES:
            return None
        grads = [p.grad for p in params.values()]
        if any(
            g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or not g.is_contiguous()
            or g.requires_grad for g, p in zip(grads, params.values())
        ) or len({id(g) for g in grads}) != len(grads):
            return None
        with torch.no_grad():  # one host read: every tensor's min and max are 0 (aminmax: one vectorised pass)
            ends = [end for g in grads if g.numel() for end in torch.aminmax(g)]
            if ends and bool(torch.stack(ends).any()):
                return None
        return grads  # type: ignore[return-value]

    def step(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], *, lean: bool = False
    ) -> Gradient:
        where = f"{type(self).__name__}.{'sgd_step' if lean else '__call__'}"
        if getattr(self, "readout", "perturb") == "exact":
            return self._step_exact_readout(where, model, loss_fn, params, lean)
        if self._momentum is not None:
            return self._step_momentum(where, model, loss_fn, params)
        grad = self._perturbed(where, model, loss_fn, params, lean)
        if getattr(self, "aggregation", "mean") == "projection":
            grad = _projected(grad)
        return grad

    def _step_momentum(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> Gradient:
        assert self._momentum is not None
        state = self._momentum.bind(list(params.values()))
        if getattr(self, "directions", "sampled") == "mixed":
            return self._step_mixed(where, model, loss_fn, params, state)
        step_loss = once_per_step(model, loss_fn)  # buffers move once over both passes
        fresh = self._perturbed(where, model, step_loss, params, False)
        u = self._momentum.source.guess(state)
        if u is None:
            grads = fresh.materialise()
        else:
            along = TangentSource.given(fresh.source.primals, [t.unsqueeze(0) for t in u])
            _, du = module_directions(model, step_loss, params, along, where=where, fast=self.fast_paths)
            k = fresh.dirs.shape[0]
            c = sum(fresh.source.inner(i, t) for i, t in enumerate(u))  # ⟨v_k, u⟩, [K]
            alpha = du[0] - (fresh.dirs.to(c.dtype) * c).sum() / k
            grads = [g.add_(t, alpha=float(alpha)) for g, t in zip(fresh.materialise(), u)]
        out = ExplicitGradient(fresh.loss, grads)
        if torch.isfinite(fresh.dirs).all() and all(bool(torch.isfinite(g).all()) for g in grads):
            self._momentum.update(state, grads)  # a non-finite step leaves the state as it was
        return out

    def _step_mixed(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], state: MomentumState
    ) -> Gradient:
        """``directions="mixed"``: one pass along ``v_k = β√n·u + √(1−β²)·ε_k`` (plain sampled directions
        until the running average has a direction)."""
        assert self._momentum is not None
        u = self._momentum.source.guess(state)
        if u is None:
            grad = self._perturbed(where, model, loss_fn, params, False)
        else:
            primals = [p.detach() for p in params.values()]
            noise = TangentSource(self.tangents, primals, self.num_directions, self._generator)
            a = self.guess_weight * math.sqrt(sum(p.numel() for p in primals))
            b = math.sqrt(1.0 - self.guess_weight**2)
            blocks = [noise.materialise_one(i).mul(b).add_(t.unsqueeze(0), alpha=a) for i, t in enumerate(u)]
            source = TangentSource.given(primals, blocks)
            loss, dirs = module_directions(model, loss_fn, params, source, where=where, fast=self.fast_paths)
            grad = ImplicitGradient(loss, dirs, source)
        grads = grad.materialise()
        if torch.isfinite(grad.dirs).all() and all(bool(torch.isfinite(g).all()) for g in grads):
            self._momentum.update(state, grads)  # a non-finite step leaves the state as it was
        return ExplicitGradient(grad.loss, grads)

    def _perturbed(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], lean: bool,
        homes: list[Tensor] | None = None,
    ) -> ImplicitGradient:
        primals = [p.detach() for p in params.values()]
        # keep the tangents only where it is the cheaper way (TangentSource.worth_keeping); else each tensor's
        # directions are drawn again from their seeds as they are added: no model-sized temporary. Zero .grads
        # lent as the tangents' storage (homes) cost nothing to keep.
        keep = homes is not None or (not lean and TangentSource.worth_keeping(
            self.tangents, self.num_directions, primals, all(p.grad is None for p in params.values()), self.chunk_size))
        source = TangentSource(self.tangents, primals, self.num_directions, self._generator,
                               lean=not keep and TangentSource.lean_possible(self.tangents), into=homes)
        loss, dirs = module_directions(
            model, loss_fn, params, source, where=where, chunk_size=self.chunk_size, fast=self.fast_paths
        )
        return ImplicitGradient(loss, dirs, source)

    def _step_exact_readout(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], lean: bool
    ) -> Gradient:
        head = readout_module(where, model)
        head_ids = {id(p) for p in head.parameters()}
        hidden = {n: p for n, p in params.items() if id(p) not in head_ids}
        if not hidden:
            raise ValueError(f"{where}: readout='exact' leaves no parameter to perturb; use readout='perturb'")
        seen = _ReadoutCapture(model, head)
        with seen:
            implicit = self._perturbed(where, model, loss_fn, hidden, lean)
        if seen.logits is None and seen.model_args is not None:
            # the batched pass ran under vmap: capture with one plain forward, buffers left as the step left them
            saved = snapshot_buffers(model)
            with seen, torch.no_grad():
                model(*seen.model_args)
            restore_buffers(saved)
        seen.check(where)
        delta = readout_delta(where, loss_fn, seen.logits)
        grads = local_weight_grads(head, (seen.inputs,), delta)
        index = {id(p): i for i, p in enumerate(params.values())}
        explicit = {index[id(head.get_parameter(n))]: g for n, g in grads.items() if id(head.get_parameter(n)) in index}
        order = [i for i, p in enumerate(params.values()) if id(p) not in head_ids]
        return PartlyImplicitGradient(implicit, order, explicit)


READOUTS = ("perturb", "exact")
DIRECTIONS = ("sampled", "momentum", "mixed")
AGGREGATIONS = ("mean", "projection")


def _projected(grad: ImplicitGradient) -> ImplicitGradient:
    """``(n/K)·B(BᵀB)⁻¹Bᵀ∇L`` as an implicit gradient: coefficients ``n·(BᵀB)⁻¹d`` (the mean then divides by K)."""
    n = sum(p.numel() for p in grad.source.primals)
    gram = grad.source.gram()
    coef = n * torch.linalg.solve(gram, grad.dirs.to(torch.float64))
    return ImplicitGradient(grad.loss, coef.to(grad.dirs.dtype), grad.source)


def readout_module(where: str, model: nn.Module) -> nn.Module:
    """The read-out layer: ``model.fwdgrad_readout`` (a module or a qualified name), else the last
    ``nn.Linear`` registered in ``model``."""
    named = getattr(model, "fwdgrad_readout", None)
    if isinstance(named, nn.Module):
        return named
    if isinstance(named, str):
        return model.get_submodule(named)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{where}: readout='exact' needs a read-out nn.Linear and {type(model).__name__} has none; name "
            "the read-out module with a model attribute fwdgrad_readout"
        )
    return linears[-1]


def readout_delta(where: str, loss_fn: LossFn, logits: torch.Tensor) -> torch.Tensor:
    """``δ = ∂L/∂logits`` ``[B, C]`` of the scalar loss, in forward mode through the criterion alone
    (``torch.func.jacfwd`` over :func:`fwdgrad.local.replay_criterion`: one batched pass, no backward)."""

    def criterion(z: torch.Tensor) -> torch.Tensor:
        value = local.replay_criterion(loss_fn, z)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError(f"{where}: readout='exact' needs loss_fn to return a scalar loss")
        return value

    return torch.func.jacfwd(criterion)(logits.detach())


class _ReadoutCapture:
    """Forward hooks recording, for the first forward of a step, the read-out layer's input and output and
    whether that output is the model's output (primal values; nothing is kept from inside a ``vmap``)."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        self.model, self.head = model, head
        self.inputs: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.model_args: tuple[Any, ...] | None = None
        self.is_output = False
        self._head_out: Any = None
        self._done = False
        self._handles: list[Any] = []

    @staticmethod
    def _plain(x: Any) -> torch.Tensor | None:
        """The primal value of ``x``: inside the batched pass (``vmap`` over ``jvp``) the primal is not batched,
        so ``jvp``'s wrappers are peeled; a batched value gives ``None`` (then a plain forward reads it)."""
        if not isinstance(x, torch.Tensor):
            return None
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(x):
            if functorch.is_batchedtensor(x):
                return None
            x = functorch.get_unwrapped(x)
        return fwAD.unpack_dual(x).primal.detach()

    def _on_head(self, m: nn.Module, args: Any, out: Any) -> None:
        if not self._done and self._head_out is None:
            self._head_out = out
            x, z = (self._plain(args[0]) if args else None), self._plain(out)
            if x is not None and z is not None:
                self.inputs, self.logits = x, z

    def _on_model(self, m: nn.Module, args: Any, out: Any) -> None:
        if not self._done:
            self._done = True
            self.model_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.is_output = self._head_out is not None and out is self._head_out

    def __enter__(self) -> _ReadoutCapture:
        self._done, self._head_out = False, None
        # prepended: the read-out's output as its forward returned it (a user hook replacing it makes the
        # read-out no longer the model's output, which check() refuses)
        self._handles = [self.head.register_forward_hook(self._on_head, prepend=True),
                         self.model.register_forward_hook(self._on_model)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._head_out = None

    def check(self, where: str) -> None:
        if self.logits is None or not self.is_output or self.logits.dim() != 2:
            raise ValueError(
                f"{where}: readout='exact' needs the read-out layer ({type(self.head).__name__}) to produce the "
                "model's output [B, C]; name the read-out with model.fwdgrad_readout or use readout='perturb'"
            )


register_estimator(
    "fg-w", ForwardGradient, default_lr=FG_W_LR, claims=("exact", "unbiased", "no-backward", "grad", "fused"),
    lr_scales_with="parameters",
)
register_estimator(
    "fg-w-momentum", ForwardGradient, preset={"directions": "momentum"}, default_lr=FG_W_LR,
    lr_note="fg-w's default learning rates (not swept for the momentum guess)",
    claims=("unbiased", "no-backward", "grad", "fused"), lr_scales_with="parameters",
)
register_estimator(
    "fg-w-mixed", ForwardGradient, preset={"directions": "mixed"}, default_lr=FG_W_LR,
    lr_note="fg-w's default learning rates (not swept for the mixed guess)",
    claims=("no-backward", "grad", "fused"), lr_scales_with="parameters",
)
