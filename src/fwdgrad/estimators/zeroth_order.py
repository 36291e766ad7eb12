r"""Zeroth-order estimators: SPSA / MeZO (``zo``), its sign (``zo-sign``) and conservative (``zo-cons``) steps.

The ZO-Bench family of Zhang et al. (2024), "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning: A Benchmark": ``zo`` writes ``.grad``, so ``torch.optim.SGD`` makes it ZO-SGD, SGD with
momentum ZO-SGD-MMT and Adam ZO-Adam; ``zo-sign`` is ZO-SGD-Sign (Liu et al. 2019, signSGD via a
zeroth-order oracle); ``zo-cons`` is ZO-SGD-Cons (its rule lives in the fused step). Every estimator has a fused
:meth:`ZerothOrder.sgd_step` in the manner of MeZO (Malladi et al. 2023): the parameters are perturbed in
place, the directions are drawn again from their seeds to update them, and a step holds the memory of
inference. The directional derivatives come from :mod:`fwdgrad.derivatives.finite_difference`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fwdgrad._validation import check_number, check_positive_int, make_generator
from fwdgrad.derivatives.finite_difference import (
    FD_SAMPLERS,
    HALF_PRECISION,
    Perturbation,
    PerturbationSource,
    RoundingLedger,
    ScratchPerturbation,
    check_eps,
    check_restore,
    default_eps,
    evaluate_loss,
    last_offset,
    spsa_directional_derivatives,
)
from fwdgrad.directions import tensor_seeds
from fwdgrad.errors import NonFiniteError, explain_float16_overflow
from fwdgrad.estimators.base import Estimator, LossFn, trainable_parameters
from fwdgrad.estimators.gradient import Gradient, ImplicitGradient, MappedGradient
from fwdgrad.estimators.registry import register_estimator
from fwdgrad.estimators.rounding import check_rounding, stochastic_round_

#: The share of perturbed entries whose ``θ + εz`` rounds back to ``θ`` above which a step warns (once).
#: Such an entry's estimate loses its mean (the difference does not see it), a bias of about that share on
#: the large entries. Measured (docs/precision.md, bfloat16 MLP): 31 % at ε = 1e-3 (relative error of ``d``
#: 0.26), 12 % at 3e-3 (0.08), 3 % at 1e-2 (0.026).
ROUNDED_AWAY_WARNING = 0.2

Tensor = torch.Tensor


@register_estimator("zo", claims=("no-backward", "grad", "fused"))
class ZerothOrder(Estimator):
    r"""SPSA zeroth-order gradient estimate (ZO-SGD's gradient; MeZO when fused).

    With K directions ``z_k`` (per-tensor seeded, see :class:`fwdgrad.derivatives.finite_difference.Perturbation`):

    .. math::
        \hat g = \frac1K \sum_k d_k z_k, \qquad d_k = \frac{L(\theta+\varepsilon z_k) - L(\theta-\varepsilon z_k)}
        {2\varepsilon} \;\; \text{or (one-sided)} \;\; \frac{L(\theta+\varepsilon z_k) - L(\theta)}{\varepsilon}.

    For Gaussian ``z``, ``E[ĝ]`` (two-point) is exactly the gradient of the smoothed loss
    ``E_u L(θ + εu)``, ``u ~ N(0, I)``, and ``d_k = ⟨∇L, z_k⟩ + O(ε²)`` (one-sided ``O(ε)``): as ``ε → 0``
    the estimate tends to ``fg-w``'s for the same ``z`` (with K = 1 both draw the same ``z`` for the same
    seed). Only forward passes run, under ``torch.no_grad()``: 2K of them (one-sided K + 1).

    Args:
        eps: the finite-difference step ε, a finite number > 0; ``None`` (default): ``1e-3``, or ``1e-2`` when
            a parameter is bfloat16 / float16 or ``torch.autocast`` computes in one of them
            (:func:`fwdgrad.derivatives.finite_difference.default_eps`; ``docs/precision.md``).
        num_directions: K, the number of random directions (2K loss evaluations, one-sided K + 1).
        tangents: ``gaussian``, ``rademacher`` or ``sphere`` (radius √n).
        one_sided: forward difference, with ``L(θ)`` evaluated once and shared by the K directions.
        seed: seed of a private ``torch.Generator`` (exclusive with ``generator``).
        generator: the generator to draw from; ``None`` with no seed uses torch's global RNG.
        restore: ``"exact"`` (default: undo each perturbation by subtracting it, and write back the few
            entries that rounding would not bring back, kept as the perturbation is added: bit-exact in
            every dtype, for about 0.6 byte per parameter), ``"regenerate"`` (subtract only;
            no extra memory; leaves a rounding drift of about one unit roundoff per step on entries with
            ``|θ| ≲ ε|z|``) or ``"snapshot"`` (copy the parameters and copy them back: bit-exact, one more copy
            of the parameters in memory). See :mod:`fwdgrad.derivatives.finite_difference`.
        rounding: how the fused :meth:`sgd_step` writes its update into bfloat16 / float16 weights:
            ``"nearest"`` (default) or ``"stochastic"`` (unbiased stochastic rounding from the estimator's
            generator, :mod:`fwdgrad.estimators.rounding`: updates below the weights' resolution are not lost
            on average). float32 / float64 weights round to nearest either way.

    Half precision: each step warns once when more than 20 % of the perturbed entries round back to ``θ``
    (raise ``eps``), and once when ``loss_fn`` returns a bfloat16 / float16 loss, whose own rounding swamps
    the difference (compute it in float32, e.g. ``F.cross_entropy(logits.float(), y)``).

    The returned loss is ``L(θ)`` (one-sided) or the mean of ``(L⁺ + L⁻)/2`` (two-point, ``L(θ) + O(ε²)``).
    A non-finite loss raises :class:`fwdgrad.NonFiniteError` with the parameters restored (bit-exact
    with ``restore="snapshot"``) and no ``.grad`` written. Model buffers (BatchNorm running statistics)
    see every evaluation's forward pass.

    Example:
        >>> import torch, torch.nn.functional as F, fwdgrad
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> est = fwdgrad.estimator("zo", num_directions=2, seed=0)
        >>> before = model.weight.detach().clone()
        >>> loss = est.sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.1)   # MeZO's fused step
        >>> model.weight.grad is None, bool((model.weight != before).any())
        (True, True)
    """

    #: why ``rounding="stochastic"`` is refused (``None``: it is available)
    no_stochastic_rounding: str | None = None

    def __init__(
        self,
        eps: float | None = None,
        num_directions: int = 1,
        tangents: str = "gaussian",
        one_sided: bool = False,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        restore: str = "exact",
        rounding: str = "nearest",
    ) -> None:
        where = type(self).__name__
        self.eps = None if eps is None else check_eps(where, eps)
        check_positive_int(where, "num_directions", num_directions)
        if tangents not in FD_SAMPLERS:
            raise ValueError(f"{where}: tangents must be one of {FD_SAMPLERS}, got {tangents!r}")
        if not isinstance(one_sided, bool):
            raise TypeError(f"{where}: one_sided must be a bool, got {one_sided!r}")
        self.num_directions = num_directions
        self.tangents = tangents
        self.one_sided = one_sided
        self.restore = check_restore(where, restore)
        if check_rounding(where, rounding) != "nearest":
            if self.no_stochastic_rounding is not None:
                raise ValueError(f"{where}: rounding='stochastic' is not available: {self.no_stochastic_rounding}")
            self.rounding = rounding  # non-default only, so the default repr stays as it was
        self._generator = make_generator(where, seed, generator)
        self._warned: set[str] = set()

    def step_size(self, params: list[Tensor] | dict[str, nn.Parameter]) -> float:
        """The ε a step on ``params`` uses: ``eps``, or :func:`~fwdgrad.derivatives.finite_difference.default_eps`."""
        tensors = list(params.values()) if isinstance(params, dict) else params
        return default_eps(tensors) if self.eps is None else self.eps

    # -- the pieces a subclass varies -------------------------------------------------------------------

    def _differences(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], leave_last: bool = False
    ) -> tuple[Tensor, Tensor, ScratchPerturbation]:
        tensors = list(params.values())
        source = ScratchPerturbation(self.tangents, tensors, self.num_directions, self._generator)
        restore = "regenerate" if leave_last else self.restore
        ledger = RoundingLedger(tensors) if restore == "exact" else None
        eps = self.step_size(tensors)
        loss, d = spsa_directional_derivatives(
            model, loss_fn, tensors, source, eps=eps, one_sided=self.one_sided, restore=restore,
            leave_last=leave_last, where=where, ledger=ledger,
        )
        self._warn_precision(where, loss, ledger, eps)
        return loss, d, source

    def _warn_precision(self, where: str, loss: Tensor, ledger: RoundingLedger | None, eps: float) -> None:
        """The two one-line warnings of half precision, each once per estimator (see the class docstring)."""
        if loss.dtype in HALF_PRECISION and "loss" not in self._warned:
            self._warned.add("loss")
            warnings.warn(
                f"{where}: loss_fn returns a {loss.dtype} loss, whose rounding (about 2^-8 of it in bfloat16) "
                "swamps the finite difference; compute the loss in float32 (e.g. F.cross_entropy(logits.float(), "
                "y))", stacklevel=4,
            )
        if ledger is None or "rounded" in self._warned or not ledger.perturbed:
            return
        share = float(ledger.rounded_away) / ledger.perturbed  # one host read per step
        if share > ROUNDED_AWAY_WARNING:
            self._warned.add("rounded")
            warnings.warn(
                f"{where}: {share:.0%} of the perturbed entries round back to θ at eps={eps:g} (their "
                "perturbation is lost, so is their gradient); raise eps (docs/precision.md)", stacklevel=4,
            )

    def _direction(self, source: ScratchPerturbation, i: int, d: Tensor, scratch: bool = False) -> Tensor:
        """Tensor ``i``'s update direction (what is written to ``.grad``): here ``(1/K) Σ_k d_k z_{k,i}``; with
        ``scratch``, a view of the step's scratch buffer (for a fused update that uses it at once)."""
        return (source.weighted_sum_into if scratch else source.weighted_sum)(i, d / d.shape[0])

    # -- the two consumers ------------------------------------------------------------------------------

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        loss, d, source = self._differences(where, model, loss_fn, params)
        _check_finite(where, loss, d, "no gradient was written")
        return loss, {n: self._direction(source, i, d) for i, n in enumerate(params)}

    # -- seed sharing (fwdgrad.distributed.SeedSharingSGD) ---------------------------------------------

    #: Why this estimator's steps cannot be rebuilt from exchanged scalars (``None``: they can).
    unshareable: str | None = None

    def shared_step(self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]) -> ImplicitGradient:
        r"""The step's SPSA differences as an implicit gradient ``(loss, d [K], source)`` for seed sharing:
        ``ĝ = (1/K) Σ_k d_k z_k`` with ``z_k`` the very directions that perturbed the parameters
        (:class:`~fwdgrad.derivatives.finite_difference.PerturbationSource`, which :meth:`shared_source`
        builds again from the same generator state on any rank). ``d`` is linear in the loss, so ranks may
        average it (data parallel) or gather it (tangent parallel). The parameters are put back by snapshot
        whatever ``restore`` says (``restore="snapshot"`` is what :meth:`shared_config` states): the in-place
        ``+εz − εz`` of ``"regenerate"`` leaves a rounding drift that depends on the directions, so ranks
        drawing different directions (tangent parallel) would drift apart and a replay, which evaluates no
        loss, could not rebuild it. Non-finite values are returned as they are (the consumer's check raises
        after the exchange, on every rank alike)."""
        where = f"{type(self).__name__}.shared_step"
        tensors = list(params.values())
        perturbation = Perturbation(self.tangents, tensors, self.num_directions, self._generator)
        loss, d = spsa_directional_derivatives(
            model, loss_fn, tensors, perturbation, eps=self.step_size(tensors), one_sided=self.one_sided,
            restore="snapshot",
            where=where,
        )
        return ImplicitGradient(loss, d, PerturbationSource(perturbation))

    def shared_source(self, primals: list[Tensor], generator: torch.Generator) -> PerturbationSource:
        """The directions :meth:`shared_step` draws from ``generator`` in this state, for tensors like
        ``primals`` (another rank's, or a replayed step's)."""
        return PerturbationSource(Perturbation(self.tangents, primals, self.num_directions, generator))

    def shared_config(self) -> dict[str, object]:
        """What every rank must agree on beyond the directions' seed: JSON data (part of the start-up check
        and of a replay log's header)."""
        return {"tangents": self.tangents, "num_directions": self.num_directions, "eps": self.eps,
                "one_sided": self.one_sided, "restore": "snapshot"}

    def post_exchange(self, grad: ImplicitGradient) -> Gradient:
        """The update from the exchanged estimate (all ranks' differences): ``zo`` uses it as it is."""
        return grad

    def sgd_step(
        self, model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
    ) -> Tensor:
        r"""One fused step, ``θ_i ← (1 − lr·wd)·θ_i − lr·ĝ_i``, tensor by tensor, MeZO's way.

        Perturb in place (``+εz, L⁺, −2εz, L⁻, +εz`` per direction), then update each tensor from its
        directions drawn again: no gradient, no stored direction, no autograd graph; the temporaries are one
        tensor's direction (two for the sum over K). ``.grad`` is not touched. For ``zo`` with float32 /
        float64 weights (``restore="exact"`` or ``"regenerate"``) the last ``+εz`` is folded into the update
        (one pass less over the parameters: three draws of each tensor per step with K = 1, where MeZO's loop
        makes four), which leaves float32's rounding of the fold; with bfloat16 / float16 weights (and
        ``restore="exact"``) that rounding would be the size of the update, so the step restores the
        parameters exactly and then updates them (four draws), with the ``rounding`` chosen. For the same
        seed the result equals ``est(model, loss_fn)`` followed by ``torch.optim.SGD(params, lr,
        weight_decay=weight_decay).step()``, up to rounding.

        Args:
            model: the module to update in place.
            loss_fn: ``loss_fn(model)`` returns the real scalar loss.
            lr: learning rate, >= 0 (0 leaves only the perturbations' rounding drift).
            weight_decay: L2 coefficient, >= 0.
            momentum: heavy-ball momentum in [0, 1) (``torch.optim.SGD`` semantics). With momentum the step
                forms ``ĝ`` tensor by tensor and keeps one buffer per parameter in the estimator (the base
                class's fused update); without, nothing model-sized is allocated.

        Returns:
            The detached loss (as for :meth:`__call__`). A non-finite loss raises
            :class:`fwdgrad.NonFiniteError`; the parameters are then as the perturbations left them
            (bit-exact with ``restore="snapshot"``) and not updated.

        Example:
            >>> import torch, torch.nn.functional as F, fwdgrad
            >>> model = torch.nn.Linear(4, 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> loss = fwdgrad.estimator("zo", seed=0).sgd_step(model, lambda m: F.cross_entropy(m(x), y), lr=0.01)
            >>> model.weight.grad is None
            True
        """
        where = f"{type(self).__name__}.sgd_step"
        lr = check_number(where, "lr", lr, bound=">= 0", say_finite=True)  # lr = 0: the drift measurement
        weight_decay = check_number(where, "weight_decay", weight_decay, bound=">= 0", say_finite=True)
        momentum = check_number(where, "momentum", momentum, bound="in [0, 1)", say_finite=True)
        if momentum >= 1:
            raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
        if momentum:
            if isinstance(self, ZerothOrderConservative):
                raise ValueError(f"{where}: ZO-SGD-Cons takes no momentum, got momentum={momentum!r}")
            if lr == 0:
                raise ValueError(f"{where}: lr must be > 0 with momentum, got {lr!r}")
            if getattr(self, "rounding", "nearest") != "nearest":
                raise ValueError(f"{where}: rounding='stochastic' is for the plain fused step, got "
                                 f"momentum={momentum!r}")
            return super().sgd_step(model, loss_fn, lr, weight_decay, momentum)  # clears autocast's cache too
        if not callable(loss_fn):
            raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
        params = trainable_parameters(where, model)
        half = any(p.dtype in HALF_PRECISION for p in params.values())
        # fold the last +εz into the update (one draw pass less) where its rounding is float32's, far below any
        # update; in half precision it would be the size of the update: restore exactly, then update
        exactly_back = (self.restore == "exact" and half) or getattr(self, "rounding", "nearest") != "nearest"
        with explain_float16_overflow(params.values()):
            if type(self) is ZerothOrder and self.restore != "snapshot" and not exactly_back:
                loss = self._folded_step(where, model, loss_fn, params, lr, weight_decay)
            else:
                loss, d, source = self._differences(where, model, loss_fn, params)
                _check_finite(where, loss, d, "no parameter was updated")
                self._update(where, model, loss_fn, params, source, d, lr, weight_decay)
        torch.clear_autocast_cache()  # the next forward in this autocast region must see the new weights
        return loss

    def _folded_step(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter], lr: float,
        weight_decay: float,
    ) -> Tensor:
        """MeZO's step with the last ``+εz`` folded into the update: with ``θ + o·z_{K−1}`` in place,
        ``θ_new = (1 − a)·(θ + o z_{K−1}) − Σ_k w_k z_k`` with ``a = lr·wd``, ``w_k = lr·d_k/K`` and
        ``w_{K−1} += (1 − a)·o``: one pass, one draw per tensor and direction."""
        loss, d, source = self._differences(where, model, loss_fn, params, leave_last=True)
        o = last_offset(self.step_size(params), self.one_sided)
        try:
            _check_finite(where, loss, d, "no parameter was updated")
        except NonFiniteError:
            source.add_(self.num_directions - 1, -o)
            raise
        a = lr * weight_decay
        weights = d * (lr / d.shape[0])
        weights[-1] += (1.0 - a) * o
        with source.scratch_pass():
            for i, p in enumerate(params.values()):
                if a:
                    p.mul_(1.0 - a)
                p.sub_(source.weighted_sum_into(i, weights))
        return loss

    def _update(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter],
        source: ScratchPerturbation, d: Tensor, lr: float, weight_decay: float,
    ) -> None:
        stochastic = getattr(self, "rounding", "nearest") == "stochastic"
        seeds = tensor_seeds(len(params), self._generator) if stochastic else None
        with source.scratch_pass():
            for i, p in enumerate(params.values()):
                if seeds is not None and p.dtype in HALF_PRECISION:  # θ(1 − lr·wd) − lr·ĝ in float32, then SR
                    value = p.float().mul_(1.0 - lr * weight_decay)
                    value.sub_(self._direction(source, i, d, scratch=True).float(), alpha=lr)
                    stochastic_round_(p, value, seeds[i])
                    continue
                if weight_decay:
                    p.mul_(1.0 - lr * weight_decay)
                p.sub_(self._direction(source, i, d, scratch=True), alpha=lr)


