"""The benchmarked configurations: the models (fixed seeds, one batch each), a :class:`Config` per measured
step and the :class:`Result` of its measurement, and the grids ``fwdgrad bench`` runs.

Example:
    >>> Config(model="mlp8", method="fg-w", tangents="rank1", k=4).label
    'fg-w rank1 K=4'
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: Model name → (builder, batch size). The MLPs are ``depth × Linear(width, width) + ReLU`` and a head of 10.
MODEL_BATCH = {"mlp8": 512, "mlp32": 2048, "mlp8x4096": 4096, "mlp4x128": 64, "cnn": 128, "tiny-mlp": 32,
               "tiny-cnn": 8}
METHODS = ("forward", "bp", "jvp-naive", "fg-w")


@dataclass(frozen=True)
class Config:
    """One benchmark configuration; ``label`` names it in the table."""

    model: str
    method: str
    tangents: str = "gaussian"
    k: int = 1
    fused: bool = False
    chunk_size: int | None = None

    @property
    def label(self) -> str:
        if self.method != "fg-w":
            return self.method
        text = f"fg-w {self.tangents} K={self.k}"
        if self.chunk_size is not None:
            text += f" chunk={self.chunk_size}"
        return text + (" fused" if self.fused else "")


@dataclass
class Result:
    """The measurement of one configuration (``error`` set when the worker failed)."""

    config: Config
    median_ms: float = math.nan
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: float = math.nan
    extra_mb: float = math.nan
    extra_default_mb: float = math.nan
    memory_method: str = ""
    threads: int = 0
    device: str = "cpu"
    timing: str = ""
    error: str = ""


def _mlp(depth: int, width: int, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _cnn(channels: int, hidden: int) -> nn.Module:
    with contextlib.suppress(Exception):  # the project's CNN, when its module is there
        from fwdgrad.models import build_model

        return build_model("cnn", (1, 28, 28), 10, channels=channels, hidden=hidden)
    return nn.Sequential(  # the same architecture (Baydin et al. 2022)
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


def build(model: str, device: str = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one batch ``(x, y)`` of a benchmark model name, with fixed seeds."""
    torch.manual_seed(0)
    if model == "mlp8":
        net, shape = _mlp(8, 1024), (1024,)
    elif model == "mlp32":
        net, shape = _mlp(32, 1024), (1024,)
    elif model == "mlp8x4096":
        net, shape = _mlp(8, 4096), (4096,)
    elif model == "mlp4x128":
        net, shape = _mlp(4, 128), (128,)
    elif model == "cnn":
        net, shape = _cnn(64, 1024), (1, 28, 28)
    elif model == "tiny-mlp":
        net, shape = _mlp(2, 64), (64,)
    elif model == "tiny-cnn":
        net, shape = _cnn(4, 32), (1, 28, 28)
    else:
        raise ValueError(f"fwdgrad.bench: unknown model {model!r}; choose one of {sorted(MODEL_BATCH)}")
    g = torch.Generator().manual_seed(1)
    batch = MODEL_BATCH[model]
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return net.to(device), x.to(device), y.to(device)


def full_configs(
    models: Sequence[str] = ("mlp8", "mlp32", "cnn"), ks: Sequence[int] = (1, 4, 16),
    tangents: Sequence[str] = ("gaussian", "rademacher", "rank1"), fused: Sequence[bool] = (False, True),
    chunk_size: int | None = None, baselines: Sequence[str] = ("forward", "bp", "jvp-naive"),
) -> list[Config]:
    """The baselines (one forward, backprop, the naive ``torch.func.jvp`` step) and FG-W over tangents × K ×
    fused; ``chunk_size`` applies to K > 1."""
    out = []
    for model in models:
        out += [Config(model, b) for b in baselines]
        for name in tangents:
            for k in ks:
                for f in fused:
                    out.append(Config(model, "fg-w", name, k, f, chunk_size if k > 1 else None))
    return out


def quick_configs() -> list[Config]:
    """A smoke test on tiny models: every method and path once (runs in well under a minute)."""
    return [
        Config("tiny-mlp", "bp"),
        Config("tiny-mlp", "jvp-naive"),
        Config("tiny-mlp", "fg-w", "gaussian", 1),
        Config("tiny-mlp", "fg-w", "rank1", 4, fused=True),
        Config("tiny-cnn", "fg-w", "rank1", 2),
    ]
