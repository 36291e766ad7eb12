"""The measured steps: one full training step of a :class:`~fwdgrad.bench.models.Config` (gradient or
estimate, then the SGD update), and the priming that keeps PyTorch's first-use cost out of a step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad.bench.models import METHODS, Config, build

LR = 1e-4


def _naive_jvp_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: torch.optim.Optimizer,
                    generator: torch.Generator) -> None:
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device).to(p.device)
                for n, p in params.items()}
    _, d = torch.func.jvp(lambda ps: loss_fn_call(model, loss_fn, ps), (params,), (tangents,))
    for (_, p), t in zip(model.named_parameters(), tangents.values()):
        if p.grad is None:
            p.grad = t.mul_(d)
        else:  # .grad kept between steps, as the other methods have it
            p.grad.copy_(t).mul_(d)
    opt.step()


def loss_fn_call(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], params: dict) -> torch.Tensor:
    """``loss_fn(model)`` with ``params`` substituted (``functional_call``)."""
    return torch.func.functional_call(_Wrap(model, loss_fn), {"m." + n: t for n, t in params.items()}, ())


class _Wrap(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.m, self.loss_fn = model, loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn(self.m)


def make_step(cfg: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A closure running one full training step of ``cfg`` (gradient or estimate, then the SGD update)."""
    import fwdgrad

    loss_fn = lambda m: F.cross_entropy(m(x), y)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if cfg.method == "forward":

        def step() -> None:
            with torch.no_grad():
                loss_fn(model)

        return step
    if cfg.method == "bp":

        def step() -> None:
            opt.zero_grad(set_to_none=False)
            loss_fn(model).backward()
            opt.step()

        return step
    if cfg.method == "jvp-naive":
        gen = torch.Generator(device=x.device).manual_seed(0)  # drawn where the model is, as a user would

        def step() -> None:
            _naive_jvp_step(model, loss_fn, opt, gen)

        return step
    if cfg.method != "fg-w":
        raise ValueError(f"fwdgrad.bench: unknown method {cfg.method!r}; choose one of {METHODS}")
    est = fwdgrad.ForwardGradient(num_directions=cfg.k, tangents=cfg.tangents, seed=0, chunk_size=cfg.chunk_size)
    if cfg.fused:
        return lambda: est.sgd_step(model, loss_fn, lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        est(model, loss_fn)
        opt.step()

    return step


def prime(cfg: Config, device: str) -> None:
    """Two steps of ``cfg`` on a tiny model of the same kind, dropped: PyTorch loads much on first use
    (forward-AD rules, ``torch.func``, decompositions), a one-time cost that is not a step's."""
    tiny = "tiny-cnn" if "cnn" in cfg.model else "tiny-mlp"
    tiny_model, tiny_x, tiny_y = build(tiny, device)
    tiny_step = make_step(Config(tiny, cfg.method, cfg.tangents, cfg.k, cfg.fused, cfg.chunk_size),
                          tiny_model, tiny_x, tiny_y)
    for _ in range(2):
        tiny_step()