@register_estimator("zo-sign", claims=("no-backward", "grad", "fused"))
class ZerothOrderSign(ZerothOrder):
    r"""ZO-SGD-Sign: the entry-wise sign of the SPSA estimate, ``sign((1/K) Σ_k d_k z_k)``.

    Written to ``.grad`` (so SGD applies ``θ ← θ − lr·sign(ĝ)``, signSGD via a zeroth-order oracle, Liu et
    al. 2019), or applied by the fused :meth:`sgd_step`. With K = 1 it is ``sign(d)·sign(z)``. Options as
    for :class:`ZerothOrder`. It is not an unbiased gradient estimate: its scale is 1 per entry, so it
    wants a learning rate of the size of the wanted change per entry.

    Example:
        >>> import torch, fwdgrad
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(5, 3)
        >>> loss = fwdgrad.estimator("zo-sign", seed=0)(model, lambda m: m(x).pow(2).mean())
        >>> sorted(model.weight.grad.abs().unique().tolist())
        [1.0]
    """

    def _direction(self, source: ScratchPerturbation, i: int, d: Tensor, scratch: bool = False) -> Tensor:
        return super()._direction(source, i, d, scratch).sign_()

    def post_exchange(self, grad: ImplicitGradient) -> Gradient:
        """``sign(ĝ)`` entry by entry, taken after the exchange: in data parallelism the sign of the whole
        batch's estimate (the mean of the ranks' signs would be another thing), in tangent parallelism the
        sign of the mean over all ``K·W`` directions, as one process with ``K·W`` directions takes it."""
        return MappedGradient(grad, Tensor.sign_)


