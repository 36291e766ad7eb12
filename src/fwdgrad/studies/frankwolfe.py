r"""Frank-Wolfe with projected forward gradients on MNIST (Rostami & Kia 2024): ``fwdgrad study frankwolfe``.

Three ways to drive :class:`fwdgrad.optim.FrankWolfe`, on the same deterministic objective (the mean
cross-entropy over a fixed set of N training images, so the only randomness is the tangent):

- ``true FW``: the exact gradient (``fwdgrad.estimator("bp")``);
- ``FG FW``: the projected forward gradient ``φ = ⟨∇f, v⟩v`` (``fwdgrad.estimator("fg-w")``, Gaussian
  tangents, K directions) plugged straight in;
- ``FG FW + VR``: the same ``φ`` with ``variance_reduction=True``, the running average
  ``d_k = (1−ρ_k)d_{k−1} + ρ_k φ_k``, ``ρ_k = 4/(k+8)^{2/3}``.

All use ``γ_k = 2/(k+8)``. Problems: (1) ℓ1-constrained binary logistic regression, digit 4 against 9, weights
in the ℓ1 ball of radius ``r`` (convex); (2) a small MLP (784-32-2, tanh) with every parameter in a box
``[−b, b]`` (non-convex). The measure is the true Frank-Wolfe gap ``G(x) = max_{s∈C} ⟨∇f(x), x − s⟩``
(autograd), which is ``≥ f(x) − f*`` for convex f and 0 exactly at stationary points; it is logged at
log-spaced steps, with the objective.

On the convex problem the report also gives the optimality gap ``f(x_k) − f*`` (the quantity of Rostami &
Kia's convex result) relative to ``f(x_0) − f*``, bounded from above: ``f*`` is replaced by a certified lower
bound ``f_low ≤ f*``, the largest ``f(x) − G(x)`` (convexity: ``f* ≥ f(x) − G(x)`` at every feasible ``x``)
over the logged true-FW iterates and the solution of an accurate reference solver (accelerated projected
gradient onto the ℓ1 ball, float64: :func:`reference_optimum`), so the ratio reported is never smaller than
the true one (:func:`optimality_gaps`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad
from fwdgrad._io import write_atomic
from fwdgrad.diagnostics.output import markdown_table, pyplot, save_figure, write_json
from fwdgrad.optim import FrankWolfe
from fwdgrad.optim.lmo import LMOS
from fwdgrad.training.config import resolve_device

Tensor = torch.Tensor
METHODS = ("true FW", "FG FW", "FG FW + VR")
#: the names ``--methods`` takes
METHOD_KEYS = {"true": "true FW", "fg": "FG FW", "fg-vr": "FG FW + VR"}
#: the problems, in the order they run
PROBLEMS = ("logreg-l1", "mlp-box")


def binary_mnist(
    data_dir: str | None, n: int, digits: tuple[int, int] = (4, 9), seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` training images of the two ``digits`` (flattened, standardised as by :func:`fwdgrad.data.load_dataset`)
    and labels 0/1."""
    from fwdgrad.data import load_dataset

    data = load_dataset("mnist", data_dir)
    keep = (data.y_train == digits[0]) | (data.y_train == digits[1])
    x, y = data.x_train[keep].flatten(1), (data.y_train[keep] == digits[1]).long()
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def _true_gap(model: nn.Module, loss_fn: Any, opt: FrankWolfe) -> tuple[float, float]:
    params = [p for g in opt.param_groups for p in g["params"]]
    with torch.enable_grad():
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params)
    gap = 0.0
    i = 0
    for group in opt.param_groups:
        lmo = LMOS[group["constraint"]]
        for p in group["params"]:
            g = grads[i]
            i += 1
            gap += float((g * (p.detach() - lmo(g, **group["_lmo_kwargs"]))).sum())
    return float(loss.detach()), gap


def averaging_schedule(rho: float | None) -> Any:
    """``ρ_k`` of the averaged direction: ``None`` is Mokhtari et al.'s ``4/(k+8)^{2/3}`` (the optimizer's
    default); a number ``c ≥ 1`` is ``c/(k+c)``, an average with weights growing like ``k^{c−1}`` (window ≈ k/c)."""
    if rho is None:
        return None
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1:
        raise ValueError(f"fwdgrad.studies.frankwolfe.averaging_schedule: rho must be a number >= 1, got {rho!r}")
    c = float(rho)
    return lambda k: min(1.0, c / (k + c))


