r"""Forward gradients projected onto gradient guesses (Fournier, Rivaud, Belilovsky, Eickenberg, Oyallon,
"Can Forward Gradient Match Backpropagation?", ICML 2023), registry name ``"fg-guess"``.

The network is cut into blocks, each with a small auxiliary head (the local-loss protocol of
:mod:`fwdgrad.local`). For block ``k`` with output :math:`h_k` (``[B, *S]``) a *guess* :math:`u` of the
gradient is formed cheaply; the true directional derivative of the **global** loss along it comes from one
forward-mode JVP, and the estimate is the projection of the true gradient onto the guess:

.. math:: \hat g = s\,\frac{\langle \nabla L, u\rangle}{\lVert u\rVert^2 + \varepsilon}\,u .

``space="activation"`` (default): one projection per example. The tangent :math:`u_i` is put on block
``k``'s output :math:`h_{k,i}`; the unreduced loss :math:`\ell_i` carries the tangent
:math:`d_i = \langle \nabla_{h_{k,i}} \ell_i, u_i\rangle` (one JVP for the whole batch, examples are
independent). With :math:`L = \frac1B\sum_i \ell_i`, the activation signal is
:math:`\hat g_{h,i} = s\,\frac{d_i / B}{\lVert u_i\rVert^2+\varepsilon} u_i` and block ``k``'s weight
gradient is :math:`(\partial h_k/\partial\theta_k)^\top \hat g_h`, a VJP through block ``k`` alone (its input
is cut, nothing flows to earlier blocks).

``space="weight"``: one projection per block: :math:`u` lives in the space of block ``k``'s parameters
:math:`\theta_k`, the JVP puts it on the parameters, :math:`d = \langle\nabla_{\theta_k} L, u\rangle`, and
:math:`\hat g_{\theta_k} = s\,d\,u / (\lVert u\rVert^2 + \varepsilon)`.

Guesses (``guess=``), with :math:`\ell^{loc}_k` block ``k``'s auxiliary loss (its head on its output):

=============  =========================================================================================
``local``      :math:`u = \nabla \ell^{loc}_k` (w.r.t. :math:`h_{k,i}` per example, or w.r.t. :math:`\theta_k`)
``random``     :math:`u \sim N(0, I)` with :math:`s = n` (the dimension of the space: per example for
               activations, :math:`|\theta_k|` for weights), which makes the estimate unbiased for
               :math:`\varepsilon = 0`: :math:`E[n\,vv^\top/\lVert v\rVert^2] = I`
``ntk``        as ``local`` through a head re-initialised at every step (the guess of a random linear head)
``fixed-ntk``  as ``local`` through a head initialised once at the first step and never trained
``above``      the next block's local gradient: :math:`\nabla \ell^{loc}_{k+1}` w.r.t. block ``k+1``'s input
               (block ``k+1``'s input must be block ``k``'s output, up to a reshape); the last block uses
               its own local gradient
=============  =========================================================================================

:math:`s = 1` for every guess except ``random``. The heads (block heads for ``local``/``above``, and the
read-out always) get their exact local gradient: a VJP through the head alone, on its cut input. With
``ntk``/``fixed-ntk`` the model's own block heads play no part and get zero.

Cost per step: one recording forward (with the local graph), one forward JVP per block, one local VJP per
block (and one forward to find the blocks when the heads are replaced). No backward crosses a block
boundary. ``loss_fn`` must return per-example losses (``reduction="none"``) for ``space="activation"``; a
model with batch coupling (BatchNorm in training mode) breaks the per-example independence it relies on.

Example:
    >>> import torch, torch.nn.functional as F, fwdgrad
    >>> from fwdgrad.models import build_model
    >>> model = build_model("block-cnn", (1, 8, 8), 3, channels="4x4")
    >>> x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    >>> est = fwdgrad.estimator("fg-guess", guess="local", seed=0)
    >>> loss = est(model, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    >>> model.blocks[0].conv.weight.grad.shape
    torch.Size([4, 1, 3, 3])
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fwdgrad import local
from fwdgrad._validation import check_seed_or_generator
from fwdgrad.errors import explain_forward_ad_errors
from fwdgrad.estimators.base import Estimator, LossFn, call_with_parameters
from fwdgrad.estimators.registry import register_estimator

Tensor = torch.Tensor

GUESSES = ("local", "random", "ntk", "fixed-ntk", "above")
SPACES = ("activation", "weight")


def _no_blocks_error(where: str, model: nn.Module) -> ValueError:
    return ValueError(
        f"{where}: {type(model).__name__} declared no blocks. fg-guess needs a model that follows the "
        "fwdgrad.local protocol: inside fwdgrad.local.recording() its forward must cut each block's input with "
        "fwdgrad.local.stop_gradient and call recorder.add_head(block, head, head_input, split_logits) for "
        "every block (an auxiliary head per block) and add_head(None, readout, ...) for the read-out "
        "(see fwdgrad.models.LocalMixer or fwdgrad.models.blockcnn.BlockCNN)"
    )


def _draw(kind: str, like: Tensor, gen: torch.Generator | None) -> Tensor:
    """A sample shaped like ``like`` on its device, from ``gen`` wherever it lives (moved if elsewhere)."""
    fn = torch.randn if kind == "normal" else torch.rand
    device = like.device if gen is None else gen.device
    return fn(like.shape, generator=gen, device=device, dtype=like.dtype).to(like.device)


def _linear_init(head: nn.Linear, generator: torch.Generator | None) -> dict[str, Tensor]:
    """Fresh weights for ``head`` as ``nn.Linear`` draws them: :math:`U(-1/\\sqrt{fan_{in}}, 1/\\sqrt{fan_{in}})`."""
    bound = 1.0 / math.sqrt(head.in_features)
    out = {"weight": (_draw("uniform", head.weight.detach(), generator) * 2 - 1) * bound}
    if head.bias is not None:
        out["bias"] = (_draw("uniform", head.bias.detach(), generator) * 2 - 1) * bound
    return out


class _Layout:
    """The blocks and heads of one model, found once by a forward pass in recording mode."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], heads: list[nn.Linear], readouts: list[nn.Linear]):
        self.model = weakref.ref(model)
        self.blocks = blocks
        self.heads = heads  # heads[k] belongs to blocks[k]
        self.readouts = readouts