@register_estimator("zo-cons", claims=("no-backward", "grad"))
class ZerothOrderConservative(ZerothOrder):
    r"""ZO-SGD-Cons: a ZO-SGD step that is only taken when it lowers the loss.

    :meth:`sgd_step`: after the SPSA estimate ``ĝ`` (as :class:`ZerothOrder`), three points are evaluated in
    place, ``θ``, ``θ − lr·ĝ`` and ``θ + lr·ĝ``, and the parameters are left at the one with the lowest loss
    (ties keep the earlier one). 2K + 3 forward passes per step (one-sided: K + 3). ``weight_decay`` is
    applied to ``θ`` before the three candidates are formed. Moving between the candidates adds and
    subtracts ``lr·ĝ`` (regenerated), with the same rounding as the perturbations (none with
    ``restore="snapshot"``, which copies ``θ`` back, nor with ``restore="exact"`` and bfloat16 / float16
    weights, where it copies ``θ`` too: there the rounding of a move is the size of the move).

    :meth:`__call__` writes ``ĝ`` itself to ``.grad``, exactly as ``zo`` does for the same seed: the
    conservative choice needs the learning rate and the update, so it exists only in the fused
    :meth:`sgd_step`; through ``.grad`` and a ``torch.optim`` optimizer this recipe *is* ZO-SGD.

    Example:
        >>> import torch, fwdgrad
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(5, 3)
        >>> loss = fwdgrad.estimator("zo-cons", seed=0).sgd_step(model, lambda m: m(x).pow(2).mean(), lr=0.1)
    """

    #: why ``rounding="stochastic"`` is refused (``None``: it is available)
    no_stochastic_rounding = "its moves between the candidates must come back exactly"

    unshareable = (
        "ZO-SGD-Cons picks among θ, θ − lr·ĝ and θ + lr·ĝ by evaluating the loss at each, a choice that is "
        "not linear in the loss (the ranks' shards would choose apart and their mean is no choice) and not a "
        "function of the exchanged differences, so it cannot be rebuilt from them; use zo (its .grad path is "
        "ZO-SGD, which is what zo-cons writes to .grad)"
    )

    def _update(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter],
        source: ScratchPerturbation, d: Tensor, lr: float, weight_decay: float,
    ) -> None:

        tensors = list(params.values())

        def move(alpha: float) -> None:  # θ ← θ + alpha·ĝ, ĝ regenerated tensor by tensor
            with source.scratch_pass():
                for i, p in enumerate(tensors):
                    p.add_(ZerothOrder._direction(self, source, i, d, scratch=True), alpha=alpha)

        with torch.no_grad():
            if weight_decay:
                for p in tensors:
                    p.mul_(1.0 - lr * weight_decay)
        # in half precision a move's rounding is the size of the move: "exact" copies θ there, as "snapshot" does
        half = any(p.dtype in HALF_PRECISION for p in tensors)
        exact = self.restore == "snapshot" or (self.restore == "exact" and half)
        saved = [p.detach().clone() for p in tensors] if exact else None

        def back_to_theta(position: float) -> None:
            if saved is None:
                move(-position * lr)
            else:
                with torch.no_grad():
                    for p, s in zip(tensors, saved):
                        p.copy_(s)

        losses = [evaluate_loss(where, model, loss_fn)]
        position = 0.0  # the multiple of lr·ĝ currently added to θ
        try:
            move(-lr)
            position = -1.0
            losses.append(evaluate_loss(where, model, loss_fn))
            move(2 * lr)
            position = 1.0
            losses.append(evaluate_loss(where, model, loss_fn))
        finally:
            if position != 0.0:
                back_to_theta(position)
        values = torch.stack(losses)
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))
        best = int(torch.argmin(values))  # one host synchronisation per step
        if best != 0:
            move(-lr if best == 1 else lr)

def _check_finite(where: str, loss: Tensor, d: Tensor, outcome: str) -> None:
    """One host synchronisation: ``NonFiniteError`` unless the loss and every difference are finite."""
    if not bool(torch.isfinite(d).all() & torch.isfinite(loss)):
        raise NonFiniteError(f"{where}: the loss is {loss.item()}, the finite differences {d.tolist()}; {outcome}")