def run_problem(
    problem: str, x: Tensor, y: Tensor, *, steps: int, num_directions: int, seed: int, radius: float, box: float,
    log: Any = None, methods: tuple[str, ...] = METHODS, rho: float | None = None,
) -> list[dict[str, Any]]:
    """Every method of ``methods`` on ``problem`` from the same start, on the device of ``x``."""
    log_at = sorted({round(v) for v in torch.logspace(0, math.log10(steps), 40).tolist()} | {0})
    out = []
    for method in methods:
        torch.manual_seed(seed)
        if problem == "logreg-l1":
            model: nn.Module = nn.Linear(x.shape[1], 2, bias=False)
            nn.init.zeros_(model.weight)
            groups = [{"params": list(model.parameters()), "constraint": "l1", "radius": radius}]
        else:
            model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, 2))
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-box, box)
            groups = [{"params": list(model.parameters()), "constraint": "box", "lower": -box, "upper": box}]
        model.to(x.device)
        opt = FrankWolfe(groups, step_size=lambda k: 2.0 / (k + 8), variance_reduction=method.endswith("VR"),
                         averaging=averaging_schedule(rho))
        est = fwdgrad.estimator("bp") if method == "true FW" else fwdgrad.estimator(
            "fg-w", num_directions=num_directions, seed=seed)

        def loss_fn(m: nn.Module) -> Tensor:
            return F.cross_entropy(m(x), y)

        ks, losses, gaps = [], [], []
        for k in range(steps + 1):
            if k in log_at:
                loss, gap = _true_gap(model, loss_fn, opt)
                ks.append(k)
                losses.append(loss)
                gaps.append(gap)
                if log and k:  # progress of a long run: the same figures as its report, as they come
                    log(f"  {problem} {method}: step {k}/{steps}, gap {gap / gaps[0]:.4g} of the start, "
                        f"loss {loss:.4f}")
            if k == steps:
                break
            opt.zero_grad(set_to_none=True)
            est(model, loss_fn)
            opt.step()
        entry = {"problem": problem, "method": method, "k": ks, "loss": losses, "gap": gaps,
                 "gap_ratio_end": gaps[-1] / gaps[0], "min_gap_ratio": min(gaps) / gaps[0]}
        out.append(entry)
        if log:
            log(f"{problem} {method}: gap {gaps[0]:.4g} -> {gaps[-1]:.4g} (ratio {entry['gap_ratio_end']:.3g}), "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return out


def project_l1(v: Tensor, radius: float) -> Tensor:
    """The Euclidean projection of ``v`` (any shape, taken as one vector) onto ``{‖w‖₁ ≤ radius}``: soft
    thresholding at the ``θ ≥ 0`` that puts the result on the sphere (Duchi et al. 2008)."""
    flat = v.reshape(-1)
    if float(flat.abs().sum()) <= radius:
        return v.clone()
    u = flat.abs().sort(descending=True).values
    cssv = u.cumsum(0) - radius
    j = torch.arange(1, u.numel() + 1, dtype=u.dtype, device=u.device)
    rho = int(torch.nonzero(u * j > cssv).max()) + 1
    theta = cssv[rho - 1] / rho
    return (torch.sign(flat) * (flat.abs() - theta).clamp_min(0)).view_as(v)


def reference_optimum(x: Tensor, y: Tensor, radius: float, steps: int = 5000) -> tuple[float, float]:
    """``(f(w), f(w) − G(w))`` at an accurate solution ``w`` of the ℓ1-ball logistic regression of
    :func:`run_problem` (mean cross-entropy of ``x wᵀ``, ``w`` of shape ``[2, in]``), found by FISTA
    (accelerated projected gradient, backtracking on the step) in float64: an upper and a certified lower
    bound on ``f*``. On the study's 2,000 images, 5,000 steps (≈ 15–30 s on one CPU thread) give
    ``f* ∈ [0.1163817, 0.1164071]``: its value settles within 2,000 steps, its Frank-Wolfe gap much later."""
    x64, w = x.double(), torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)

    def value_and_grad(v: Tensor) -> tuple[float, Tensor]:
        v = v.detach().requires_grad_(True)
        loss = F.cross_entropy(x64 @ v.T, y)
        (g,) = torch.autograd.grad(loss, v)
        return float(loss.detach()), g

    def value(v: Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(x64 @ v.T, y))

    z, t, lipschitz = w.clone(), 1.0, 1.0
    for _ in range(steps):
        fz, gz = value_and_grad(z)
        while True:
            w_next = project_l1(z - gz / lipschitz, radius)
            d = w_next - z
            if value(w_next) <= fz + float((gz * d).sum()) + 0.5 * lipschitz * float((d * d).sum()) + 1e-15:
                break
            lipschitz *= 2.0
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = w_next + (t - 1.0) / t_next * (w_next - w)
        w, t = w_next, t_next
    f_w, g_w = value_and_grad(w)
    gap = float((g_w * (w - LMOS["l1"](g_w, radius=radius))).sum())
    return f_w, f_w - gap


