"""fwdgrad.studies and the `fwdgrad study` / `fwdgrad diagnose` commands: the pieces against exact answers, and
each study end to end in an even smaller version of --quick (a few seconds in all)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fwdgrad
from data_fixtures import make_idx_files
from fwdgrad import cli
from fwdgrad.diagnostics.output import new_run_dir
from fwdgrad.studies import linreg, testfunctions

D = torch.float64


def test_linreg_closed_form_is_the_librarys_forward_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    theta, x = torch.randn(5, dtype=D, generator=gen), torch.randn(5, dtype=D, generator=gen)
    y = torch.tensor(0.3, dtype=D)
    est, xi = linreg.forward_gradient_step(theta, x, y, torch.Generator().manual_seed(1))
    closed = linreg.closed_form_step(theta[None], x[None], y[None], xi[None])[0]
    assert torch.allclose(est, closed, rtol=1e-12, atol=1e-14)


def test_fit_slope_recovers_a_power_law() -> None:
    ks = [10, 20, 50, 100, 200, 500, 1000]
    assert linreg.fit_slope(ks, [3.0 * k**-1.0 for k in ks], 20) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(linreg.fit_slope(ks, [1.0] * 7, 600))
    with pytest.raises(ValueError, match="'adam'"):
        linreg.simulate(4, "adam", steps=5, k0=1.0, repeats=1)


def test_test_functions_have_their_minimum_and_both_engines_agree() -> None:
    f = testfunctions
    assert float(f.beale(torch.tensor([3.0, 0.5], dtype=D))) == 0.0
    assert float(f.booth(torch.tensor([1.0, 3.0], dtype=D))) == 0.0
    assert float(f.rosenbrock(torch.ones(5, dtype=D))) == 0.0
    assert float(f.matyas(torch.zeros(2, dtype=D))) == 0.0
    x = torch.randn(4, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(f._gradients(f.ellipsoid, x, "bp", torch.Generator()), 2 * torch.arange(1, 7) * x)
    for kind in ("fg-gaussian", "fg-rademacher", "fg-sphere"):
        a = f._gradients(f.rosenbrock, x, kind, torch.Generator().manual_seed(3), "library")
        b = f._gradients(f.rosenbrock, x, kind, torch.Generator().manual_seed(3), "jvp")
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
        # each row's estimate is parallel to its own tangent and its projection on the gradient is right
        g = f._gradients(f.rosenbrock, x, "bp", torch.Generator())
        v = fwdgrad_tangents(kind, x)
        assert torch.allclose(a, (g * v).sum(1, keepdim=True) * v, rtol=1e-10, atol=1e-10)


def test_momentum_directions_of_the_test_functions_study() -> None:
    """fg-momentum (Silver et al. 2022, as fg-w's directions='momentum' with K = 1), row by row: the plain
    Gaussian forward gradient while the average is 0; then exact along the guess u = m/‖m‖, the fresh
    tangent's projected estimate off it, and the average updated to βm + (1−β)ĝ; both engines agree."""
    f = testfunctions
    x = torch.randn(3, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    g = f._gradients(f.rosenbrock, x, "bp", torch.Generator())
    with pytest.raises(ValueError, match="needs state"):
        f._gradients(f.rosenbrock, x, "fg-momentum", torch.Generator())
    m = torch.zeros_like(x)
    first = f._gradients(f.rosenbrock, x, "fg-momentum", torch.Generator().manual_seed(3), "library", m)
    plain = f._gradients(f.rosenbrock, x, "fg-gaussian", torch.Generator().manual_seed(3))
    assert torch.allclose(first, plain, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m, (1 - f.MOMENTUM_BETA) * first, rtol=1e-12, atol=1e-12)
    m_lib, m_jvp = m.clone(), m.clone()
    a = f._gradients(f.rosenbrock, x, "fg-momentum", torch.Generator().manual_seed(4), "library", m_lib)
    b = f._gradients(f.rosenbrock, x, "fg-momentum", torch.Generator().manual_seed(4), "jvp", m_jvp)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10) and torch.allclose(m_lib, m_jvp, rtol=1e-10, atol=1e-10)
    u = m / m.norm(dim=1, keepdim=True)
    v = fwdgrad.sample_tangents("gaussian", [x[0]], 3, torch.Generator().manual_seed(4))[0]
    along = (g * u).sum(1, keepdim=True)
    assert torch.allclose((a * u).sum(1, keepdim=True), along, rtol=1e-10, atol=1e-10)  # exact along the guess
    off = (g * v).sum(1, keepdim=True) * (v - (v * u).sum(1, keepdim=True) * u)
    assert torch.allclose(a - along * u, off, rtol=1e-10, atol=1e-10)
    assert torch.allclose(m_lib, f.MOMENTUM_BETA * m + (1 - f.MOMENTUM_BETA) * a, rtol=1e-12, atol=1e-12)
    # a run on the sphere: with the average pointing down the gradient, momentum directions beat one plain tangent
    starts = torch.full((2, 16), 3.0, dtype=D)
    mom = f.run_config("sphere", 16, "sgd", "fg-momentum", starts, [0.05], 400, seed=0, engine="jvp")[0]
    plain = f.run_config("sphere", 16, "sgd", "fg-gaussian", starts, [0.05], 400, seed=0, engine="jvp")[0]
    assert mom["successes"] == 2 and (plain["mean_steps"] is None or mom["mean_steps"] < plain["mean_steps"])


def test_linreg_schedules_and_the_exact_mean_error() -> None:
    """The paper's schedule (a = log d, k₀ = a(d+2)², Bos & Schmidt-Hieber's simulation code) against the unit
    one; expected_mse is the exact mean of the simulated chains (a Monte Carlo check with a documented
    tolerance: 400 runs of d = 4, relative s.e. of the mean ≈ 4 %, allowed 15 %)."""
    assert linreg.schedule_a(8, "paper") == pytest.approx(math.log(8)) and linreg.schedule_a(8, "unit") == 1.0
    assert linreg.fg_k0(8, 1, "paper") == pytest.approx(math.log(8) * 100)
    assert linreg.fg_k0(8, 1, "unit") == 108 and linreg.fg_k0(8, 4, "paper") == pytest.approx(math.log(8) * 33)
    with pytest.raises(ValueError, match="'adam'"):
        linreg.schedule_a(8, "adam")
    with pytest.raises(ValueError, match=r"got -1\.0"):
        linreg.simulate(4, "fg", steps=5, k0=1.0, repeats=1, a=-1.0)
    a, k0 = math.log(4), linreg.fg_k0(4, 1, "paper")
    sim = linreg.simulate(4, "fg", steps=300, k0=k0, repeats=400, a=a, points=4)
    exact = linreg.expected_mse(4, 300, a=a, k0=k0)
    for k, mse in zip(sim["k"], sim["mse"]):
        assert mse == pytest.approx(exact[k - 1], rel=0.15)
    # the limit k·MSE → d(d+2)·a²/(2a − 1) that makes the paper's schedule collapse under d² log d
    d, big = 8, 200_000
    e = linreg.expected_mse(d, big, a=math.log(d), k0=linreg.fg_k0(d, 1, "paper"))[-1]
    assert big * e == pytest.approx(d * (d + 2) * math.log(d) ** 2 / (2 * math.log(d) - 1), rel=0.01)


def fwdgrad_tangents(kind: str, x: torch.Tensor) -> torch.Tensor:
    import fwdgrad

    return fwdgrad.sample_tangents(kind.removeprefix("fg-"), [x[0]], x.shape[0], torch.Generator().manual_seed(3))[0]


def test_performance_profile_of_a_handmade_case() -> None:
    rows = [{"function": "f", "n": 2, "optimizer": "a", "gradient": "bp", "steps": [10, 40]},
            {"function": "f", "n": 2, "optimizer": "b", "gradient": "bp", "steps": [20, None]}]
    prof = testfunctions.performance_profiles(rows, taus=[1, 2, 4])
    assert prof["solvers"]["a bp"] == [1.0, 1.0, 1.0]  # fastest on problem 0, the only solver of problem 1
    assert prof["solvers"]["b bp"] == [0.0, 0.5, 0.5]


def test_new_run_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    a = new_run_dir(tmp_path, "x", "p")
    b = new_run_dir(tmp_path, "x", "p")
    assert a.name == "x" and b.name == "x-2"


def _study(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, name: str = "r") -> tuple[int, str]:
    code = cli.main(["study", *args, "--out", str(tmp_path), "--name", name, "--no-plots"])
    return code, capsys.readouterr().out


def test_study_linreg_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _study(tmp_path, capsys, "linreg", "--quick", "--dims", "4,6", "--repeats", "2",
                       "--steps-per-sample", "1")
    assert code == 0
    assert "slope d=4: " in out and "slope d=6: " in out and "collapse fg" in out
    result = json.loads((tmp_path / "r" / "linreg.json").read_text())
    assert {(r["method"], r["d"]) for r in result["runs"]} == {("fg", 4), ("sgd", 4), ("fg", 6), ("sgd", 6)}
    assert all(r["mse"][-1] < r["mse"][0] for r in result["runs"])
    assert (tmp_path / "r" / "linreg.md").exists()


def test_study_testfunctions_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _study(tmp_path, capsys, "testfunctions", "--quick", "--functions", "booth", "--budget", "40")
    assert code == 0 and "success adam bp:" in out
    result = json.loads((tmp_path / "r" / "testfunctions.json").read_text())
    assert len(result["rows"]) == len(testfunctions.OPTIMIZERS) * len(testfunctions.GRADIENTS)


def test_study_frankwolfe_small(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fwdgrad.data import RESOURCES

    files = make_idx_files(n_train=40, n_test=10)  # random images; their md5s replace the official ones
    monkeypatch.setitem(RESOURCES, "mnist", files.resources("mnist"))
    files.write(tmp_path / "data" / "mnist")
    code, out = _study(tmp_path, capsys, "frankwolfe", "--quick", "--budget", "6", "--data-dir", str(tmp_path / "data"))
    assert code == 0 and "logreg-l1 true FW: FW gap" in out
    result = json.loads((tmp_path / "r" / "frankwolfe.json").read_text())
    assert {r["method"] for r in result["runs"]} == {"true FW", "FG FW", "FG FW + VR"}
    true = next(r for r in result["runs"] if r["problem"] == "logreg-l1" and r["method"] == "true FW")
    assert true["gap"][-1] < true["gap"][0]
    convex = [r for r in result["runs"] if r["problem"] == "logreg-l1"]
    assert result["f_star_lower"] <= min(min(r["loss"]) for r in convex)  # a lower bound on f*
    assert all(min(r["opt_gap"]) >= 0 and "opt_gap" not in m for r in convex
               for m in result["runs"] if m["problem"] == "mlp-box")
    assert "f − f* end/start" in (tmp_path / "r" / "frankwolfe.md").read_text()
    code, _ = _study(tmp_path, capsys, "frankwolfe", "--quick", "--budget", "3", "--methods", "fg-vr",
                     "--examples", "20", "--directions", "2", "--rho", "3", "--problems", "logreg-l1", "--device",
                     "cpu", "--data-dir", str(tmp_path / "data"), name="vr")
    result = json.loads((tmp_path / "vr" / "frankwolfe.json").read_text())
    assert code == 0 and {(r["problem"], r["method"]) for r in result["runs"]} == {("logreg-l1", "FG FW + VR")}
    assert result["device"] == "cpu"
    from fwdgrad.studies import frankwolfe

    written = frankwolfe.write_report(result, tmp_path / "plot")  # one problem: one panel
    assert (tmp_path / "plot" / "frankwolfe.png") in written or frankwolfe.pyplot() is None
    lines: list[str] = []  # a long run reports its progress at every logged step
    frankwolfe.run_problem("logreg-l1", torch.randn(6, 784), torch.tensor([0, 1] * 3), steps=3, num_directions=1,
                           seed=0, radius=1.0, box=0.05, log=lines.append, methods=("FG FW + VR",))
    assert any("FG FW + VR: step 3/3, gap " in line for line in lines)
    assert result["n_examples"] == 20 and result["num_directions"] == 2 and result["rho"] == "3/(k+3)"


def test_frankwolfe_optimality_gap_is_bounded_by_a_certified_lower_bound_on_f_star() -> None:
    """``f_low = max_k (f(x_k) − G(x_k))`` of true FW is ≤ f* (convexity), so the reported ratio
    ``(f(x_k) − f_low)/(f(x_0) − f_low)`` is never below the true one; checked against f* from a long true-FW
    run on a tiny problem, and on hand-made numbers."""
    from fwdgrad.studies import frankwolfe

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 784, generator=g), torch.tensor([0, 1] * 6)
    short = frankwolfe.run_problem("logreg-l1", x, y, steps=30, num_directions=2, seed=0, radius=1.0, box=0.05,
                                   methods=("true FW", "FG FW + VR"))
    f_low = frankwolfe.optimality_gaps(short)
    long = frankwolfe.run_problem("logreg-l1", x, y, steps=3000, num_directions=1, seed=0, radius=1.0, box=0.05,
                                  methods=("true FW",))
    f_star_upper = min(long[0]["loss"])  # f* ≤ any feasible value; the long run is close to it
    assert long[0]["gap"][-1] < 1e-2 * long[0]["gap"][0]
    assert f_low <= f_star_upper  # f_low ≤ f* ≤ every feasible value
    assert f_low >= f_star_upper - long[0]["gap"][0]  # and not vacuous: above f(x) − G(x) at the long run's start
    for r in short:
        true_ratio = (r["loss"][-1] - f_star_upper) / (r["loss"][0] - f_star_upper)
        assert r["opt_gap_ratio_end"] >= true_ratio - 1e-9
    upper, lower = frankwolfe.reference_optimum(x, y, 1.0, steps=500)
    assert lower <= f_star_upper and lower <= upper <= f_star_upper + 1e-6  # FISTA at least as good as FW here
    assert frankwolfe.optimality_gaps(short, lower) == max(lower, f_low)
    made = [{"problem": "logreg-l1", "method": "true FW", "loss": [1.0, 0.5, 0.4], "gap": [2.0, 0.2, 0.05]},
            {"problem": "logreg-l1", "method": "FG FW", "loss": [1.0, 0.8], "gap": [2.0, 1.0]},
            {"problem": "mlp-box", "method": "true FW", "loss": [1.0], "gap": [1.0]}]
    assert frankwolfe.optimality_gaps(made) == pytest.approx(0.35)  # max(1 − 2, 0.5 − 0.2, 0.4 − 0.05)
    assert made[1]["opt_gap"] == pytest.approx([0.65, 0.45])
    assert made[1]["opt_gap_ratio_end"] == pytest.approx(0.45 / 0.65)
    assert "opt_gap" not in made[2]
    assert frankwolfe.optimality_gaps(made[1:]) is None  # no true-FW run and no bound given: none
    assert frankwolfe.optimality_gaps(made[1:], 0.3) == 0.3 and made[1]["opt_gap"] == pytest.approx([0.7, 0.5])


def test_project_l1_is_the_euclidean_projection_onto_the_l1_ball() -> None:
    """Feasible, the identity inside the ball, on the sphere outside it, and the variational inequality
    ⟨v − p, w − p⟩ ≤ 0 for every w of the ball (its vertices suffice, the function being linear in w)."""
    from fwdgrad.studies.frankwolfe import project_l1

    g = torch.Generator().manual_seed(3)
    inside = torch.tensor([[0.2, -0.1], [0.0, 0.3]], dtype=torch.float64)
    assert torch.equal(project_l1(inside, 1.0), inside)
    for scale in (0.5, 3.0, 40.0):
        v = scale * torch.randn(3, 7, generator=g, dtype=torch.float64)
        p = project_l1(v, 2.0)
        assert p.shape == v.shape and float(p.abs().sum()) <= 2.0 + 1e-12
        if float(v.abs().sum()) > 2.0:
            assert float(p.abs().sum()) == pytest.approx(2.0, abs=1e-12)
        r = (v - p).reshape(-1)
        vertices = torch.cat([2.0 * torch.eye(21, dtype=torch.float64), -2.0 * torch.eye(21, dtype=torch.float64)])
        assert float(((vertices - p.reshape(-1)) @ r).max()) <= 1e-10


@pytest.mark.parametrize("args, message", [
    (["study", "testfunctions", "--functions", "himmelblau"], "'himmelblau'"),
    (["study", "linreg", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["study", "frankwolfe", "--budget", "0"], "--budget must be >= 1, got 0"),
    (["study", "frankwolfe", "--directions", "0"], "--directions must be >= 1, got 0"),
    (["study", "frankwolfe", "--methods", "fg,adam"], "'fg,adam'"),
    (["study", "frankwolfe", "--rho", "0.5"], "rho must be a number >= 1, got 0.5"),
    (["study", "frankwolfe", "--problems", "logreg-l1,svm"], "'logreg-l1,svm'"),
    (["study", "frankwolfe", "--device", "abacus"], "'abacus'"),
    (["study", "linreg", "--schedule", "cosine"], "'cosine'"),
    (["study", "linreg", "--dims", "1"], "--dims must be >= 2"),
    (["diagnose", "--samples", "1"], "--samples must be >= 2, got 1"),
    (["diagnose", "--methods", "nope"], "'nope'"),
])
def test_bad_options_exit_2_naming_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                              message: str) -> None:
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_diagnose_command_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["diagnose", "--model", "mlp:width=8", "--methods", "bp;fg-w;l-bp", "--samples", "3",
                     "--batch-size", "4", "--out", str(tmp_path), "--name", "d", "--no-plots"])
    assert code == 0
    rep = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert [m["method"] for m in rep["methods"]] == ["bp", "fg-w"]
    assert rep["skipped"][0]["method"] == "l-bp"
    assert "## fg-w per parameter" in (tmp_path / "d" / "diagnose.md").read_text()
