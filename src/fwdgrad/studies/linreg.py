r"""Forward gradient descent in linear regression (Bos & Schmidt-Hieber 2023): ``fwdgrad study linreg``.

Model: ``Y = Xᵀθ* + ε`` with ``X ~ N(0, I_d)``, ``ε ~ N(0, σ²)``, ``θ* ~ N(0, I_d/d)``, start ``θ₀ = 0``. At
step k one fresh sample ``(X_k, Y_k)`` arrives and, with ``ξ_k ~ N(0, I_d)``, the forward gradient of the
squared loss ``½(Xᵀθ − Y)²`` is

.. math:: \hat g_k = \big((X_k^\top\theta_{k-1} - Y_k)\,X_k^\top\xi_k\big)\,\xi_k, \qquad
          \theta_k = \theta_{k-1} - \alpha_k \hat g_k, \qquad \alpha_k = \frac{a}{k + a\,(d+2)^2}.

Bos & Schmidt-Hieber prove ``E‖θ_k − θ*‖² ≲ d²·log(d)/k`` once ``k ≳ d²·log d``; SGD (``ĝ = (Xᵀθ − Y)X``)
reaches ``d/k``. Two step-size schedules (``schedule=``):

- ``"paper"`` (default): ``a = log d``, the learning rate of the paper's own simulation code (Bos 2024, cited in
  the paper: ``alpha = a/(k + a*(d+2)*(d+2))`` with ``a = np.log(d)``). The burn-in ``k₀ = a(d+2)²`` is then
  ``≈ d²·log d``, the paper's ``k ≳ d²·log d``, and the asymptote (below) carries the factor ``log d``.
- ``"unit"``: ``a = 1``, ``α_k = 1/(k + (d+2)² + d)``, the schedule of the first version of this study.

For identity covariance the mean error obeys an exact recursion (tangents and samples independent of the
past): with ``u = θ − θ*``, ``E‖ĝ‖² = (d+2)²‖u‖² + σ² d(d+2)``, so
``e_k = (1 − 2α_k + α_k²(d+2)²)·e_{k−1} + α_k² σ² d(d+2)`` and ``k·MSE → σ² d(d+2)·a²/(2a − 1)`` (``a > ½``).
Under ``"unit"`` that is ``σ² d(d+2)``: the curves collapse under ``d(d+2)``, not ``d²·log d``. Under
``"paper"`` it is ``σ² d(d+2)·log²d/(2 log d − 1) ≈ σ² d² log d/2``: they collapse under ``d²·log d`` (the
ratio of the limits for ``d = 8`` and ``64`` is 1.41) and not under ``d(d+2)`` (1.73, growing like log d).
:func:`expected_mse` evaluates that recursion. SGD keeps ``α_k = 1/(k + d + 2)`` under both schedules
(``k·MSE → σ² d``; the paper's code gives SGD the forward gradient's rate instead). With ``ℓ`` steps per sample
(Dexheimer & Schmidt-Hieber 2024) each sample gets ℓ forward-gradient steps of size ``α_k/ℓ`` with fresh ``ξ``;
the factor ``d`` of the rate becomes ``d/(ℓ∧d)``, and the ``(d+2)²`` of ``k₀`` becomes ``(d+2)²/min(ℓ, d) + d``.

The R independent runs are simulated together in float64 (one ``[R, d]`` array; the random numbers come from a
``torch.Generator`` in blocks, the arithmetic runs in numpy, whose per-call cost is lower for such small arrays).
The forward gradient uses the closed form above; :func:`forward_gradient_step` computes the same step with
:func:`fwdgrad.forward_grad` and ``tests/test_studies.py`` checks that the two agree for the same ``ξ``.
The slope of ``log MSE`` against ``log k`` is fitted by least squares on the logged points with
``k ≥ burn_in·k₀``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fwdgrad
from fwdgrad._io import write_atomic
from fwdgrad.diagnostics.output import markdown_table, pyplot, save_figure, write_json

Tensor = torch.Tensor


def forward_gradient_step(theta: Tensor, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One run's forward gradient of ``½(xᵀθ − y)²`` by :func:`fwdgrad.forward_grad` (Gaussian tangent);
    returns ``(ĝ, ξ)`` where ``ξ = ĝ/⟨∇, ξ⟩`` is recovered by drawing the same tangent again."""
    state = generator.get_state()
    _, est = fwdgrad.forward_grad(lambda p: 0.5 * (p["theta"] @ x - y) ** 2, {"theta": theta}, generator=generator)
    generator.set_state(state)
    xi = fwdgrad.sample_tangents("gaussian", [theta], 1, generator)[0][0]
    return est["theta"], xi