def optimality_gaps(runs: list[dict[str, Any]], f_low: float | None = None) -> float | None:
    """Add ``opt_gap`` (``f(x_k) − f_low`` at the logged steps) and ``opt_gap_ratio_end`` (its end over its
    start) to every run of the convex problem, where ``f_low`` is the largest of the given lower bound on
    ``f*`` (e.g. from :func:`reference_optimum`) and ``max_k (f(x_k) − G(x_k))`` over the true-FW run's logged
    iterates; returns ``f_low`` (``None`` with neither)."""
    true = next((r for r in runs if r["problem"] == "logreg-l1" and r["method"] == "true FW"), None)
    bounds = [] if f_low is None else [f_low]
    if true is not None:
        bounds.append(max(f - g for f, g in zip(true["loss"], true["gap"])))
    if not bounds:
        return None
    f_low = max(bounds)
    for r in runs:
        if r["problem"] == "logreg-l1":
            r["opt_gap"] = [f - f_low for f in r["loss"]]
            r["opt_gap_ratio_end"] = r["opt_gap"][-1] / r["opt_gap"][0]
    return f_low


def run(data_dir: str | None, *, n: int, steps: int, mlp_steps: int, num_directions: int, seed: int,
        radius: float = 10.0, box: float = 0.05, log: Any = None, methods: tuple[str, ...] = METHODS,
        problems: tuple[str, ...] = PROBLEMS, rho: float | None = None, device: str = "cpu",
        reference_steps: int = 5000) -> dict[str, Any]:
    x, y = binary_mnist(data_dir, n, seed=seed)
    x, y = x.to(device), y.to(device)
    runs = []
    reference: tuple[float, float] | None = None
    for problem in problems:
        runs += run_problem(problem, x, y, steps=steps if problem == "logreg-l1" else mlp_steps,
                            num_directions=num_directions, seed=seed, radius=radius, box=box, log=log, methods=methods,
                            rho=rho)
        if problem == "logreg-l1":
            reference = reference_optimum(x, y, radius, steps=reference_steps)
    return {"study": "frankwolfe", "n_examples": n, "digits": [4, 9], "steps": steps, "mlp_steps": mlp_steps,
            "f_star_upper": reference[0] if reference else None,
            "f_star_lower": optimality_gaps(runs, reference[1] if reference else None),
            "reference_steps": reference_steps, "num_directions": num_directions,
            "rho": "4/(k+8)^(2/3)" if rho is None else f"{rho:g}/(k+{rho:g})",
            "l1_radius": radius, "box": box, "seed": seed, "device": str(x.device), "runs": runs}


