r"""Estimator diagnostics: how far each gradient estimate is from the true gradient, on your model and batch.

For a model, a batch and a list of estimators, :func:`diagnose` draws ``samples`` independent estimates
``ĝ_1..ĝ_S`` of each estimator (``Estimator.estimate``; ``.grad`` is not touched) and compares them with the
true gradient ``a`` from ``torch.autograd`` (the reference; the estimators themselves run as they would in
training). Per parameter tensor and over all parameters together:

- ``cosine``: mean of ``cos(ĝ_s, a)`` (and its standard deviation over samples);
- ``rel_bias``: ``‖ḡ − a‖/‖a‖`` with ``ḡ`` the Monte-Carlo mean, beside ``rel_bias_noise``
  ``= sqrt(tr Var / S)/‖a‖``, the size it has for an unbiased estimator (a bias well above it is real);
- ``variance``: ``tr Var(ĝ) = Σ‖ĝ_s − ḡ‖²/(S − 1)``;
- ``second_moment``: ``E‖ĝ‖²`` measured, with its standard error, beside ``second_moment_theory`` where
  the theory is known (``fg-w`` under every tangent sampler, see :mod:`fwdgrad.diagnostics.moments`, and
  ``bp``, for which it is ``‖a‖²``), and their ratio;
- ``snr``: ``‖a‖² / E‖ĝ − a‖²`` (signal-to-noise ratio; infinite for an exact method);
- ``time_ms`` per estimate (mean over the samples) and ``memory_mb``, the peak growth of resident memory
  during one estimate after a warm-up one, with freed heap first returned to the OS (Linux; ``None``
  elsewhere).

Statistics are accumulated in float64 as sums, so memory does not grow with ``samples``.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fwdgrad.diagnostics import diagnose
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> rep = diagnose(model, x, y, ["bp", "fg-w"], samples=20, seed=0)
    >>> round(rep["methods"][0]["overall"]["cosine"], 6)
    1.0
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import gc
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad import Estimator, _procmem, estimator_class
from fwdgrad.diagnostics.moments import second_moments
from fwdgrad.directions import SAMPLERS

Tensor = torch.Tensor
Criterion = Callable[..., Tensor]


def parse_methods(text: str | Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``"fg-w:tangents=rademacher,num_directions=4;bp"`` → ``[(label, name, options), ...]``.

    Methods are separated by ``;``; options ``KEY=VALUE`` by ``,`` (values read as Python literals, else
    strings). ``all`` is every registered estimator with its defaults plus ``fg-w`` under every other tangent
    sampler. A list of strings is read item by item."""
    where = "fwdgrad.diagnostics.parse_methods"
    items = [text] if isinstance(text, str) else list(text)
    out: list[tuple[str, str, dict[str, Any]]] = []
    for item in items:
        for piece in (p.strip() for p in item.split(";")):
            if not piece:
                continue
            name, _, rest = piece.partition(":")
            name = name.strip()
            if name == "all":
                out += [(n, n, {}) for n in fwdgrad.available_estimators()]
                out += [(f"fg-w:tangents={t}", "fg-w", {"tangents": t}) for t in SAMPLERS if t != "gaussian"]
                continue
            if name not in fwdgrad.available_estimators():
                raise ValueError(f"{where}: unknown method {name!r}; available: {fwdgrad.available_estimators()}")
            opts: dict[str, Any] = {}
            for kv in (s for s in rest.split(",") if s.strip()):
                key, eq, value = kv.partition("=")
                if not eq:
                    raise ValueError(f"{where}: option {kv!r} of {name!r} is not KEY=VALUE")
                try:
                    opts[key.strip()] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    opts[key.strip()] = value.strip()
            out.append((piece, name, opts))
    if not out:
        raise ValueError(f"{where}: no method in {text!r}")
    return out


