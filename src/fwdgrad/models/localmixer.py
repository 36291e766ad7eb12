r"""The LocalMixer of Ren, Kornblith, Liao and Hinton (ICLR 2023): an MLP-Mixer built for local losses.

The image is cut into ``P = n×n`` patches (tokens of ``C·(H/n)·(W/n)`` values). Each block mixes tokens
(blocks after the first), mixes channels, then mixes channels *within each of G groups*; every linear layer is
followed by a layer normalisation without parameters, and its input is normalised as well (the paper:
"normalisation before and after each linear layer"). Every block has a local head: the features, normalised
per group and averaged over patches, go through one linear classifier shared by the groups. A read-out
classifier on the last block's patch-averaged features gives the prediction.

Layer by layer (``D`` channels, ``G`` groups of ``c = D/G``; shapes ``[B, P, …]``)::

    block 0:  LN(token) → Linear(F→D) → LN → ReLU → per-group LN → GroupLinear(c→c) → LN → ReLU
    block k:  LN → TokenLinear(P→P) → LN → ReLU → LN → Linear(D→D) → LN → ReLU
              → per-group LN → GroupLinear(c→c) → LN → (+ block input) → ReLU
    head k:   per-group LN → mean over patches → Linear(D→classes)
    read-out: mean over patches → LN → Linear(D→classes)   (zero-initialised)

Each "linear then LN" pair is one module (:class:`ChannelLinear`, :class:`GroupLinear`,
:class:`TokenLinear`) implementing :class:`fwdgrad.derivatives.ActivityLayer`: activity perturbation perturbs its
normalised output,
right before the ReLU (so inactive units can be skipped), and gets its weight gradient by the exact local
rule through the normalisation and the linear map (``activity_weight_grads``). The modules also declare how their
outputs and parameters map onto the per-group, per-patch local losses (``local_loss_layout``,
``local_param_loss_layout``, see :mod:`fwdgrad.local`).

Configurations (Table 2 of the paper; parameter counts for 28×28×1 MNIST or 32×32×3 CIFAR-10 inputs):

===========  ======  =======  ========  ======  ===========
name         blocks  patches  channels  groups  parameters
===========  ======  =======  ========  ======  ===========
S/1/1        1       1×1      256       1       271,892 (MNIST)
M/1/16       1       1×1      512       16      429,076 (MNIST)
M/8/16       4       8×8      512       16      918,770 (CIFAR-10)
L/8/64       4       8×8      2048      64      13,074,674 (CIFAR-10)
===========  ======  =======  ========  ======  ===========

Outside :func:`fwdgrad.local.recording` the model is an ordinary end-to-end network (BP, FG-W and FG-A train
it through the read-out); inside it, blocks are cut from one another and every head is recorded, which is
what the local-loss estimators (``l-bp``, ``lg-bp``, ``lg-fg-w``, ``lg-fg-a``) need.

Example:
    >>> import torch
    >>> from fwdgrad.models.localmixer import LocalMixer
    >>> model = LocalMixer.from_config("s1", (1, 28, 28), 10)
    >>> sum(p.numel() for p in model.parameters())
    271892
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad import local
from fwdgrad.models import register_model

Tensor = torch.Tensor

CONFIGS: dict[str, dict[str, int]] = {
    "s1": {"num_blocks": 1, "num_patches": 1, "channels": 256, "groups": 1},
    "m1-16": {"num_blocks": 1, "num_patches": 1, "channels": 512, "groups": 16},
    "m8-16": {"num_blocks": 4, "num_patches": 8, "channels": 512, "groups": 16},
    "l8-64": {"num_blocks": 4, "num_patches": 8, "channels": 2048, "groups": 64},
}

_EPS = 1e-5


def _normalise(x: Tensor) -> Tensor:
    """Layer normalisation over the last dimension, without parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=_EPS)


def _normalise_vjp(z: Tensor, g: Tensor) -> Tensor:
    r"""VJP of :func:`_normalise` at ``z``: :math:`\frac1\sigma (g - \bar g - y\,\overline{g y})`, last dim."""
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, unbiased=False, keepdim=True)
    inv = torch.rsqrt(var + _EPS)
    y = (z - mu) * inv
    return inv * (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True))


def _init(weight: Tensor, fan_in: int) -> None:
    with torch.no_grad():
        weight.normal_(0.0, 1.0 / math.sqrt(fan_in))