@register_estimator(
    "fg-guess", needs="local-heads", claims=("grad", "fused"), default_lr={"adam": 1e-3, "sgd": 0.05},
    lr_note="not swept: Adam 1e-3 is what docs/guided.md's runs used; SGD 0.05 a guess",
)
class GuessForwardGradient(Estimator):
    r"""Forward gradient projected onto a gradient guess, per block (Fournier et al., ICML 2023).

    See the module docstring for the estimate, the guesses and the spaces.

    Args:
        guess: ``"local"``, ``"random"``, ``"ntk"``, ``"fixed-ntk"`` or ``"above"``.
        space: ``"activation"`` (a projection per example at each block's output) or ``"weight"`` (a
            projection per block in its parameter space).
        eps: :math:`\varepsilon \ge 0` in the denominator (1e-14 in the paper's code); it keeps a zero guess
            from producing NaN.
        seed, generator: the randomness of ``random``, ``ntk`` and ``fixed-ntk`` (at most one of them; a
            seed makes a generator on the model's device at the first call).

    Attributes:
        last_guesses: ``{block index: guess}`` of the last call (``[B, *S]`` for activations, a list of
            per-parameter tensors for weights), detached; a diagnostic for tests and studies.
    """

    per_example_loss = True

    def __init__(
        self,
        guess: str = "local",
        space: str = "activation",
        eps: float = 1e-14,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        where = "fwdgrad.estimator('fg-guess')"
        if guess not in GUESSES:
            raise ValueError(f"{where}: guess must be one of {list(GUESSES)}, got {guess!r}")
        if space not in SPACES:
            raise ValueError(f"{where}: space must be one of {list(SPACES)}, got {space!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{where}: eps must be a finite float >= 0, got {eps!r}")
        check_seed_or_generator(where, seed, generator)
        self.guess = guess
        self.space = space
        self.eps = float(eps)
        self._seed = seed
        self._generator = generator
        self._layout: _Layout | None = None
        self._fixed: dict[int, dict[str, Tensor]] = {}
        self.last_guesses: dict[int, Any] = {}

    # ------------------------------------------------------------------ helpers
    _state_attributes = ("_layout", "_fixed", "last_guesses")

    def _extra_state(self) -> dict[str, Any]:
        """The ``fixed-ntk`` head weights drawn once, by block (for ``state_dict``)."""
        return {"fixed": {k: {n: t.clone() for n, t in w.items()} for k, w in self._fixed.items()}}

    def _load_extra_state(self, state: dict[str, Any] | None) -> None:
        fixed = (state or {}).get("fixed", {})
        self._fixed = {int(k): {n: t.clone() for n, t in w.items()} for k, w in fixed.items()}

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self._generator is None and self._seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def _find_layout(self, where: str, model: nn.Module, loss_fn: LossFn) -> _Layout:
        lay = self._layout
        if lay is not None and lay.model() is model:
            return lay
        with torch.no_grad(), local.recording(False) as rec:
            loss_fn(model)
        blocks = [h.block for h in rec.heads if h.block is not None]
        if not blocks:
            raise _no_blocks_error(where, model)
        heads = [h.head for h in rec.heads if h.block is not None]
        readouts = [h.head for h in rec.heads if h.block is None]
        if len({id(b) for b in blocks}) != len(blocks):
            raise ValueError(f"{where}: {type(model).__name__} recorded the same block twice; every block needs "
                             "one head of its own")
        self._layout = _Layout(model, blocks, heads, readouts)
        return self._layout

    def _head_overrides(self, model: nn.Module, lay: _Layout, gen: torch.Generator | None) -> dict[str, Tensor]:
        """Replacement weights for the block heads (``ntk``: fresh every call; ``fixed-ntk``: drawn once)."""
        if self.guess not in ("ntk", "fixed-ntk"):
            return {}
        prefix = {id(m): n for n, m in model.named_modules()}
        out: dict[str, Tensor] = {}
        readouts = {id(r) for r in lay.readouts}
        for k, head in enumerate(lay.heads):
            if id(head) in readouts:  # the last block's head is the read-out: never re-drawn
                continue
            if self.guess == "fixed-ntk":
                if k not in self._fixed:
                    self._fixed[k] = _linear_init(head, gen)
                fresh = self._fixed[k]
            else:
                fresh = _linear_init(head, gen)
            name = prefix[id(head)]
            for pname, t in fresh.items():
                out[f"{name}.{pname}" if name else pname] = t
        return out

    # ------------------------------------------------------------------ estimate
    def estimate(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        where = f"{type(self).__name__}.__call__"
        device = next(iter(params.values())).device
        gen = self._gen(device)
        lay = self._find_layout(where, model, loss_fn)
        nblocks = len(lay.blocks)
        name_of = {id(p): n for n, p in params.items()}
        block_names = [[name_of[id(p)] for p in blk.parameters() if id(p) in name_of] for blk in lay.blocks]
        grads = {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for n, p in params.items()}

        # Pass A: recording forward with the local graph; block inputs become leaves, outputs are kept.
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}
        index = {id(b): k for k, b in enumerate(lay.blocks)}

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            leaf = args[0].detach().requires_grad_(True)
            inputs[index[id(mod)]] = leaf
            return (leaf, *args[1:])

        def post_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if not isinstance(out, Tensor):
                raise TypeError(f"{where}: block {type(mod).__name__} must return one tensor, got "
                                f"{type(out).__name__}")
            outputs[index[id(mod)]] = out
            return out

        overrides = self._head_overrides(model, lay, gen)
        handles = [b.register_forward_pre_hook(pre_hook) for b in lay.blocks]
        handles += [b.register_forward_hook(post_hook) for b in lay.blocks]
        try:
            with torch.enable_grad(), local.recording(False) as rec:
                value = call_with_parameters(model, loss_fn, overrides) if overrides else loss_fn(model)
        finally:
            for h in handles:
                h.remove()
        if len(outputs) != nblocks:
            raise ValueError(f"{where}: {type(model).__name__} ran {len(outputs)} of its {nblocks} blocks")
        batch = outputs[0].shape[0]
        if self.space == "activation":
            local.check_per_example(where, value, batch)
        heads = {id(h.block): h for h in rec.heads if h.block is not None}
        local_losses = [local.replay_criterion(loss_fn, heads[id(b)].split_logits) for b in lay.blocks]

        guesses = [self._guess(k, lay, params, block_names, inputs, outputs, local_losses, gen)
                   for k in range(nblocks)]
        self.last_guesses = {
            k: (u.detach() if isinstance(u, Tensor) else [t.detach() for t in u]) for k, u in enumerate(guesses)
        }

        # Pass B: one forward JVP per block along its guess, model in its ordinary (uncut) mode.
        for k, u in enumerate(guesses):
            if self.space == "activation":
                d = self._activation_jvp(where, model, loss_fn, lay.blocks[k], outputs[k].detach(), u)
                dims = tuple(range(1, u.dim()))
                scale = float(u[0].numel()) if self.guess == "random" else 1.0
                coef = scale * (d / batch) / ((u * u).sum(dims) + self.eps)
                signal = coef.view(-1, *([1] * (u.dim() - 1))).to(u.dtype) * u
                names = block_names[k]
                out = torch.autograd.grad(outputs[k], [params[n] for n in names], signal, retain_graph=True,
                                          allow_unused=True)
                for n, g in zip(names, out):
                    if g is not None:
                        grads[n] += g
            else:
                names = block_names[k]
                d = self._weight_jvp(where, model, loss_fn, params, names, u)
                scale = float(sum(t.numel() for t in u)) if self.guess == "random" else 1.0
                norm2 = sum((t * t).sum() for t in u)
                coef = scale * d / (norm2 + self.eps)
                for n, t in zip(names, u):
                    grads[n] += coef.to(t.dtype) * t

        # Heads: exact local gradients (read-out always; block heads when they make the guess).
        trained = list(lay.readouts) + ([] if self.guess in ("ntk", "fixed-ntk") else list(lay.heads))
        trained = list({id(h): h for h in trained}.values())  # a head that is also the read-out: once
        recorded = {id(h.head): h for h in rec.heads}
        for head in trained:
            h = recorded[id(head)]
            with torch.enable_grad():
                hl = local.replay_criterion(loss_fn, head(h.head_input.detach())).mean()
                hp = [p for p in head.parameters() if id(p) in name_of]
                if hp:
                    for p, g in zip(hp, torch.autograd.grad(hl, hp)):
                        grads[name_of[id(p)]] += g
        return value.detach().mean(), grads

    def _guess(
        self, k: int, lay: _Layout, params: dict[str, nn.Parameter], block_names: list[list[str]],
        inputs: dict[int, Tensor], outputs: dict[int, Tensor], local_losses: list[Tensor],
        gen: torch.Generator | None,
    ) -> Any:
        out = outputs[k]
        theta = [params[n] for n in block_names[k]]
        if self.guess == "random":
            if self.space == "activation":
                return _draw("normal", out.detach(), gen)
            return [_draw("normal", p.detach(), gen) for p in theta]
        above = self.guess == "above" and k + 1 < len(lay.blocks)
        with torch.enable_grad():
            if above:
                g_in = torch.autograd.grad(local_losses[k + 1].sum(), inputs[k + 1], retain_graph=True)[0]
                if g_in.numel() != out.numel():
                    raise ValueError(
                        f"fwdgrad.estimator('fg-guess'): guess='above' needs block {k + 1}'s input to be block "
                        f"{k}'s output; their sizes differ ({tuple(g_in.shape)} vs {tuple(out.shape)})"
                    )
                g_out = g_in.reshape(out.shape)
                if self.space == "activation":
                    return g_out.detach()
                grads = torch.autograd.grad(out, theta, g_out / out.shape[0], retain_graph=True, allow_unused=True)
            elif self.space == "activation":
                return torch.autograd.grad(local_losses[k].sum(), out, retain_graph=True)[0].detach()
            else:
                grads = torch.autograd.grad(local_losses[k].mean(), theta, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(theta, grads)]

    @staticmethod
    def _activation_jvp(where: str, model: nn.Module, loss_fn: LossFn, block: nn.Module, primal: Tensor,
                        u: Tensor) -> Tensor:
        """``d[i] = ⟨∇_{h_i} ℓ_i, u_i⟩`` for every example, by one JVP with the tangent ``u`` on ``block``'s output."""

        def inject(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Tensor:
            return fwAD.make_dual(primal, u.to(primal.dtype))

        handle = block.register_forward_hook(inject)
        try:
            with torch.no_grad(), explain_forward_ad_errors(where, model), fwAD.dual_level():
                value = loss_fn(model)
                tangent = fwAD.unpack_dual(value).tangent
        finally:
            handle.remove()
        local.check_per_example(where, value, primal.shape[0])
        return torch.zeros_like(value) if tangent is None else tangent.detach()

    @staticmethod
    def _weight_jvp(where: str, model: nn.Module, loss_fn: LossFn, params: dict[str, nn.Parameter],
                    names: list[str], u: list[Tensor]) -> Tensor:
        """``⟨∇_θ L, u⟩`` (``L`` the batch mean) by one JVP with the tangent ``u`` on the block's parameters."""
        with torch.no_grad(), explain_forward_ad_errors(where, model), fwAD.dual_level():
            duals = {n: fwAD.make_dual(params[n].detach(), t) for n, t in zip(names, u)}
            value = call_with_parameters(model, loss_fn, duals)
            tangent = fwAD.unpack_dual(value).tangent
        if tangent is None:
            return torch.zeros((), dtype=value.dtype, device=value.device)
        return tangent.detach().mean()


__all__ = ["GUESSES", "SPACES", "GuessForwardGradient"]