def _make(name: str, options: dict[str, Any], seed: int) -> Estimator:
    cls = estimator_class(name)
    takes = inspect.signature(cls.__init__).parameters
    if "seed" in takes and "seed" not in options and "generator" not in options:
        return cls(**options, seed=seed)
    return cls(**options)


class _Acc:
    """Running sums, in float64, of one block's estimates."""

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.a2 = float(a.pow(2).sum())
        self.s = 0
        self.sum_g = torch.zeros_like(a)
        self.sum_sq = 0.0
        self.sum_sq2 = 0.0
        self.sum_err = 0.0
        self.sum_cos = 0.0
        self.sum_cos2 = 0.0

    def add(self, g: Tensor) -> None:
        sq = float(g.pow(2).sum())
        self.s += 1
        self.sum_g += g
        self.sum_sq += sq
        self.sum_sq2 += sq * sq
        self.sum_err += float((g - self.a).pow(2).sum())
        denom = math.sqrt(sq * self.a2)
        c = float((g * self.a).sum()) / denom if denom > 0 else math.nan
        self.sum_cos += c
        self.sum_cos2 += c * c

    def stats(self, theory: float | None) -> dict[str, Any]:
        s = self.s
        mean = self.sum_g / s
        var = max(0.0, (self.sum_sq - s * float(mean.pow(2).sum())) / (s - 1)) if s > 1 else math.nan
        norm_a = math.sqrt(self.a2)
        m2 = self.sum_sq / s
        m2_se = math.sqrt(max(0.0, self.sum_sq2 / s - m2 * m2) / s) if s > 1 else math.nan
        cos = self.sum_cos / s
        mse = self.sum_err / s
        return {
            "numel": int(self.a.numel()),
            "true_grad_norm": norm_a,
            "cosine": cos,
            "cosine_std": math.sqrt(max(0.0, self.sum_cos2 / s - cos * cos)),
            "rel_bias": float((mean - self.a).norm()) / norm_a if norm_a > 0 else math.nan,
            "rel_bias_noise": math.sqrt(var / s) / norm_a if norm_a > 0 else math.nan,
            "variance": var,
            "second_moment": m2,
            "second_moment_se": m2_se,
            "second_moment_theory": theory,
            "second_moment_ratio": m2 / theory if theory else None,
            "snr": self.a2 / mse if mse > 0 else math.inf,
        }


def _theory(est: Estimator, blocks: dict[str, tuple[int, float]]) -> dict[str, float] | None:
    if est.name == "bp":
        return {k: a2 for k, (_, a2) in blocks.items()}
    if est.name == "fg-w":
        return second_moments(est.tangents, blocks, est.num_directions)  # type: ignore[attr-defined]
    return None