def run_from_args(args: Any) -> dict[str, Any]:
    steps = args.budget or (300 if args.quick else 10000)
    mlp_steps = min(steps, 100 if args.quick else 2000)
    n = getattr(args, "examples", None) or (256 if args.quick else 2000)
    k = getattr(args, "directions", None) or (1 if args.quick else 8)
    averaging_schedule(getattr(args, "rho", None))  # a bad --rho fails before the data are read
    methods = tuple(METHODS)
    if getattr(args, "methods", None):
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in wanted if m not in METHOD_KEYS]
        if bad or not wanted:
            raise ValueError(f"--methods takes {', '.join(METHOD_KEYS)} separated by commas, got {args.methods!r}")
        methods = tuple(METHOD_KEYS[m] for m in METHOD_KEYS if m in wanted)
    problems = PROBLEMS
    if getattr(args, "problems", None):
        wanted = [p.strip() for p in args.problems.split(",") if p.strip()]
        if not wanted or any(p not in PROBLEMS for p in wanted):
            raise ValueError(f"--problems takes {', '.join(PROBLEMS)} separated by commas, got {args.problems!r}")
        problems = tuple(p for p in PROBLEMS if p in wanted)
    device = resolve_device("fwdgrad study frankwolfe: --device", getattr(args, "device", "cpu"))
    return run(args.data_dir, n=n, steps=steps, mlp_steps=mlp_steps, num_directions=k, seed=args.seed,
               log=lambda s: print(s, file=sys.stderr, flush=True), methods=methods, rho=getattr(args, "rho", None),
               problems=problems, device=device, reference_steps=200 if args.quick else 5000)


def summary_lines(result: dict[str, Any]) -> list[str]:
    return [f"{r['problem']} {r['method']}: FW gap {r['gap'][0]:.4g} -> {r['gap'][-1]:.4g} "
            f"({r['gap_ratio_end']:.3g} of the start; smallest {r['min_gap_ratio']:.3g})"
            + (f"; f - f* <= {r['opt_gap_ratio_end']:.3g} of the start" if "opt_gap_ratio_end" in r else "")
            for r in result["runs"]]


def write_report(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    rows = [[r["problem"], r["method"], r["k"][-1], r["gap"][0], r["gap"][-1], r["gap_ratio_end"],
             r["min_gap_ratio"], r.get("opt_gap_ratio_end", "–"), r["loss"][0], r["loss"][-1]]
            for r in result["runs"]]
    md = ["# Frank-Wolfe with projected forward gradients (Rostami & Kia 2024)", "",
          f"`{result.get('command', '')}`; MNIST digits 4 vs 9, {result['n_examples']} training images (full-batch "
          f"objective); ℓ1 radius {result['l1_radius']:g} (logistic regression), box ±{result['box']:g} "
          "(MLP 784-32-2); "
          f"K = {result['num_directions']} Gaussian direction(s) per step; γ_k = 2/(k+8), "
          f"ρ_k = {result.get('rho', '4/(k+8)^(2/3)')}. The gap "
          "is the true Frank-Wolfe gap (autograd). `f − f*` end/start: the optimality gap of the convex problem "
          "at the end over the start, with f* replaced by a certified lower bound (the largest f − G of the "
          "true-FW iterates and of a float64 FISTA solution)"
          + (f", f* ∈ [{result['f_star_lower']:.7g}, {result['f_star_upper']:.7g}]"
             if result.get("f_star_upper") is not None else "")
          + ": an upper bound on the ratio.", "",
          markdown_table(["problem", "method", "steps", "gap at start", "gap at end", "end/start", "min/start",
                          "f − f* end/start", "loss at start", "loss at end"], rows)]
    paths = [write_json(out / "frankwolfe.json", result), write_atomic(out / "frankwolfe.md", "\n".join(md) + "\n")]
    plt = pyplot() if plots else None
    if plt is not None:
        problems = [p for p in PROBLEMS if any(r["problem"] == p for r in result["runs"])]
        fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.5), squeeze=False)
        for ax, problem in zip(axes[0], problems):
            for r in (r for r in result["runs"] if r["problem"] == problem):
                line, = ax.loglog([k + 1 for k in r["k"]], [g / r["gap"][0] for g in r["gap"]], label=r["method"])
                if "opt_gap" in r:
                    ax.loglog([k + 1 for k in r["k"]], [max(g, 1e-12) / r["opt_gap"][0] for g in r["opt_gap"]],
                              ls="--", color=line.get_color(), label=f"{r['method']}: f − f* (upper bound)")
            ax.axhline(1e-3, color="k", lw=0.7, ls=":")
            ax.set(xlabel="step k + 1", ylabel="gap / gap at start", title=problem)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / "frankwolfe.png"))
    return paths