def closed_form_step(theta: Tensor, x: Tensor, y: Tensor, xi: Tensor) -> Tensor:
    """``((xᵀθ − y)·xᵀξ)·ξ`` for a batch of runs: ``theta, x, xi`` of shape ``[R, d]``, ``y`` of shape ``[R]``."""
    r = (theta * x).sum(1) - y
    return (r * (x * xi).sum(1)).unsqueeze(1) * xi


def simulate(
    d: int, method: str, *, steps: int, k0: float, repeats: int, ell: int = 1, sigma: float = 1.0,
    seed: int = 0, points: int = 60, a: float = 1.0,
) -> dict[str, Any]:
    """Run ``repeats`` independent chains of ``steps`` samples with ``α_k = a/(k + k₀)``; ``method`` is ``"fg"``
    or ``"sgd"``.

    Returns the logged steps ``k`` (log-spaced) and the MSE ``mean_r ‖θ_k − θ*‖²`` at each."""
    if method not in ("fg", "sgd"):
        raise ValueError(f"fwdgrad.studies.linreg.simulate: method must be 'fg' or 'sgd', got {method!r}")
    if not a > 0:
        raise ValueError(f"fwdgrad.studies.linreg.simulate: a must be > 0, got {a!r}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + d * 101 + ell + (0 if method == "fg" else 7))
    dt = torch.float64
    theta_star = (torch.randn(repeats, d, generator=gen, dtype=dt) / math.sqrt(d)).numpy()
    theta = np.zeros((repeats, d))
    log_at = sorted({round(v) for v in torch.logspace(0, math.log10(steps), points).tolist()})
    ks, mses = [], []
    j = 0
    block = 512  # random numbers are drawn (from the torch generator) for this many steps at a time
    for start in range(0, steps, block):
        b = min(block, steps - start)
        xs = torch.randn(b, repeats, d, generator=gen, dtype=dt).numpy()
        eps = sigma * torch.randn(b, repeats, generator=gen, dtype=dt).numpy()
        xis = torch.randn(b, ell, repeats, d, generator=gen, dtype=dt).numpy() if method == "fg" else None
        for i in range(b):
            k = start + i + 1
            x = xs[i]
            y = np.einsum("rd,rd->r", x, theta_star) + eps[i]
            alpha = a / (k + k0)
            if xis is None:
                theta -= alpha * (np.einsum("rd,rd->r", theta, x) - y)[:, None] * x
            else:
                for m in range(ell):
                    xi = xis[i, m]
                    r = np.einsum("rd,rd->r", theta, x) - y
                    theta -= (alpha / ell) * (r * np.einsum("rd,rd->r", x, xi))[:, None] * xi
            if j < len(log_at) and k == log_at[j]:
                ks.append(k)
                mses.append(float(((theta - theta_star) ** 2).sum(1).mean()))
                j += 1
    return {"k": ks, "mse": mses}


def fit_slope(ks: list[int], mses: list[float], k_min: float) -> float:
    """Least-squares slope of ``log mse`` against ``log k`` over the points with ``k >= k_min``."""
    pts = [(math.log(k), math.log(m)) for k, m in zip(ks, mses) if k >= k_min and m > 0]
    if len(pts) < 3:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


SCHEDULES = ("paper", "unit")


def schedule_a(d: int, schedule: str) -> float:
    """The numerator ``a`` of ``α_k = a/(k + k₀)`` for forward gradients: ``log d`` (``"paper"``) or 1."""
    if schedule not in SCHEDULES:
        raise ValueError(f"fwdgrad.studies.linreg.schedule_a: schedule must be one of {SCHEDULES}, got {schedule!r}")
    return math.log(d) if schedule == "paper" else 1.0


def fg_k0(d: int, ell: int, schedule: str = "unit") -> float:
    """Burn-in scale ``k₀`` of the forward-gradient schedule: ``a·(d+2)²`` for ``ℓ = 1`` under ``"paper"``
    (the paper's), ``a·((d+2)²/min(ℓ, d) + d)`` otherwise."""
    a = schedule_a(d, schedule)
    if schedule == "paper" and ell == 1:
        return a * (d + 2) ** 2
    return a * ((d + 2) ** 2 / min(ell, d) + d)


def expected_mse(d: int, steps: int, *, a: float, k0: float, sigma: float = 1.0, e0: float = 1.0) -> list[float]:
    """Exact ``E‖θ_k − θ*‖²`` for ``k = 1..steps`` of forward gradient descent (one sample and one Gaussian
    tangent per step, ``X ~ N(0, I_d)``, ``α_k = a/(k + k₀)``) from ``E‖θ₀ − θ*‖² = e0``:
    ``e_k = (1 − 2α_k + α_k²(d+2)²)·e_{k−1} + α_k² σ² d(d+2)``.

    >>> round(expected_mse(4, 3, a=1.0, k0=36.0)[-1], 4)
    0.9677
    """
    out, e = [], float(e0)
    for k in range(1, steps + 1):
        alpha = a / (k + k0)
        e = (1 - 2 * alpha + alpha * alpha * (d + 2) ** 2) * e + alpha * alpha * sigma * sigma * d * (d + 2)
        out.append(e)
    return out


def run(
    dims: list[int], ells: list[int], *, repeats: int, horizon: float, burn_in: float, seed: int = 0,
    schedule: str = "paper", log: Any = None,
) -> dict[str, Any]:
    """The whole study; ``horizon`` and ``burn_in`` are multiples of each run's ``k₀``; ``schedule`` picks the
    forward gradient's step size (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"fwdgrad.studies.linreg.run: schedule must be one of {SCHEDULES}, got {schedule!r}")
    runs = []
    for ell in ells:
        for d in dims:
            for method in ("fg", "sgd") if ell == 1 else ("fg",):
                a = schedule_a(d, schedule) if method == "fg" else 1.0
                k0 = fg_k0(d, ell, schedule) if method == "fg" else d + 2.0
                steps = int(horizon * k0)
                res = simulate(d, method, steps=steps, k0=k0, repeats=repeats, ell=ell, seed=seed, a=a)
                k_burn = burn_in * k0
                slope = fit_slope(res["k"], res["mse"], k_burn)
                k_end, mse_end = res["k"][-1], res["mse"][-1]
                entry = {"d": d, "method": method, "ell": ell, "a": a, "k0": k0, "steps": steps, "burn_in_k": k_burn,
                         "slope": slope, "final_k": k_end, "final_mse": mse_end,
                         "k_mse_over_d2logd": k_end * mse_end / (d * d * math.log(d)),
                         "k_mse_over_d_dplus2": k_end * mse_end / (d * (d + 2)),
                         "k_mse_over_d": k_end * mse_end / d, **res}
                runs.append(entry)
                if log:
                    log(f"{method} d={d} ell={ell}: slope {slope:.3f}, k*MSE/d^2logd {entry['k_mse_over_d2logd']:.3f}")
    collapse = _collapse(runs, dims)
    return {"study": "linreg", "schedule": schedule, "dims": dims, "ells": ells, "repeats": repeats,
            "horizon_k0": horizon,
            "burn_in_k0": burn_in, "seed": seed, "sigma": 1.0, "runs": runs, "collapse": collapse}


def _collapse(runs: list[dict[str, Any]], dims: list[int]) -> dict[str, Any]:
    """Spread (max/min across d) of the normalised error at a common normalised time, for plain FG under the
    paper's scale ``d²·log d`` and under the exact asymptotic constant ``d(d+2)``, and for SGD under ``d``;
    interpolated in log-log between logged points, at the geometric middle of the range that is past every
    run's burn-in (FG) or at the end of the shortest run (SGD)."""
    out: dict[str, Any] = {}
    scales = (("fg", "fg", lambda d: d * d * math.log(d), "fg: k*MSE/(d^2 log d) at k = t*d^2 log d"),
              ("fg_d(d+2)", "fg", lambda d: d * (d + 2.0), "fg: k*MSE/(d(d+2)) at k = t*d(d+2)"),
              ("sgd", "sgd", lambda d: float(d), "sgd: k*MSE/d at k = t*d"))
    for key, method, scale, name in scales:
        rs = [r for r in runs if r["method"] == method and r["ell"] == 1]
        if len(rs) < 2:
            continue
        t_lo = max(r["burn_in_k"] / scale(r["d"]) for r in rs)
        t_hi = min(r["final_k"] / scale(r["d"]) for r in rs)
        if t_lo >= t_hi:
            continue
        t = math.sqrt(t_lo * t_hi) if method == "fg" else t_hi
        vals = {r["d"]: _interp(r, t * scale(r["d"])) * t for r in rs}
        out[key] = {"what": name, "t": t, "values": vals, "spread": max(vals.values()) / min(vals.values())}
        if method == "fg":  # the same measure on the exact mean error (expected_mse), free of Monte-Carlo noise
            exact = {}
            for r in rs:
                k = max(1, round(t * scale(r["d"])))
                e = expected_mse(r["d"], k, a=r.get("a", 1.0), k0=r["k0"])[-1]
                exact[r["d"]] = k * e / scale(r["d"])
            out[key]["exact_values"] = exact
            out[key]["exact_spread"] = max(exact.values()) / min(exact.values())
    return out


def collapse(result: dict[str, Any]) -> dict[str, Any]:
    """The collapse measures of a finished study (e.g. read back from ``linreg.json``)."""
    return _collapse(result["runs"], result["dims"])


def _interp(r: dict[str, Any], k: float) -> float:
    ks, ms = r["k"], r["mse"]
    for i in range(1, len(ks)):
        if ks[i] >= k:
            w = (math.log(k) - math.log(ks[i - 1])) / (math.log(ks[i]) - math.log(ks[i - 1]))
            return math.exp((1 - w) * math.log(ms[i - 1]) + w * math.log(ms[i]))
    return ms[-1]


def run_from_args(args: Any) -> dict[str, Any]:
    quick = args.quick
    dims = args.dims or ([4, 8] if quick else [8, 16, 32, 64])
    ells = args.steps_per_sample or [1, 4]
    repeats = args.repeats or (8 if quick else 40)
    if any(d < 2 for d in dims):
        raise ValueError(f"--dims must be >= 2 (log d > 0), got {dims}")
    schedule = getattr(args, "schedule", None) or "paper"
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    # a = log d makes the approach to the asymptote faster ((k₀/k)^(2a−1)) and k₀ larger by log d: a shorter
    # horizon in multiples of k₀ covers the same range of k/(d² log d)
    if schedule == "paper":
        horizon, burn_in = (60.0, 6.0) if quick else (100.0, 10.0)
    else:
        horizon, burn_in = (60.0, 6.0) if quick else (300.0, 30.0)
    import sys

    return run(dims, ells, repeats=repeats, horizon=horizon, burn_in=burn_in, seed=args.seed, schedule=schedule,
               log=lambda s: print(s, file=sys.stderr, flush=True))


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["runs"]:
        tag = "" if r["method"] == "fg" and r["ell"] == 1 else f" ({r['method']}, ell={r['ell']})"
        lines.append(f"slope d={r['d']}: {r['slope']:.2f}{tag}")
    for m, c in result["collapse"].items():
        exact = f"; exact mean error: {c['exact_spread']:.2f}" if "exact_spread" in c else ""
        lines.append(f"collapse {m}: max/min across d = {c['spread']:.2f} ({c['what']}, t = {c['t']:.3g}){exact}")
    return lines


def write_report(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    schedule = result.get("schedule", "unit")  # reports written before the option existed used a = 1
    rows = [[r["method"], r["d"], r["ell"], r.get("a", 1.0), r["k0"], r["steps"], r["slope"], r["final_mse"],
             r["k_mse_over_d2logd"], r["k_mse_over_d_dplus2"], r["k_mse_over_d"]] for r in result["runs"]]
    md = ["# Linear regression: forward gradient vs SGD (Bos & Schmidt-Hieber 2023)", "",
          f"`{result.get('command', '')}`; {result['repeats']} runs per row, σ = 1, α_k = a/(k + k₀) "
          f"(schedule {schedule!r}: FG a = {'log d' if schedule == 'paper' else '1'}, SGD a = 1); slope of log MSE "
          f"vs log k fitted for k ≥ {result['burn_in_k0']:g}·k₀ up to {result['horizon_k0']:g}·k₀.", "",
          markdown_table(["method", "d", "ℓ", "a", "k₀", "steps", "slope", "final MSE", "k·MSE/(d² log d)",
                          "k·MSE/(d(d+2))", "k·MSE/d"], rows)]
    for m, c in result["collapse"].items():
        vals = ", ".join(f"d={d}: {v:.3g}" for d, v in c["values"].items())
        line = f"- collapse {m} ({c['what']}, t = {c['t']:.3g}): {vals}; max/min = {c['spread']:.2f}"
        if "exact_values" in c:
            ex = ", ".join(f"d={d}: {v:.3g}" for d, v in c["exact_values"].items())
            line += f" (exact mean error, `expected_mse`: {ex}; max/min = {c['exact_spread']:.2f})"
        md.append(line)
    paths = [write_json(out / "linreg.json", result), write_atomic(out / "linreg.md", "\n".join(md) + "\n")]
    plt = pyplot() if plots else None
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for r in result["runs"]:
            d = r["d"]
            ks = r["k"]
            if r["method"] == "fg" and r["ell"] == 1:
                s = d * d * math.log(d)
                axes[0].loglog([k / s for k in ks], [k * m / s for k, m in zip(ks, r["mse"])], label=f"d={d}")
            if r["method"] == "sgd":
                axes[1].loglog([k / d for k in ks], [k * m / d for k, m in zip(ks, r["mse"])], label=f"d={d}")
            style = "-" if r["method"] == "fg" else ":"
            axes[2].loglog(ks, r["mse"], style, label=f"{r['method']} d={d} ℓ={r['ell']}")
        axes[0].set(xlabel="k / (d² log d)", ylabel="k·MSE / (d² log d)", title="forward gradient: collapse")
        axes[1].set(xlabel="k / d", ylabel="k·MSE / d", title="SGD: collapse")
        axes[2].set(xlabel="k (samples)", ylabel="MSE  E‖θ_k − θ*‖²", title="MSE against k")
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "linreg.png"))
    return paths