class ChannelLinear(nn.Module):
    """``LN(x Wᵀ + b)`` over the last dimension ``[B, P, in] → [B, P, out]``; ``out`` splits into ``groups``."""

    #: the same weights at every patch (output dimension 1): ``dfa`` shares its feedback over it
    fwdgrad_weight_shared_dims = (1,)

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.groups = groups
        _init(self.weight, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return _normalise(F.linear(x, self.weight, self.bias))

    def activity_weight_grads(self, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Exact weight and bias gradients of this module alone, given the gradient ``g`` of its output."""
        gz = _normalise_vjp(F.linear(x, self.weight.detach(), self.bias.detach()), g)
        gz2, x2 = gz.reshape(-1, gz.shape[-1]), x.reshape(-1, x.shape[-1])
        return {"weight": gz2.T @ x2, "bias": gz2.sum(0)}

    def feedback_input_grad(self, x: Tensor, g: Tensor, b: Tensor) -> Tensor:
        """The input gradient from the output gradient ``g`` with the weight replaced by ``b`` (shape of the
        weight) in the linear map, the normalisation's VJP at the true pre-activation (feedback alignment)."""
        return _normalise_vjp(F.linear(x, self.weight.detach(), self.bias.detach()), g) @ b

    def local_loss_layout(self, d: Tensor) -> Tensor:
        """``[B, P, G]`` per-loss derivatives → ``[B, P, out]``: channel chunk ``g`` feeds group ``g``'s loss."""
        return d.repeat_interleave(self.weight.shape[0] // d.shape[-1], dim=-1)

    def local_param_loss_layout(self, name: str, dg: Tensor) -> Tensor:
        rows = dg.repeat_interleave(self.weight.shape[0] // dg.shape[0])
        return rows[:, None] if name == "weight" else rows


class GroupLinear(nn.Module):
    """Per-group ``LN(x_g W_g + b_g)``: ``[B, P, G, c_in] → [B, P, G, c_out]``; weight ``[G, c_in, c_out]``."""

    #: the same weights at every patch (output dimension 1): ``dfa`` shares its feedback over it
    fwdgrad_weight_shared_dims = (1,)

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features))
        _init(self.weight, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return _normalise(torch.einsum("bpgc,gcd->bpgd", x, self.weight) + self.bias)

    def activity_weight_grads(self, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Exact weight and bias gradients of this module alone, given the gradient ``g`` of its output."""
        z = torch.einsum("bpgc,gcd->bpgd", x, self.weight.detach()) + self.bias.detach()
        gz = _normalise_vjp(z, g)
        return {"weight": torch.einsum("bpgc,bpgd->gcd", x, gz), "bias": gz.sum((0, 1))}

    def feedback_input_grad(self, x: Tensor, g: Tensor, b: Tensor) -> Tensor:
        """As :meth:`ChannelLinear.feedback_input_grad`: ``b`` ``[G, c_in, c_out]`` in place of the weight."""
        z = torch.einsum("bpgc,gcd->bpgd", x, self.weight.detach()) + self.bias.detach()
        return torch.einsum("bpgd,gcd->bpgc", _normalise_vjp(z, g), b)

    def local_loss_layout(self, d: Tensor) -> Tensor:
        """``[B, P, G]`` → ``[B, P, G, 1]``: group ``g`` feeds its own loss only."""
        return d.unsqueeze(-1)

    def local_param_loss_layout(self, name: str, dg: Tensor) -> Tensor:
        return dg[:, None, None] if name == "weight" else dg[:, None]


class TokenLinear(nn.Module):
    """Token mixing ``[B, P, D] → [B, P, D]``: ``z[b, q, :] = Σ_p W[q, p] x[b, p, :] + b[q]``, then LN over D."""

    #: its weights are shared over the channels, but its output is normalised over them: a feedback shared
    #: over the channels would be removed by the normalisation, so ``dfa`` keeps one per token and channel
    fwdgrad_weight_shared_dims = ()

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tokens, num_tokens))
        self.bias = nn.Parameter(torch.zeros(num_tokens))
        _init(self.weight, num_tokens)

    def _pre(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("bpd,qp->bqd", x, w) + b[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return _normalise(self._pre(x, self.weight, self.bias))

    def activity_weight_grads(self, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Exact weight and bias gradients of this module alone, given the gradient ``g`` of its output."""
        gz = _normalise_vjp(self._pre(x, self.weight.detach(), self.bias.detach()), g)
        return {"weight": torch.einsum("bqd,bpd->qp", gz, x), "bias": gz.sum((0, 2))}

    def feedback_input_grad(self, x: Tensor, g: Tensor, b: Tensor) -> Tensor:
        """As :meth:`ChannelLinear.feedback_input_grad`: ``b`` ``[P, P]`` in place of the weight."""
        gz = _normalise_vjp(self._pre(x, self.weight.detach(), self.bias.detach()), g)
        return torch.einsum("bqd,qp->bpd", gz, b)

    def local_loss_layout(self, d: Tensor) -> Tensor:
        """``[B, P, G]`` → ``[B, P, 1]``: a mixed token feeds every group's loss at its patch."""
        return d.sum(-1, keepdim=True)

    def local_param_loss_layout(self, name: str, dg: Tensor) -> Tensor:
        return dg.sum()


class MixerBlock(nn.Module):
    """One LocalMixer block ``[B, P, D_in] → [B, P, G, c]`` (see the module docstring)."""

    def __init__(self, in_features: int, num_tokens: int, channels: int, groups: int, first: bool) -> None:
        super().__init__()
        c = channels // groups
        self.first = first
        self.groups = groups
        self.token = None if first else TokenLinear(num_tokens)
        self.token_act = None if first else nn.ReLU()
        self.channel = ChannelLinear(in_features, channels, groups)
        self.channel_act = nn.ReLU()
        self.group = GroupLinear(groups, c, c)
        self.group_act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        b, p, _ = x.shape
        h = _normalise(x)
        if self.token is not None:
            h = _normalise(self.token_act(self.token(h)))
        h = self.channel_act(self.channel(h))
        h = _normalise(h.reshape(b, p, self.groups, -1))
        h = self.group(h)
        if self.first:
            return self.group_act(h)
        return self.group_act(h + x.reshape(h.shape))


class LocalMixer(nn.Module):
    """The LocalMixer (see the module docstring).

    Args:
        input_shape: ``(C, H, W)``; ``H`` and ``W`` must be multiples of ``num_patches``.
        num_classes: number of logits.
        num_blocks: mixer blocks, each with a local head.
        num_patches: patches per side (``P = num_patches²`` tokens).
        channels: ``D``, channels of every block.
        groups: ``G``, groups of channels (``D`` must be a multiple of ``G``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        num_blocks: int = 1,
        num_patches: int = 1,
        channels: int = 256,
        groups: int = 1,
    ) -> None:
        super().__init__()
        where = "fwdgrad.models.LocalMixer"
        if len(input_shape) != 3:
            raise ValueError(f"{where}: input_shape must be (C, H, W), got {tuple(input_shape)}")
        for name, v in (("num_blocks", num_blocks), ("num_patches", num_patches), ("channels", channels),
                        ("groups", groups), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")
        c, h, w = (int(s) for s in input_shape)
        if h % num_patches or w % num_patches:
            raise ValueError(f"{where}: num_patches={num_patches} does not divide the image size {h}×{w}")
        if channels % groups:
            raise ValueError(f"{where}: groups={groups} does not divide channels={channels}")
        self.input_shape = (c, h, w)
        self.num_patches = num_patches
        self.channels = channels
        self.groups = groups
        tokens = num_patches * num_patches
        token_features = c * (h // num_patches) * (w // num_patches)
        self.blocks = nn.ModuleList(
            MixerBlock(token_features if k == 0 else channels, tokens, channels, groups, first=k == 0)
            for k in range(num_blocks)
        )
        self.heads = nn.ModuleList(nn.Linear(channels, num_classes) for _ in range(num_blocks))
        for head in self.heads:
            _init(head.weight, channels)
            nn.init.zeros_(head.bias)
        self.readout = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    @classmethod
    def from_config(cls, name: str, input_shape: Sequence[int], num_classes: int) -> LocalMixer:
        """Build a configuration of the paper's Table 2 by name: ``s1``, ``m1-16``, ``m8-16``, ``l8-64``."""
        if name not in CONFIGS:
            raise ValueError(f"fwdgrad.models.LocalMixer.from_config: unknown config {name!r}; known {sorted(CONFIGS)}")
        return cls(input_shape, num_classes, **CONFIGS[name])

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] → [B, P, C·ph·pw]`` (patches in row-major order)."""
        b, c, h, w = x.shape
        n = self.num_patches
        x = x.reshape(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, n * n, -1)

    def forward(self, x: Tensor) -> Tensor:
        rec = local.current()
        h = self.patchify(x)
        b, p = h.shape[:2]
        for blk, head in zip(self.blocks, self.heads):
            if rec is not None:
                h = local.stop_gradient(h)
            out = blk(h)  # [B, P, G, c]
            if rec is not None:
                feats = _normalise(out)
                head_input, split = local.split_head_logits(feats, head, rec.groups)
                rec.add_head(blk, head, head_input, split)
            h = out.reshape(b, p, -1)
        pooled = h.mean(1)
        if rec is not None:
            return rec.add_head(None, self.readout, _normalise(local.stop_gradient(pooled)), None)
        return self.readout(_normalise(pooled))


def _builder(config: str):
    def build(input_shape: Sequence[int], num_classes: int) -> LocalMixer:
        return LocalMixer.from_config(config, input_shape, num_classes)

    build.__doc__ = f"LocalMixer {config} (Ren et al. 2023, Table 2): {CONFIGS[config]}"
    return build


for _name in CONFIGS:
    register_model(f"localmixer-{_name}")(_builder(_name))
register_model("localmixer")(LocalMixer)
