r"""Optimisers with backprop and with forward gradients on classic test functions: ``fwdgrad study testfunctions``.

After Baydin et al. (2022), "Gradients without Backpropagation" (Beale and Rosenbrock), and Belouze (2022),
who ran SGD, clipped SGD and Adam with backprop and forward gradients on non-multimodal test functions from
5 starts, counting a success when ``f ≤ f* + 0.1`` within the step budget, and compared them by
performance profiles.

Functions (all with ``f* = 0``): Beale, Booth, Matyas (2-d), and sphere, Rosenbrock and the axis-scaled
ellipsoid ``Σ i·x_i²`` in several dimensions. Gradients: ``bp`` (exact, by autograd) and the forward gradient
``⟨∇f, v⟩v`` under the tangent samplers that differ for a single vector parameter: ``gaussian``,
``rademacher`` and ``sphere`` (for a vector, ``rank1`` *is* ``rademacher`` and ``orthogonal`` with one
direction *is* ``sphere``), and ``fg-momentum``: momentum directions (Silver et al. 2022, "Learning by
Directional Gradient Descent", as ``fwdgrad.estimator("fg-w", directions="momentum")`` with K = 1): each row
keeps a running average ``m ← βm + (1−β)ĝ`` (β = 0.9) of its own estimates and the step's estimate is
``ĝ = ⟨∇f, u⟩u + ⟨∇f, v⟩(I − uuᵀ)v`` with ``u = m/‖m‖`` and a fresh Gaussian ``v`` (unbiased, exact along the
guess ``u``; two directional derivatives per step instead of one; the plain forward gradient while ``m = 0``).
Optimisers: SGD, clipped SGD (gradient norm clipped to 1) and Adam (β = 0.9,
0.999), each with every learning rate of a grid; per (function, optimiser, gradient) the learning rate with
the most successes (then the fewest mean steps) is reported.

All starts and learning rates of one configuration run as the rows ``X [R, n]`` of one problem; the forward
gradient of each row uses its own tangent from :func:`fwdgrad.sample_tangents` (see :func:`_gradients` for
how the directional derivatives are computed).

Performance profile (Dolan & Moré 2002): a problem is a (function, start) pair, a solver an (optimiser,
gradient) pair at its chosen learning rate; ``ρ_s(τ)`` is the fraction of problems that solver ``s`` solves
within ``τ`` times the fewest steps any solver needed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fwdgrad
from fwdgrad._io import write_atomic
from fwdgrad.diagnostics.output import markdown_table, pyplot, save_figure, write_json

Tensor = torch.Tensor


def beale(x: Tensor) -> Tensor:
    a, b = x[..., 0], x[..., 1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def booth(x: Tensor) -> Tensor:
    a, b = x[..., 0], x[..., 1]
    return (a + 2 * b - 7) ** 2 + (2 * a + b - 5) ** 2


def matyas(x: Tensor) -> Tensor:
    a, b = x[..., 0], x[..., 1]
    return 0.26 * (a**2 + b**2) - 0.48 * a * b


def sphere(x: Tensor) -> Tensor:
    return (x**2).sum(-1)


def rosenbrock(x: Tensor) -> Tensor:
    return (100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2).sum(-1)


def ellipsoid(x: Tensor) -> Tensor:
    i = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    return (i * x**2).sum(-1)


#: name → (function of [..., n], fixed dimension or None, half-width or (low, high) of the start box)
FUNCTIONS: dict[str, tuple[Callable[[Tensor], Tensor], int | None, tuple[float, float]]] = {
    "beale": (beale, 2, (-4.5, 4.5)),
    "booth": (booth, 2, (-10.0, 10.0)),
    "matyas": (matyas, 2, (-10.0, 10.0)),
    "sphere": (sphere, None, (-5.0, 5.0)),
    "rosenbrock": (rosenbrock, None, (-2.0, 2.0)),
    "ellipsoid": (ellipsoid, None, (-5.0, 5.0)),
}
OPTIMIZERS = ("sgd", "clipped-sgd", "adam")
GRADIENTS = ("bp", "fg-gaussian", "fg-rademacher", "fg-sphere", "fg-momentum")
MOMENTUM_BETA = 0.9  # fwdgrad.estimator("fg-w", directions="momentum")'s default direction_beta


def _row_directional_derivatives(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, engine: str) -> Tensor:
    """``[⟨∇f(x_r), v_r⟩]_r`` for rows ``x, v`` of shape ``[R, n]``."""
    rows, n = x.shape
    if engine == "jvp":
        _, dirs = torch.func.jvp(fn, (x.detach(),), (v,))
        return dirs
    tangents = torch.zeros(rows, rows, n, dtype=x.dtype)  # direction r moves row r only
    idx = torch.arange(rows)
    tangents[idx, idx] = v
    _, dirs, _ = fwdgrad.directional_derivatives(lambda xs: fn(xs[0]).sum(), [x.detach()], [tangents])
    return dirs


def _momentum_gradients(fn: Callable[[Tensor], Tensor], x: Tensor, gen: torch.Generator, engine: str,
                        average: Tensor, beta: float = MOMENTUM_BETA) -> Tensor:
    """Momentum-direction forward gradients of the rows of ``x`` (``[R, n]``); ``average`` (``[R, n]``, each
    row's running average of its past estimates) is updated in place: ``m ← βm + (1−β)ĝ``.

    With ``u = m/‖m‖`` (0 for a row whose ``m`` is 0) and ``v`` Gaussian:
    ``ĝ = ⟨∇f, u⟩u + ⟨∇f, v⟩(v − ⟨v, u⟩u)``. A row whose estimate is not finite keeps its average."""
    v = fwdgrad.sample_tangents("gaussian", [x[0]], x.shape[0], gen)[0]
    norm = average.norm(dim=1, keepdim=True)
    u = torch.where(norm > 0, average / norm.clamp(min=1e-300), torch.zeros_like(average))
    if engine == "jvp":
        d = torch.cat([_row_directional_derivatives(fn, x, v, engine), _row_directional_derivatives(fn, x, u, engine)])
    else:  # the 2R directions as one batch (direction j moves row j mod R)
        rows, n = x.shape
        tangents = torch.zeros(2 * rows, rows, n, dtype=x.dtype)
        idx = torch.arange(rows)
        tangents[idx, idx] = v
        tangents[rows + idx, idx] = u
        _, d, _ = fwdgrad.directional_derivatives(lambda xs: fn(xs[0]).sum(), [x.detach()], [tangents])
    dv, du = d.chunk(2)
    g = du.unsqueeze(1) * u + dv.unsqueeze(1) * (v - (v * u).sum(1, keepdim=True) * u)
    ok = torch.isfinite(g).all(1, keepdim=True)
    average.copy_(torch.where(ok, beta * average + (1 - beta) * g, average))
    return g


def _gradients(fn: Callable[[Tensor], Tensor], x: Tensor, kind: str, gen: torch.Generator,
               engine: str = "library", state: Tensor | None = None) -> Tensor:
    """Per-row gradient (``bp``) or forward gradient ``⟨∇f(x_r), v_r⟩·v_r`` at the rows of ``x`` ``[R, n]``.

    The tangents ``v_r`` come from :func:`fwdgrad.sample_tangents`. ``engine="library"`` gets the directional
    derivatives from :func:`fwdgrad.directional_derivatives` (R block-diagonal directions of ``X``, one batched
    JVP); ``engine="jvp"`` from one ``torch.func.jvp`` of the vector of row values ``[f(x_r)]_r`` with tangent
    ``V`` (row r of the output depends on row r of ``X`` only, so its tangent is ``⟨∇f(x_r), v_r⟩``); the two
    are equal (``tests/test_studies.py``); on a loaded 2-core machine the library path took 0.6-0.7 ms per step
    of 5 rows in 8 dimensions and the direct one 0.4-0.5 ms. ``kind="fg-momentum"`` needs ``state``, the
    rows' running averages (:func:`_momentum_gradients`)."""
    if kind == "fg-momentum":
        if state is None:
            raise ValueError("fwdgrad.studies.testfunctions._gradients: kind 'fg-momentum' needs state, got None")
        return _momentum_gradients(fn, x, gen, engine, state)
    if kind == "bp":
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(xr).sum(), xr)
        return g
    v = fwdgrad.sample_tangents(kind.removeprefix("fg-"), [x[0]], x.shape[0], gen)[0]  # [R, n], one per row
    return _row_directional_derivatives(fn, x, v, engine).unsqueeze(1) * v


