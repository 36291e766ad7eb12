r"""Feedback alignment: ``fa``, ``dfa`` (random feedback) and ``fdfa`` (forward-gradient feedback).

Supported models (``dfa`` also trains models of units, below): a sequential chain of ``nn.Linear`` /
``nn.Conv2d`` layers, each optionally followed directly by one element-wise activation (``ReLU``,
``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``GELU``, ``ELU``, ``SiLU``, ``Softplus``, ``Hardtanh``, or a module
with ``fwdgrad_elementwise = True``) and then by any of ``Flatten``, ``MaxPool2d``, ``AvgPool2d``,
``Identity``; ``Flatten``/pools may also come first. The last layer is an ``nn.Linear`` producing the logits.
The model's forward must apply its leaf modules in registration order (checked once against the model's own
output: the first call on a model runs two more forwards, the chain and the model). A layer used twice
(one instance in two slots) is two stages of the chain, and its weight gradient is the sum of both.
``fwdgrad.models`` ``fdfa-mlp``, ``fdfa-cnn`` and ``mlp`` have this form. Anything else raises ``ValueError``
naming the module.

Write layer :math:`l` as :math:`z_l = W_l x_l + b_l` (or a convolution), :math:`a_l = f_l(z_l)`,
:math:`x_{l+1} = \text{post}_l(a_l)`, logits :math:`y = z_L`, output error :math:`e = \partial L/\partial y`
(``[B, C]``, a VJP through the criterion alone). Every method gives the output layer its exact local gradient
(:math:`\delta_L = e`) and hidden layers an error :math:`\delta_l` at :math:`z_l`; the weights then get the
layer's local rule :math:`\hat g_{W_l} = \sum_b \delta_{l,b} x_{l,b}^\top` (``conv2d_weight`` for
convolutions), :math:`\hat g_{b_l} = \sum \delta_l`.

* ``fa`` (Lillicrap et al. 2016): errors travel down through fixed random matrices :math:`B_{l+1}` of the
  shape of :math:`W_{l+1}` in place of the weights: :math:`\delta_l = f_l'(z_l) \odot
  \text{post}_l^\top(B_{l+1}^\top \delta_{l+1})` (the parameter-free ``post`` ops by their own VJP).
* ``dfa`` (Nøkland 2016): each hidden layer gets the output error directly through a fixed random
  :math:`B_l` (``[C, n_l]``, :math:`n_l` = size of :math:`a_l` per example):
  :math:`\delta_l = f_l'(z_l) \odot (e B_l)`. No error moves from layer to layer.
* ``fdfa`` (Bacho & Chu, 2024): as ``dfa``, but :math:`B_l` starts at zero and learns the output-to-layer
  Jacobian :math:`J_l = \partial y/\partial a_l` (averaged over examples). The forward pass runs under
  forward-mode AD; after every hidden activation fresh noise :math:`\varepsilon_l \sim N(0, I)` is *added to
  the tangent*, so the output tangent is :math:`\dot y = \sum_l J_l \varepsilon_l` and
  :math:`M_l = \frac1B \sum_b \dot y_b \varepsilon_{l,b}^\top` has expectation :math:`\bar J_l` (the noises are
  independent with unit variance). :math:`B_l` follows :math:`M_l` with momentum: ``feedback_update="adam"``
  (the paper: Adam on the gradient :math:`B_l - M_l`, lr 1e-4) or ``"ema"``
  (:math:`B_l \leftarrow B_l + \eta (M_l - B_l)`). The step's errors use :math:`B_l` before its update.

DFA on models of units (``dfa`` only). A model that contains :class:`~fwdgrad.derivatives.ActivityLayer`
units (the LocalMixer of Ren et al. 2023: linear maps wrapped with layer normalisations, token and group
mixing, residuals) is not a chain, but DFA needs none: every hidden unit ``l`` (every ``nn.Linear``,
``nn.Conv2d`` and ActivityLayer, as ``fg-a`` picks them) gets :math:`\delta_l = f'(p_l) \odot (e B_l)` at
its output, where :math:`p_l` is the input of the element-wise activation module that follows the unit
(its output, or its output plus a residual: the first activation call after the unit whose input has the
unit's output shape), and its weights get the unit's own local rule from :math:`\delta_l`
(:func:`fwdgrad.derivatives.local_weight_grads`: through the unit's normalisation and linear map alone).
The last unit must produce the model's output (the read-out) and gets its exact local gradient from
:math:`e`. :math:`B_l` is ``[C, m_l]``, :math:`U(\pm 1/\sqrt{m_l})`, and the same at every position over
which the unit applies the same weights (its ``fwdgrad_weight_shared_dims``; for an ``nn.Linear`` the
dimensions between batch and features): the LocalMixer's channel and group units share their feedback over
the patches, token units keep one per patch and channel. Parameters outside the units raise, a hidden unit
with no visible activation after it raises (a functional activation in ``forward`` cannot be seen). The
model runs once without a graph; no backward through it. Modules the end-to-end forward does not call
(the LocalMixer's local heads) get zero, as under backprop.

FA on models of units (``fa``). FA sends the error down through every unit with a fixed random :math:`B_l`
(the shape of the unit's weight, :math:`U(\pm 1/\sqrt{fan_{in}})`) in place of its weight, and through the
parameter-free operations between units (normalisations, reshapes, activations, residuals, pooling) by
their true derivatives. The model runs once with autograd on; a forward hook replaces every unit's output
by the output of an opaque step whose backward (a) adds the unit's local weight gradient, from the error
at its output and the true weights, to the estimate and (b) returns the input error with :math:`B_l` in
place of the weight (the unit's ``feedback_input_grad(x, g, b)``: for the LocalMixer's units, the
normalisation's VJP at the true pre-activation, then the transposed linear map with :math:`B_l`; the rule
of ``nn.Linear`` / ``nn.Conv2d`` otherwise). One backward pass over that graph gives every unit's update;
with :math:`B_l = W_l` it is backprop. This is a backward pass through the network's parameter-free
operations (FA propagates errors layer by layer), not a "no backward" method. ``fdfa`` still needs a chain.

f′ is applied by a forward-mode JVP of the activation, so ``dfa`` and ``fdfa`` run no backward through any
model op; ``fa`` uses local VJPs of the parameter-free pools between layers. ``loss_fn`` may return a scalar
or per-example losses (then averaged).

Feedback state lives in the estimator (``est.feedback``: layer name → matrix), drawn from a
``torch.Generator`` made from ``seed`` on the model's device at the first call.

Example:
    >>> import torch, torch.nn.functional as F, fwdgrad
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> est = fwdgrad.estimator("dfa", seed=0)
    >>> loss = est(model, lambda m: F.cross_entropy(m(x), y))
    >>> sorted(est.feedback), est.feedback["0"].shape
    (['0'], torch.Size([3, 8]))
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad._validation import check_seed_or_generator
from fwdgrad.derivatives import is_activity_layer, local_weight_grads
from fwdgrad.estimators.base import Estimator, LossFn
from fwdgrad.estimators.feedback_units import (
    ELEMENTWISE,
    FeedbackUnit,
    UnitRunner,
    is_elementwise,
    shared_dims,
    units_covering,
)
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

STRUCTURE: tuple[type[nn.Module], ...] = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)
FEEDBACK_UPDATES = ("adam", "ema")


@dataclasses.dataclass
class Stage:
    """One layer of the chain: ``x → layer → act → post → next x``."""

    name: str
    layer: nn.Linear | nn.Conv2d
    act: nn.Module | None = None
    post: list[nn.Module] = dataclasses.field(default_factory=list)


def parse_chain(where: str, model: nn.Module) -> tuple[list[nn.Module], list[Stage]]:
    """Split ``model``'s leaf modules into leading structure ops and :class:`Stage` s; raise if unsupported."""
    pre: list[nn.Module] = []
    stages: list[Stage] = []
    for name, m in model.named_modules(remove_duplicate=False):  # a layer used twice is two stages
        if any(True for _ in m.children()):
            if any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"{where}: module {name!r} ({type(m).__name__}) holds parameters and submodules; "
                                 "feedback alignment needs a chain of Linear/Conv2d layers and activations")
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
                raise ValueError(f"{where}: Conv2d {name!r} must use integer zero padding, got "
                                 f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
            stages.append(Stage(name, m))
        elif is_elementwise(m):
            if not stages or stages[-1].act is not None or stages[-1].post:
                raise ValueError(f"{where}: activation {name!r} ({type(m).__name__}) must directly follow a "
                                 "Linear or Conv2d layer")
            stages[-1].act = m
        elif isinstance(m, STRUCTURE):
            (stages[-1].post if stages else pre).append(m)
        else:
            raise ValueError(
                f"{where}: module {name!r} ({type(m).__name__}) is not supported; feedback alignment trains "
                "sequential chains of Linear/Conv2d, element-wise activations, Flatten, MaxPool2d, AvgPool2d"
            )
    if not stages:
        raise ValueError(f"{where}: {type(model).__name__} has no Linear or Conv2d layer")
    last = stages[-1]
    if not isinstance(last.layer, nn.Linear) or last.act is not None or last.post:
        raise ValueError(f"{where}: the chain must end with an nn.Linear producing the logits; it ends with "
                         f"{last.name!r} ({type(last.layer).__name__}) followed by "
                         f"{[type(m).__name__ for m in ([last.act] if last.act else []) + last.post]}")
    own = {id(p) for st in stages for p in st.layer.parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in own]
    if stray:
        raise ValueError(f"{where}: parameters {stray[:3]} belong to no Linear/Conv2d layer of the chain")
    return pre, stages


def _primal(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


def layer_weight_grads(layer: nn.Linear | nn.Conv2d, x: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """The layer's local rule: gradient of ``⟨δ, layer(x)⟩`` w.r.t. its weight and bias (``δ`` at its output)."""
    if isinstance(layer, nn.Linear):
        d2 = delta.reshape(-1, delta.shape[-1])
        out = {"weight": d2.T @ x.reshape(-1, x.shape[-1])}
        dims: tuple[int, ...] = (0,)
        delta = d2
    else:
        out = {"weight": torch.nn.grad.conv2d_weight(x, layer.weight.shape, delta, layer.stride, layer.padding,
                                                     layer.dilation, layer.groups)}
        dims = (0, 2, 3)
    if layer.bias is not None:
        out["bias"] = delta.sum(dims)
    return out


def _feedback_input(layer: nn.Linear | nn.Conv2d, b: Tensor, delta: Tensor, x_shape: torch.Size) -> Tensor:
    """``Bᵀδ``: the layer's input-gradient rule with its weight replaced by the feedback ``B`` (FA)."""
    if isinstance(layer, nn.Linear):
        return delta @ b
    return torch.nn.grad.conv2d_input(x_shape, b, delta, layer.stride, layer.padding, layer.dilation, layer.groups)


def _act_jvp(act: nn.Module | None, z: Tensor, g: Tensor) -> Tensor:
    """``f'(z) ⊙ g`` for an element-wise activation, by a forward-mode JVP (no backward)."""
    if act is None:
        return g
    with torch.no_grad(), fwAD.dual_level():
        t = fwAD.unpack_dual(act(fwAD.make_dual(z, g))).tangent
    return torch.zeros_like(g) if t is None else t


class _Runner:
    """Stands in for the model inside ``loss_fn``: runs the chain, keeps what the errors need."""

    def __init__(self, est: FeedbackAlignment, model: nn.Module, pre: list[nn.Module], stages: list[Stage],
                 where: str) -> None:
        self.est, self.model, self.pre, self.stages, self.where = est, model, pre, stages, where
        self.xs: list[Tensor] = []
        self.zs: list[Tensor] = []
        self.acts: list[Tensor] = []
        self.noises: list[Tensor] = []
        self.ydot: Tensor | None = None
        self.logits: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.logits is not None:
            raise ValueError(f"{self.where}: loss_fn must call its model argument once")
        with torch.no_grad():
            self.est._check_chain(self.where, self.model, self.pre, self.stages, x)
            if self.est.mode == "fdfa":
                with fwAD.dual_level():
                    out = self._run(x)
                    y, ydot = fwAD.unpack_dual(out)
                    self.ydot = None if ydot is None else ydot.detach()
                    y = y.detach()
            else:
                y = self._run(x)
        self.logits = y.detach().requires_grad_(True)
        return self.logits

    def _run(self, x: Tensor) -> Tensor:
        h = x
        for m in self.pre:
            h = m(h)
        gen = self.est._gen(x.device)
        last = len(self.stages) - 1
        for i, st in enumerate(self.stages):
            self.xs.append(_primal(h).detach())
            z = st.layer(h)
            self.zs.append(_primal(z).detach())
            a = st.act(z) if st.act is not None else z
            if self.est.mode == "fdfa" and i < last:
                ap, at = fwAD.unpack_dual(a)
                eps = draw("normal", tuple(ap.shape), gen, ap)
                self.noises.append(eps)
                a = fwAD.make_dual(ap, eps if at is None else at + eps)
            self.acts.append(_primal(a).detach())
            for m in st.post:
                a = m(a)
            h = a
        return h


def _check_positive(where: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where}: {name} must be a finite float > 0, got {v!r}")


def draw(kind: str, shape: tuple[int, ...], gen: torch.Generator | None, like: Tensor) -> Tensor:
    """``torch.randn``/``torch.rand`` of ``shape`` on ``like``'s device and dtype, from ``gen`` wherever it lives
    (a generator on another device draws there and the sample is moved)."""
    fn = torch.randn if kind == "normal" else torch.rand
    device = like.device if gen is None else gen.device
    return fn(shape, generator=gen, device=device, dtype=like.dtype).to(like.device)


class FeedbackAlignment(Estimator):
    r"""Feedback alignment estimators (``fa``, ``dfa``, ``fdfa``); see the module docstring for the math.

    Args:
        feedback_scale: ``fa``/``dfa``: multiplies the random feedback's default range (``fa``:
            :math:`U(\pm 1/\sqrt{fan_{in}})` of the replaced layer, like its weights; ``dfa``:
            :math:`U(\pm 1/\sqrt{n_l})`).
        seed, generator: the feedback draws and (``fdfa``) the tangent noise; at most one of them.
        feedback_lr: ``fdfa`` only, the feedback matrices' learning rate (1e-4 in the paper, with Adam).
        feedback_update: ``fdfa`` only, ``"adam"`` or ``"ema"``.
        betas: ``fdfa`` with ``"adam"``: Adam's ``(β1, β2)``.

    Attributes:
        feedback: layer name → feedback matrix (``fa``: named by the layer whose weights it replaces, shape of
            its weight; ``dfa``/``fdfa``: named by the hidden layer, shape ``[C, n_l]``). Filled at the first call.
    """

    mode: ClassVar[str] = "fa"
    per_example_loss = True

    def __init__(
        self, *, feedback_scale: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        where = f"fwdgrad.estimator({self.name or self.mode!r})"
        _check_positive(where, "feedback_scale", feedback_scale)
        check_seed_or_generator(where, seed, generator)
        self.feedback_scale = float(feedback_scale)
        self._seed = seed
        self._generator = generator
        self.feedback: dict[str, Tensor] = {}
        self._moments: dict[str, tuple[Tensor, Tensor]] = {}
        self._steps = 0
        self._chain_model: weakref.ReferenceType[nn.Module] | None = None

    _state_attributes = ("feedback", "_moments", "_chain_model")

    def _extra_state(self) -> dict[str, Any]:
        """The feedback matrices, ``fdfa``'s Adam moments and its step count (for ``state_dict``)."""
        return {"feedback": {n: b.clone() for n, b in self.feedback.items()},
                "moments": {n: [m.clone(), v.clone()] for n, (m, v) in self._moments.items()},
                "steps": self._steps}

    def _load_extra_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.feedback = {n: b.clone() for n, b in state.get("feedback", {}).items()}
        self._moments = {n: (m.clone(), v.clone()) for n, (m, v) in state.get("moments", {}).items()}
        self._steps = int(state.get("steps", 0))

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self._generator is None and self._seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def _check_chain(self, where: str, model: nn.Module, pre: list[nn.Module], stages: list[Stage],
                     x: Tensor) -> None:
        if self._chain_model is not None and self._chain_model() is model:
            return
        h = x
        for m in pre:
            h = m(h)
        for st in stages:
            h = st.layer(h)
            h = st.act(h) if st.act is not None else h
            for m in st.post:
                h = m(h)
        ref = model(x)
        if not isinstance(ref, Tensor) or ref.shape != h.shape or not torch.allclose(ref, h, rtol=1e-4, atol=1e-5):
            raise ValueError(f"{where}: {type(model).__name__}'s forward is not the chain of its layers in "
                             "registration order; feedback alignment needs a sequential Linear/Conv2d network")
        self._chain_model = weakref.ref(model)

    def _uniform(self, shape: tuple[int, ...], bound: float, like: Tensor) -> Tensor:
        u = draw("uniform", shape, self._gen(like.device), like)
        return (u * 2 - 1) * (bound * self.feedback_scale)

    def _feedback(self, where: str, name: str, shape: tuple[int, ...], like: Tensor, init: str) -> Tensor:
        b = self.feedback.get(name)
        if b is None:
            if init == "zero":
                b = torch.zeros(shape, device=like.device, dtype=like.dtype)
            elif init == "fan-in":  # a unit's weight [out, in, …] or a group weight [G, in, out]: fan-in shape[1]
                b = self._uniform(shape, 1.0 / math.sqrt(math.prod(shape[1:]) if len(shape) != 3 else shape[1]),
                                  like)
            else:
                fan = math.prod(shape[1:])
                b = self._uniform(shape, 1.0 / math.sqrt(fan), like)
            self.feedback[name] = b
        elif tuple(b.shape) != tuple(shape):
            raise ValueError(f"{where}: feedback for layer {name!r} has shape {tuple(b.shape)} but the model needs "
                             f"{tuple(shape)}; use one estimator per model")
        elif b.dtype != like.dtype or b.device != like.device:  # model.double() / .to(device): follow it
            b = self.feedback[name] = b.to(device=like.device, dtype=like.dtype)
            if name in self._moments:
                self._moments[name] = tuple(t.to(device=like.device, dtype=like.dtype) for t in self._moments[name])
        return b

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        if self.mode in ("dfa", "fa") and any(is_activity_layer(m) for m in model.modules()):
            if self.mode == "fa":
                return self._estimate_units_fa(where, model, loss_fn, params)
            return self._estimate_units(where, model, loss_fn, params)
        pre, stages = parse_chain(where, model)
        runner = _Runner(self, model, pre, stages, where)
        value = loss_fn(runner)
        if runner.logits is None:
            raise ValueError(f"{where}: loss_fn must call its model argument (as m(x))")
        if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
            raise TypeError(f"{where}: loss_fn must return a floating-point tensor, got {type(value).__name__}")
        with torch.enable_grad():
            loss = value.mean()
            (e,) = torch.autograd.grad(loss, runner.logits)  # the criterion alone: logits are a leaf
        deltas = self._errors(where, stages, runner, e.detach())
        name_of = {id(p): n for n, p in params.items()}
        grads: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
        for st, x, d in zip(stages, runner.xs, deltas):
            for pname, g in layer_weight_grads(st.layer, x, d).items():
                n = name_of.get(id(getattr(st.layer, pname)))
                if n is not None:
                    grads[n] = grads[n] + g.to(grads[n].dtype)  # a layer used twice: both stages
        if self.mode == "fdfa":
            self._update_feedback(where, stages, runner)
        return loss.detach(), grads

    def _errors(self, where: str, stages: list[Stage], r: _Runner, e: Tensor) -> list[Tensor]:
        L = len(stages)
        deltas: list[Tensor] = [e] * L
        if self.mode == "fa":
            g = e
            for layer_idx in range(L - 1, 0, -1):
                up = stages[layer_idx]
                b = self._feedback(where, up.name, tuple(up.layer.weight.shape), up.layer.weight, "uniform")
                g_in = _feedback_input(up.layer, b, g, r.xs[layer_idx].shape)
                below = stages[layer_idx - 1]
                g_a = self._post_vjp(below, r.acts[layer_idx - 1], g_in)
                g = _act_jvp(below.act, r.zs[layer_idx - 1], g_a)
                deltas[layer_idx - 1] = g
            return deltas
        init = "zero" if self.mode == "fdfa" else "uniform"
        for i in range(L - 1):
            a = r.acts[i]
            shape = (e.shape[1], a[0].numel())
            b = self._feedback(where, stages[i].name, shape, a, init)
            deltas[i] = _act_jvp(stages[i].act, r.zs[i], (e @ b).reshape(a.shape))
        return deltas

    def _estimate_units_fa(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """FA on models of units: one backward pass through the parameter-free operations between the units,
        each unit an opaque step whose backward uses its feedback matrix in place of its weight (module
        docstring, "FA on models of units")."""
        chosen = units_covering(where, "fa", model, params)
        name_of = {id(p): n for n, p in params.items()}
        grads: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
        anchor = torch.zeros((), requires_grad=True)  # every unit step hangs on it: the backward reaches them all

        def hook(name: str, m: nn.Module, args: tuple[Any, ...], out: Any) -> Tensor:
            if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
                raise ValueError(f"{where}: fa needs unit {name!r} ({type(m).__name__}) to take one tensor and "
                                 "return one")
            b = self._feedback(where, name, tuple(m.weight.shape), m.weight.detach(), "fan-in")
            return FeedbackUnit.apply(args[0], out.detach(), anchor, (m, b, where, name_of, grads))

        handles = [m.register_forward_hook(lambda m, a, o, _n=n: hook(_n, m, a, o)) for n, m in chosen]
        logits: list[Tensor] = []

        def run(*args: Any, **kwargs: Any) -> Tensor:
            if logits:
                raise ValueError(f"{where}: loss_fn must call its model argument once")
            with torch.enable_grad():
                logits.append(model(*args, **kwargs))
            return logits[0]

        try:
            value = loss_fn(run)
        finally:
            for h in handles:
                h.remove()
        if not logits:
            raise ValueError(f"{where}: loss_fn must call its model argument (as m(x))")
        if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
            raise TypeError(f"{where}: loss_fn must return a floating-point tensor, got {type(value).__name__}")
        with torch.enable_grad():
            loss = value.mean()
            torch.autograd.grad(loss, [anchor], allow_unused=True)
        return loss.detach(), grads

    def _estimate_units(
        self, where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """DFA unit by unit (models built from :class:`~fwdgrad.derivatives.ActivityLayer` units, no chain
        needed): see "DFA on models of units" in the module docstring."""
        chosen = units_covering(where, "dfa", model, params)
        runner = UnitRunner(model, chosen, where)
        value = loss_fn(runner)
        runner.check(value)
        with torch.enable_grad():
            loss = value.mean()
            (e,) = torch.autograd.grad(loss, runner.logits)  # the criterion alone: logits are a leaf
        e = e.detach()
        name_of = {id(p): n for n, p in params.items()}
        grads: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
        seen: dict[str, int] = {}
        for unit in runner.units:
            if unit is runner.units[-1]:
                delta = e  # the read-out: its exact local gradient
            else:
                if unit.act is None:
                    raise ValueError(
                        f"{where}: unit {unit.name!r} ({type(unit.module).__name__}) is not followed by an "
                        "element-wise activation module before the next unit; dfa needs f' of every hidden unit "
                        "(a functional activation in forward cannot be seen)")
                calls = seen.get(unit.name, 0)
                seen[unit.name] = calls + 1
                key = unit.name if calls == 0 else f"{unit.name}#{calls}"
                out = unit.output
                shared = shared_dims(unit.module, out)
                per_example = [n for d, n in enumerate(out.shape) if d > 0 and d not in shared]
                b = self._feedback(where, key, (e.shape[1], math.prod(per_example)), out, "uniform")
                view = [out.shape[0]] + [1 if d in shared else n for d, n in enumerate(out.shape) if d > 0]
                sig = (e @ b).reshape(view).expand(out.shape)
                delta = _act_jvp(unit.act[0], unit.act[1], sig)
            for pname, g in local_weight_grads(unit.module, unit.inputs, delta).items():
                n = name_of.get(id(unit.module.get_parameter(pname)))
                if n is not None:
                    grads[n] = grads[n] + g.to(grads[n].dtype)
        return loss.detach(), grads

    @staticmethod
    def _post_vjp(st: Stage, a: Tensor, g: Tensor) -> Tensor:
        """Gradient at ``a`` from gradient ``g`` at ``post(a)``: a VJP through the parameter-free ops alone."""
        if not st.post:
            return g.reshape(a.shape)
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            out = leaf
            for m in st.post:
                out = m(out)
            (ga,) = torch.autograd.grad(out, leaf, g.reshape(out.shape))
        return ga

    def _update_feedback(self, where: str, stages: list[Stage], r: _Runner) -> None:
        if r.ydot is None:
            return
        self._steps += 1
        batch = r.ydot.shape[0]
        for i, eps in enumerate(r.noises):
            name = stages[i].name
            b = self.feedback[name]
            m_est = r.ydot.T @ eps.reshape(batch, -1) / batch  # [C, n_l], expectation J̄_l
            if self.feedback_update == "ema":
                b.add_(m_est - b, alpha=self.feedback_lr)
                continue
            grad = b - m_est
            m, v = self._moments.get(name, (torch.zeros_like(b), torch.zeros_like(b)))
            b1, b2 = self.betas
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self._moments[name] = (m, v)
            mh = m / (1 - b1**self._steps)
            vh = v / (1 - b2**self._steps)
            b.sub_(self.feedback_lr * mh / (vh.sqrt() + 1e-8))


# Not swept: Adam 1e-3 is what docs/guided.md's runs used; SGD 0.05 a guess. The generic tests check ``.grad``
# interop and the fused step; no global backward and exactness have their own tests (tests/test_feedback.py):
# the generic no-backward model applies its raising op in ``forward``, outside any chain.
_LR = {"adam": 1e-3, "sgd": 0.05}
_LR_NOTE = "Adam 1e-3 as in docs/guided.md's runs; SGD 0.05 learned in one epoch on every pair measured (docs/cli.md)"
# FA and DFA with SGD at 0.05 diverged on the 784-input MNIST nets (mlp: loss 2.31 → 1052 for DFA, 4.1 for FA
# in one epoch; fdfa-mlp: 435 for DFA). FA at 0.02 learned on every pair measured (MNIST mlp 0.40, fdfa-mlp
# 0.40, Fashion-MNIST mlp 0.79, MNIST-1D 2.31 → 2.13). DFA at 0.02 diverged on the Fashion-MNIST mlp (→ 14.0);
# 0.01 learned there (0.64) and on MNIST (0.45), and on MNIST-1D fell 3.7 % in one epoch (docs/cli.md).
_FA_LR = {"adam": 1e-3, "sgd": 0.02}
_FA_LR_NOTE = "Adam 1e-3 as in docs/guided.md's runs; SGD 0.02 (0.05 diverged on MNIST; docs/cli.md)"
_DFA_LR = {"adam": 1e-3, "sgd": 0.01}
_DFA_LR_NOTE = "Adam 1e-3 as in docs/guided.md's runs; SGD 0.01 (0.02 diverged on Fashion-MNIST; docs/cli.md)"


@register_estimator("fa", claims=("grad", "fused"), default_lr=_FA_LR, lr_note=_FA_LR_NOTE)
class FA(FeedbackAlignment):
    """Feedback alignment (Lillicrap et al. 2016): fixed random feedback through each layer."""

    mode = "fa"


@register_estimator("dfa", claims=("grad", "fused"), default_lr=_DFA_LR, lr_note=_DFA_LR_NOTE)
class DFA(FeedbackAlignment):
    """Direct feedback alignment (Nøkland 2016): fixed random feedback from the output error to each layer."""

    mode = "dfa"


@register_estimator("fdfa", claims=("grad", "fused"), default_lr=_LR, lr_note=_LR_NOTE)
class FDFA(FeedbackAlignment):
    """Forward direct feedback alignment (Bacho & Chu 2024): feedback learned from forward-mode noise."""

    mode = "fdfa"

    def __init__(
        self,
        *,
        feedback_lr: float = 1e-4,
        feedback_update: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(seed=seed, generator=generator)
        where = "fwdgrad.estimator('fdfa')"
        _check_positive(where, "feedback_lr", feedback_lr)
        if feedback_update not in FEEDBACK_UPDATES:
            raise ValueError(f"{where}: feedback_update must be one of {list(FEEDBACK_UPDATES)}, "
                             f"got {feedback_update!r}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"{where}: betas must be two floats in [0, 1), got {betas!r}")
        self.feedback_lr = float(feedback_lr)
        self.feedback_update = feedback_update
        self.betas = (float(betas[0]), float(betas[1]))


__all__ = [
    "DFA",
    "ELEMENTWISE",
    "FA",
    "FDFA",
    "STRUCTURE",
    "FeedbackAlignment",
    "Stage",
    "layer_weight_grads",
    "parse_chain",
]
