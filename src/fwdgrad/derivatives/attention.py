r"""Attention under forward mode: PyTorch's fused attention kernels have no forward-AD rule.

``F.scaled_dot_product_attention`` dispatches to fused kernels (flash / memory-efficient / cuDNN, and on
CPU ``_scaled_dot_product_flash_attention_for_cpu``), and ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` in eval mode take a "fast path" (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``). None of them has a forward-mode derivative (PyTorch issues 98164,
117629, 146901): a JVP through them raises ``NotImplementedError``. The math backend of SDPA is written in
differentiable primitives (matmul, softmax, dropout) and has both derivatives.

:func:`forward_mode_attention` runs its block with SDPA restricted to the math backend
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) and the ``nn.MultiheadAttention`` fast path off
(``torch.backends.mha.set_fastpath_enabled(False)``), and restores both afterwards. The math path computes
the same function (up to rounding) with more memory: it forms the ``[B, H, T, T]`` attention matrix.
Passes that only evaluate (zeroth order, backprop) do not need it.

Example:
    >>> import torch
    >>> from torch.func import jvp
    >>> from fwdgrad.derivatives.attention import forward_mode_attention
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    >>> x, v = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    >>> with forward_mode_attention(mha, quiet=True):
    ...     out, tangent = jvp(lambda x: mha(x, x, x, need_weights=False)[0], (x,), (v,))
    >>> tuple(tangent.shape)
    (2, 3, 8)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_said = False


def has_attention(model: nn.Module | None) -> bool:
    """Whether ``model`` holds an attention module: an ``nn.MultiheadAttention``, an
    ``nn.TransformerEncoderLayer`` / ``DecoderLayer``, or any module whose class name contains
    ``Attention`` (the Hugging Face convention)."""
    if model is None:
        return False
    kinds = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return any(isinstance(m, kinds) or "Attention" in type(m).__name__ for m in model.modules())


@contextlib.contextmanager
def forward_mode_attention(model: nn.Module | None = None, *, quiet: bool = False) -> Iterator[None]:
    """Run the block with attention on PyTorch's math path, so that forward-mode AD passes through it.

    Args:
        model: the model of the pass; when it holds attention (:func:`has_attention`) the fallback is
            announced once per process with a ``UserWarning`` (``None``: never announced).
        quiet: never announce.

    The block sees SDPA restricted to ``SDPBackend.MATH`` and the ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` fast path disabled; both settings are restored on exit, however the
    block ends. Nesting is fine.
    """
    global _said
    if not quiet and not _said and has_attention(model):
        _said = True
        warnings.warn(
            "fwdgrad: forward-mode passes run attention on PyTorch's math path (SDPBackend.MATH, no "
            "nn.MultiheadAttention fast path): the fused attention kernels have no forward-AD rule. "
            "Same function, more memory (the [B, H, T, T] attention matrix is formed). Said once.",
            UserWarning,
            stacklevel=3,
        )
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