def run_config(
    name: str, n: int, optimizer: str, gradient: str, starts: Tensor, lrs: list[float], budget: int, seed: int,
    engine: str = "library",
) -> list[dict[str, Any]]:
    """All starts × learning rates of one (function, dimension, optimiser, gradient); returns per-lr results
    with the steps to success of each start (``None``: not within the budget or diverged)."""
    fn = FUNCTIONS[name][0]
    s, lr_n = starts.shape[0], len(lrs)
    x = starts.repeat(lr_n, 1).clone()  # rows: lr-major
    lr = torch.tensor(lrs, dtype=x.dtype).repeat_interleave(s).unsqueeze(1)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    directions = torch.zeros_like(x) if gradient == "fg-momentum" else None  # each row's running average
    done = torch.full((x.shape[0],), -1, dtype=torch.long)  # step of success, -1 = not yet
    dead = torch.zeros(x.shape[0], dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        f0 = fn(x)
        done[f0 <= 0.1] = 0
        active &= done < 0
        for step in range(1, budget + 1):
            if not bool(active.any()):
                break
            g = _gradients(fn, x, gradient, gen, engine, directions)
            if optimizer == "clipped-sgd":
                norm = g.norm(dim=1, keepdim=True)
                g = g * torch.clamp(1.0 / norm.clamp(min=1e-300), max=1.0)
            if optimizer == "adam":
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                upd = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
            else:
                upd = g
            x = torch.where(active.unsqueeze(1), x - lr * upd, x)
            f = fn(x)
            bad = ~torch.isfinite(f) | ~torch.isfinite(x).all(1) | (f > 1e12)
            dead |= bad & active
            newly = active & ~bad & (f <= 0.1)
            done[newly] = step
            active &= ~newly & ~dead
            x = torch.where(dead.unsqueeze(1), torch.zeros_like(x), x)
    out = []
    for i, lr_i in enumerate(lrs):
        steps = [int(t) if t >= 0 else None for t in done[i * s:(i + 1) * s].tolist()]
        diverged = int(dead[i * s:(i + 1) * s].sum())
        ok = [t for t in steps if t is not None]
        out.append({"lr": lr_i, "steps": steps, "successes": len(ok), "diverged": diverged,
                    "mean_steps": sum(ok) / len(ok) if ok else None})
    return out


def _best(per_lr: list[dict[str, Any]]) -> dict[str, Any]:
    return min(per_lr, key=lambda r: (-r["successes"], r["mean_steps"] if r["mean_steps"] is not None else math.inf))


def run(
    functions: list[tuple[str, int]], *, budget: int, lrs: list[float], num_starts: int = 5, seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    rows = []
    for name, n in functions:
        lo, hi = FUNCTIONS[name][2]
        gen = torch.Generator().manual_seed(seed * 7919 + n * 31 + len(name))
        starts = lo + (hi - lo) * torch.rand(num_starts, n, generator=gen, dtype=torch.float64)
        for opt in OPTIMIZERS:
            for grad in GRADIENTS:
                per_lr = run_config(name, n, opt, grad, starts, lrs, budget, seed)
                best = _best(per_lr)
                rows.append({"function": name, "n": n, "optimizer": opt, "gradient": grad, "best_lr": best["lr"],
                             "successes": best["successes"], "steps": best["steps"], "mean_steps": best["mean_steps"],
                             "per_lr": per_lr})
                if log:
                    log(f"{name} n={n} {opt} {grad}: {best['successes']}/{num_starts} at lr {best['lr']:g}, "
                        f"mean steps {best['mean_steps']}")
    return {"study": "testfunctions", "functions": [list(f) for f in functions], "budget": budget, "lrs": lrs,
            "num_starts": num_starts, "seed": seed, "success_threshold": "f <= f* + 0.1", "rows": rows,
            "profiles": performance_profiles(rows)}


def performance_profiles(rows: list[dict[str, Any]], taus: list[float] | None = None) -> dict[str, Any]:
    taus = taus or [1, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000]
    solvers = sorted({(r["optimizer"], r["gradient"]) for r in rows})
    problems: dict[tuple[str, int, int], dict[tuple[str, str], float]] = {}
    for r in rows:
        for i, t in enumerate(r["steps"]):
            problems.setdefault((r["function"], r["n"], i), {})[(r["optimizer"], r["gradient"])] = (
                math.inf if t is None else max(t, 1))
    ratios: dict[tuple[str, str], list[float]] = {s: [] for s in solvers}
    for res in problems.values():
        best = min(res.values())
        for s in solvers:
            t = res.get(s, math.inf)
            ratios[s].append(math.inf if not math.isfinite(best) or not math.isfinite(t) else t / best)
    return {"taus": taus, "solvers": {f"{o} {g}": [sum(r <= tau for r in ratios[(o, g)]) / len(ratios[(o, g)])
                                                    for tau in taus] for o, g in solvers},
            "num_problems": len(problems)}


def run_from_args(args: Any) -> dict[str, Any]:
    if args.quick:
        functions = [("booth", 2), ("sphere", 4)]
        budget, lrs = args.budget or 200, [1e-2, 1e-1]
    else:
        dims = args.dims or [2, 8, 32]
        functions = [("beale", 2), ("booth", 2), ("matyas", 2)] + [
            (f, n) for f in ("sphere", "rosenbrock", "ellipsoid") for n in dims]
        budget, lrs = args.budget or 5000, [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    if args.functions:
        wanted = [f.strip() for f in args.functions.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown test function {unknown[0]!r}; choose from {sorted(FUNCTIONS)}")
        functions = [(f, n) for f, n in functions if f in wanted] or [
            (f, FUNCTIONS[f][1] or 2) for f in wanted]
    return run(functions, budget=budget, lrs=lrs, seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True))


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    by_solver: dict[str, list[int]] = {}
    for r in result["rows"]:
        by_solver.setdefault(f"{r['optimizer']} {r['gradient']}", []).append(r["successes"])
    total = result["num_starts"] * len(result["functions"])
    for s, v in by_solver.items():
        lines.append(f"success {s}: {sum(v)}/{total}")
    return lines


def write_report(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    k = result["num_starts"]
    table = [[r["function"], r["n"], r["optimizer"], r["gradient"], f"{r['successes']}/{k}", r["best_lr"],
              "-" if r["mean_steps"] is None else round(r["mean_steps"], 1)] for r in result["rows"]]
    prof = result["profiles"]
    ptable = [[s, *vals] for s, vals in prof["solvers"].items()]
    md = ["# Test functions: backprop vs forward gradients (Baydin et al. 2022, Belouze 2022)", "",
          f"`{result.get('command', '')}`; success: f ≤ f* + 0.1 within {result['budget']} steps, {k} starts per "
          f"function; learning rate per row chosen from {result['lrs']} (most successes, then fewest steps).", "",
          markdown_table(["function", "n", "optimizer", "gradient", "success", "lr", "mean steps to success"], table),
          f"## Performance profile ρ(τ) over {prof['num_problems']} problems (function × start)", "",
          markdown_table(["solver", *[f"τ={t:g}" for t in prof["taus"]]], ptable)]
    paths = [write_json(out / "testfunctions.json", result),
             write_atomic(out / "testfunctions.md", "\n".join(md) + "\n")]
    plt = pyplot() if plots else None
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for s, vals in prof["solvers"].items():
            axes[0].step(prof["taus"], vals, where="post", label=s,
                         linestyle="-" if s.endswith("bp") else "--")
        axes[0].set(xscale="log", xlabel="τ (steps / fewest steps of any solver)", ylabel="fraction solved",
                    title="performance profiles", ylim=(0, 1.02))
        axes[0].legend(fontsize=6, ncol=2)
        for (opt, grad) in sorted({(r["optimizer"], r["gradient"]) for r in result["rows"]}):
            for fname in sorted({r["function"] for r in result["rows"] if FUNCTIONS[r["function"]][1] is None}):
                pts = [(r["n"], r["mean_steps"]) for r in result["rows"] if r["function"] == fname
                       and r["optimizer"] == opt and r["gradient"] == grad and r["mean_steps"] is not None]
                if opt == "adam" and len(pts) > 1:
                    axes[1].loglog(*zip(*pts), marker="o", label=f"{fname} {grad}",
                                   linestyle="-" if grad == "bp" else "--")
        axes[1].set(xlabel="dimension n", ylabel="mean steps to success (Adam)", title="steps to success vs n")
        axes[1].legend(fontsize=6)
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
        paths.append(save_figure(fig, out / "testfunctions.png"))
    return paths