def diagnose(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    methods: str | Sequence[str] = "all",
    *,
    samples: int = 200,
    seed: int = 0,
    criterion: Criterion = F.cross_entropy,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Diagnose every method in ``methods`` on ``model`` and the batch ``(x, y)``; see the module docstring.

    Args:
        model: the module (its parameters are not changed).
        x, y: one batch; the loss is ``criterion(model(x), y, reduction=...)`` (``"none"`` for estimators
            with ``per_example_loss``, else ``"mean"``); the true gradient is that of the mean loss.
        methods: see :func:`parse_methods`.
        samples: S, the number of estimates per method (>= 2).
        seed: estimator seed (each method gets its own estimator, seeded with ``seed``).
        criterion: a loss ``(output, target, reduction=...)`` like ``F.cross_entropy``.
        log: called with one line per method.

    Returns:
        ``{"samples", "num_parameters", "methods": [...], "skipped": [{"method", "reason"}]}``; each method has
        ``"overall"`` and ``"layers"`` (parameter name → statistics) and ``"theory"`` (the source of the
        second-moment theory, or ``None``). A method that cannot estimate on this model is skipped with the
        first line of its error as the reason.
    """
    where = "fwdgrad.diagnostics.diagnose"
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"{where}: samples must be an int >= 2, got {samples!r}")
    specs = parse_methods(methods)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{where}: model {type(model).__name__} has no trainable parameter")
    model.zero_grad(set_to_none=True)
    loss = criterion(model(x), y, reduction="mean")
    true = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    # a parameter the loss does not use (a local head outside the global loss) has a true gradient of zero
    true64 = {n: (torch.zeros_like(p) if t is None else t).detach().double()
              for (n, p), t in zip(params.items(), true)}
    blocks = {n: (t.numel(), float(t.pow(2).sum())) for n, t in true64.items()}

    def loss_fn_for(est: Estimator) -> Callable[[nn.Module], Tensor]:
        reduction = "none" if est.per_example_loss else "mean"
        return lambda m: criterion(m(x), y, reduction=reduction)

    results, skipped = [], []
    for label, name, opts in specs:
        try:
            if fwdgrad.estimators.recipe(name).needs in ("sequence-model", "diagonal-recurrence"):
                from fwdgrad.derivatives.through_time import check_sequence_model

                check_sequence_model(f"fwdgrad diagnose: {name!r}", model)  # bp-tbptt is bp elsewhere
            est = _make(name, opts, seed)
            fn = loss_fn_for(est)
            est.estimate(model, fn, params)  # warm-up, and the test that it runs here
        except Exception as exc:  # any failure: this method cannot estimate on this model
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            skipped.append({"method": label, "reason": reason})
            if log:
                log(f"skipped {label}: {reason}")
            continue
        probe = _procmem_probe()
        est.estimate(model, fn, params)
        memory = probe() if probe else None
        accs = {n: _Acc(t) for n, t in true64.items()}
        overall = _Acc(torch.cat([t.reshape(-1) for t in true64.values()]))
        elapsed = 0.0
        for _ in range(samples):
            t0 = time.perf_counter()
            _, grads = est.estimate(model, fn, params)
            elapsed += time.perf_counter() - t0
            flat = []
            for n in params:
                g = grads[n].detach().double()
                accs[n].add(g)
                flat.append(g.reshape(-1))
            overall.add(torch.cat(flat))
        theory = _theory(est, blocks)
        entry = {
            "method": label,
            "estimator": repr(est),
            "theory": None if theory is None else ("exact gradient" if est.name == "bp" else
                                                   f"fg-w {est.tangents} K={est.num_directions}"),  # type: ignore[attr-defined]
            "overall": overall.stats(None if theory is None else sum(theory.values())),
            "layers": {n: accs[n].stats(None if theory is None else theory[n]) for n in params},
            "time_ms": 1000 * elapsed / samples,
            "memory_mb": None if memory is None else memory / 2**20,
        }
        if est.name == "fg-w" and theory is not None:
            vf = fwdgrad.variance_factor(est.tangents, overall.a.numel(), est.num_directions)  # type: ignore[attr-defined]
            entry["overall"]["second_moment_theory_variance_factor"] = (1 + vf) * overall.a2
        results.append(entry)
        if log:
            o = entry["overall"]
            ratio = o["second_moment_ratio"]
            log(f"{label}: cosine {o['cosine']:.4f}, rel. bias {o['rel_bias']:.3g} (noise {o['rel_bias_noise']:.3g}), "
                f"E|g|^2/theory {'n/a' if ratio is None else f'{ratio:.4f}'}, {entry['time_ms']:.2f} ms")
    return {"samples": samples, "seed": seed, "num_parameters": sum(p.numel() for p in params.values()),
            "batch_size": int(x.shape[0]), "methods": results, "skipped": skipped}


def _procmem_probe() -> Callable[[], int | None] | None:
    """Peak growth of resident memory from now (after returning freed heap to the OS, so that memory an
    earlier estimate freed but glibc kept does not hide this one's needs)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _procmem.status_kib("VmRSS")
    if before is None or not _procmem.reset_peak_rss():
        return None

    def stop() -> int | None:
        peak = _procmem.status_kib("VmHWM")
        return None if peak is None else max(0, peak - before) * 1024

    return stop
