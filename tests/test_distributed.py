"""Seed-sharing data and tangent parallelism on torch.distributed (gloo, processes on 127.0.0.1).

Each multi-process test starts the ranks with :func:`fwdgrad.distributed.spawn_local` running
``tests/distributed_worker.py`` and is bounded by a timeout; the single-process tests need no network."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distributed_worker as worker
from fwdgrad.distributed import (
    ConcatSource,
    LocalComm,
    ReplayLog,
    SeedSharingSGD,
    record_bytes,
    replay,
    replay_file,
    shard,
    spawn_local,
    step_source,
)

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
SRC = str(Path(__file__).resolve().parents[1] / "src")


def spawn(
    scenario: str, out: Path, nproc: int = 2, timeout_s: float = 60.0, collective_timeout_s: float = 20.0
) -> tuple[list[int], list[dict], float]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "FWDGRAD_TEST_TIMEOUT": str(collective_timeout_s)}
    start = time.monotonic()
    codes = spawn_local(nproc, [sys.executable, WORKER, scenario, str(out)], timeout_s=timeout_s, env=env)
    took = time.monotonic() - start
    results = [json.loads(p.read_text()) if (p := out / f"result_{r}.json").exists() else None for r in range(nproc)]
    return codes, results, took


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], list[dict]]:
    out = tmp_path_factory.mktemp("equal")
    codes, results, _ = spawn("equal", out)
    return out, codes, results


# ------------------------------------------------------------------------------------- one process
def test_shard_refuses_unequal_shards() -> None:
    with pytest.raises(ValueError, match="batch size 7 is not a multiple of the world size 2"):
        shard(torch.zeros(7, 3), 0, 2)
    assert torch.equal(shard(torch.arange(8), 1, 2), torch.arange(4, 8))


@pytest.mark.parametrize("tangents", ["gaussian", "rademacher", "rank1"])
def test_world_of_one_equals_autograd_reference(tangents: str) -> None:
    model, x, y = worker.problem()
    opt = SeedSharingSGD(model, "fg-w", seed=7, num_directions=worker.K, tangents=tangents)
    for _ in range(4):
        opt.step(lambda m: F.cross_entropy(m(x), y), lr=worker.LR)
    want = worker.reference("data", 1, 4, tangents)
    for p, q in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
    assert opt.bytes_per_step == 0.0


def test_concat_source_is_rank_major() -> None:
    w = torch.zeros(3, 2, dtype=torch.float64)
    parts = [step_source("gaussian", [w], 2, 0, 0, r) for r in range(3)]
    cat = ConcatSource(parts)
    assert torch.equal(cat.dense(0, 3), parts[1].dense(0, 1))
    d = torch.arange(6, dtype=torch.float64)
    want = sum(d[j] * cat.dense(0, j) for j in range(6)) / 6
    torch.testing.assert_close(cat.mean(0, d), want, rtol=0, atol=1e-14)


def test_bad_arguments() -> None:
    model, _, _ = worker.problem()
    with pytest.raises(ValueError, match="mode must be one of"):
        SeedSharingSGD(model, seed=0, mode="pipeline")
    with pytest.raises(ValueError, match="option 'generator' is set from the base seed"):
        SeedSharingSGD(model, seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="takes no generator"):
        SeedSharingSGD(model, "bp", seed=0)
    with pytest.raises(ValueError, match="directions='momentum' cannot be shared by seed"):
        SeedSharingSGD(model, seed=0, directions="momentum")
    with pytest.raises(ValueError, match="directions='mixed' cannot be shared by seed"):
        SeedSharingSGD(model, seed=0, directions="mixed")
    with pytest.raises(ValueError, match="readout='exact' cannot be shared by seed"):
        SeedSharingSGD(model, seed=0, readout="exact")
    with pytest.raises(ValueError, match="aggregation='projection' cannot be shared by seed in tangent mode"):
        SeedSharingSGD(model, seed=0, mode="tangent", aggregation="projection")


def test_projection_data_mode_world_of_one_replays(tmp_path: Path) -> None:
    """fg-w's projection aggregation exchanges its coefficients (linear in the derivatives): allowed in data
    mode, and the log still replays bit for bit."""
    model, x, y = worker.problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = SeedSharingSGD(model, seed=2, num_directions=3, aggregation="projection")
    opt.log = ReplayLog(tmp_path / "p.log", opt)
    for _ in range(5):
        opt.step(lambda m: F.cross_entropy(m(x), y), lr=1e-3)
    opt.log.close()
    got = replay(tmp_path / "p.log", init)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_replay_single_process_bit_identical(tmp_path: Path) -> None:
    model, x, y = worker.problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(init, tmp_path / "init.pt")
    opt = SeedSharingSGD(model, "fg-w", seed=11, num_directions=3, tangents="rademacher")
    opt.log = ReplayLog(tmp_path / "run.log", opt)
    for t in range(30):
        opt.step(lambda m: F.cross_entropy(m(x), y), lr=0.1 / (1 + t), weight_decay=1e-3, momentum=0.5)
    opt.log.close()
    assert (tmp_path / "run.log").stat().st_size - _header_size(tmp_path / "run.log") == 30 * record_bytes(3)
    steps = replay_file(tmp_path / "run.log", tmp_path / "init.pt", tmp_path / "out.pt")
    assert steps == 30
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    bad = dict(init)
    bad["0.bias"] = bad["0.bias"] + 1
    with pytest.raises(ValueError, match="do not match the digest"):
        replay(tmp_path / "run.log", bad)


def _header_size(path: Path) -> int:
    from fwdgrad.distributed import read_header

    return read_header(path)[1]


# ------------------------------------------------------------------------------------- zeroth order
@pytest.mark.parametrize("name", ["zo", "zo-sign"])
@pytest.mark.parametrize("options", [{"tangents": "gaussian"}, {"tangents": "rademacher", "one_sided": True},
                                     {"tangents": "sphere", "eps": 1e-4}], ids=["gaussian", "rademacher-1s", "sphere"])
def test_zo_world_of_one_equals_reference_and_replays(tmp_path: Path, name: str, options: dict) -> None:
    """K = 2 > 1 and sphere directions: the seed-shared step regenerates the perturbation's own directions
    (zo's per-tensor seeds are direction-major, not TangentSource's), so it equals the SPSA reference formed
    from Perturbation draws (1e-12), and the fused log replays bit for bit."""
    model, x, y = worker.problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = SeedSharingSGD(model, name, seed=7, num_directions=worker.K, **options)
    opt.log = ReplayLog(tmp_path / "zo.log", opt)
    for _ in range(4):
        opt.step(lambda m: F.cross_entropy(m(x), y), lr=worker.LR)
    opt.log.close()
    want = worker.zo_reference(name, "data", 1, 4, **options)
    for p, q in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
    got = replay(tmp_path / "zo.log", init)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_zo_seed_shared_grad_equals_the_plain_estimator() -> None:
    """The .grad the seed-shared zo writes is zo's own estimate for the same generator state (K = 3)."""
    from fwdgrad import estimator
    from fwdgrad.distributed import step_seed

    m1, x, y = worker.problem()
    m2, _, _ = worker.problem()
    shared = SeedSharingSGD(m1, "zo", seed=3, num_directions=3)
    shared.accumulate(lambda m: F.cross_entropy(m(x), y))
    plain = estimator("zo", num_directions=3, restore="snapshot",
                      generator=torch.Generator().manual_seed(step_seed(3, 0, 0)))
    plain(m2, lambda m: F.cross_entropy(m(x), y))
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)  # restored bit for bit
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


def test_zo_refusals_and_config() -> None:
    model, _, _ = worker.problem()
    with pytest.raises(ValueError, match=r"zo-cons cannot be shared by seed: ZO-SGD-Cons picks among θ, θ − lr·ĝ "
                                         r"and θ \+ lr·ĝ by evaluating the loss at each, a choice that is not linear"):
        SeedSharingSGD(model, "zo-cons", seed=0)
    with pytest.raises(ValueError, match="zo with restore='regenerate' cannot be shared by seed: its seed-shared "
                                         "step uses restore='snapshot'"):
        SeedSharingSGD(model, "zo", seed=0, restore="regenerate")
    base = SeedSharingSGD(model, "zo", seed=0).config()
    # eps None: the dtype's default (1e-3, or 1e-2 in half precision), recorded as such
    assert base["estimator_config"] == {"tangents": "gaussian", "num_directions": 1, "eps": None, "one_sided": False,
                                        "restore": "snapshot"}
    assert SeedSharingSGD(model, "zo", seed=0, eps=None).config()["estimator_config"] == base["estimator_config"]
    for change in ({"eps": 1e-4}, {"eps": 1e-3}, {"one_sided": True}, {"tangents": "rademacher"}):
        assert SeedSharingSGD(model, "zo", seed=0, **change).config()["estimator_config"] != base["estimator_config"]
    assert "estimator_config" not in SeedSharingSGD(model, "fg-w", seed=0).config()  # fg-w's header unchanged


def test_local_comm_counts_nothing() -> None:
    comm = LocalComm()
    assert comm.all_reduce_sum(torch.ones(3)).tolist() == [1.0, 1.0, 1.0] and comm.bytes_total == 0


# ------------------------------------------------------------------------------------- two processes
def test_two_ranks_ran(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    _, codes, results = equal_run
    assert codes == [0, -9] and all(r is not None for r in results)  # rank 1 is killed last (see below)


@pytest.mark.parametrize("mode", ["data", "tangent"])
def test_parallel_equals_single_process(equal_run: tuple[Path, list[int], list[dict]], mode: str) -> None:
    out, _, _ = equal_run
    want = worker.reference(mode, 2, worker.WORLD_STEPS)
    for r in range(2):
        got = torch.load(out / f"{mode}_{r}.pt", weights_only=True)
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_grad_path_with_adam_equals_single_process(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    out, _, _ = equal_run
    model, x, y = worker.problem()
    want = [p.detach() for p in worker.adam_run(model, x, y, None)]
    a, b = (torch.load(out / f"adam_{r}.pt", weights_only=True) for r in range(2))
    for p, q, w in zip(a, b, want, strict=True):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, w, rtol=0, atol=1e-10)  # Adam divides by sqrt(v): looser than SGD's 1e-12


def test_accumulate_then_sgd_equals_fused_step() -> None:
    m1, x, y = worker.problem()
    m2, _, _ = worker.problem()
    fused = SeedSharingSGD(m1, seed=4, num_directions=3)
    grad = SeedSharingSGD(m2, seed=4, num_directions=3)
    sgd = torch.optim.SGD(m2.parameters(), lr=worker.LR)
    for _ in range(3):
        fused.step(lambda m: F.cross_entropy(m(x), y), lr=worker.LR)
        sgd.zero_grad()
        grad.accumulate(lambda m: F.cross_entropy(m(x), y))
        sgd.step()
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    grad.log = object()
    with pytest.raises(ValueError, match="log= records fused SGD steps only"):
        grad.accumulate(lambda m: F.cross_entropy(m(x), y))


def test_bytes_per_step_within_target(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    _, _, results = equal_run
    k, w = worker.K, 2
    for res in results:
        assert res["data_bytes_per_step"] == 8 * (k + 1)  # one all_reduce of [loss, d_1..d_K] in float64
        assert res["tangent_bytes_per_step"] == 8 * k * w  # one all_gather of K float64 per rank
        # the weight check every 10 steps adds one 16-byte all_reduce: 1.6 bytes per step
        assert res["long_bytes_per_step"] == 8 * k * w + 16 / 10
        assert max(v for key, v in res.items() if key.endswith("bytes_per_step")) <= 8 * k * w + 64


def test_hundred_steps_bit_identical_replayed_and_resumed(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    out, _, _ = equal_run
    a, b = (torch.load(out / f"long_{r}.pt", weights_only=True) for r in range(2))
    init = torch.load(out / "init.pt", weights_only=True)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    replayed = replay(out / "run.log", init)
    for r in range(2):
        resumed = torch.load(out / f"resumed_{r}.pt", weights_only=True)
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], replayed[k]) and torch.equal(a[k], resumed[k]), k


def test_mismatch_detected_at_start_up(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    _, _, results = equal_run
    for res in results:  # both ranks refuse, with the same message
        assert "rank(s) [1] differ from rank 0 in their configuration" in res["mismatch_seed"]
        assert "rank(s) [1] start from initial weights different from rank 0's" in res["mismatch_init"]
        assert "rank(s) [1] differ from rank 0 in their configuration" in res["mismatch_eps"]  # zo's eps


@pytest.mark.parametrize(("name", "mode", "options"), worker.ZO_RUNS,
                         ids=[f"{n}-{m}" for n, m, _ in worker.ZO_RUNS])
def test_zo_parallel_equals_single_process(
    equal_run: tuple[Path, list[int], list[dict]], name: str, mode: str, options: dict
) -> None:
    """zo and zo-sign over 2 processes: data parallel equals one process on the whole batch (zo-sign: the sign
    of the averaged estimate), tangent parallel one process with K·W directions in rank-major order; both
    ranks bit-identical; K + 1 (data) or K·W (tangent) float64 scalars per step."""
    out, _, results = equal_run
    want = worker.zo_reference(name, mode, 2, worker.WORLD_STEPS, **options)
    a, b = (torch.load(out / f"{name}_{mode}_{r}.pt", weights_only=True) for r in range(2))
    for p, q, w in zip(a, b, want, strict=True):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, w, rtol=0, atol=1e-12)
    for res in results:
        assert res[f"{name}_{mode}_bytes_per_step"] == 8 * (worker.K + 1 if mode == "data" else worker.K * 2)


def test_zo_sign_two_ranks_bit_identical_and_replayed(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    out, _, _ = equal_run
    a, b = (torch.load(out / f"zo_long_{r}.pt", weights_only=True) for r in range(2))
    init = torch.load(out / "zo_init.pt", weights_only=True)
    replayed = replay(out / "zo_run.log", init)
    assert any(not torch.equal(a[k], init[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], replayed[k]), k


def _check_killed(codes: list[int], results: list[dict], victim: int) -> None:
    survivor = 1 - victim
    assert codes[victim] == -9 and codes[survivor] == 0, codes
    res = results[survivor]
    assert res["lost"] == [victim] and f"rank {victim} was lost" in res["error"], res
    assert res["seconds_to_error"] < 20  # within the collectives' timeout (FWDGRAD_TEST_TIMEOUT): no hang


def test_killed_rank_is_named(equal_run: tuple[Path, list[int], list[dict]]) -> None:
    _, codes, results = equal_run  # the run ends with rank 1 killed at step 5 of a data-parallel run
    _check_killed(codes, results, 1)


@pytest.mark.slow
def test_hung_rank_is_named_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1 stops (SIGSTOP) instead of dying: rank 0's collective fails at the 5 s timeout and names it."""
    codes, results, _ = spawn("hang1", tmp_path, timeout_s=40, collective_timeout_s=5)
    assert codes[1] == -9 and codes[0] == 0, codes  # the stopped rank is killed by spawn_local afterwards
    res = results[0]
    assert res["lost"] == [1] and "rank 1 was lost" in res["error"], res
    assert 4 < res["seconds_to_error"] < 15, res


@pytest.mark.slow
def test_killed_store_host_is_named(tmp_path: Path) -> None:
    codes, results, _ = spawn("kill0", tmp_path, timeout_s=60)
    _check_killed(codes, results, 0)


def test_cli_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fwdgrad import cli

    model, x, y = worker.problem()
    torch.save(model.state_dict(), tmp_path / "init.pt")
    opt = SeedSharingSGD(model, "fg-w", seed=5, num_directions=1)
    opt.log = ReplayLog(tmp_path / "run.log", opt)
    for _ in range(10):
        opt.step(lambda m: F.cross_entropy(m(x), y), lr=0.05)
    opt.log.close()
    argv = ["replay", str(tmp_path / "run.log"), "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "m.pt")]
    assert cli.main(argv) == 0
    assert f"replayed 10 steps of {tmp_path / 'run.log'}" in capsys.readouterr().out
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    (tmp_path / "bad.log").write_bytes(b"not a log")
    assert cli.main(["replay", str(tmp_path / "bad.log"), "--init", str(tmp_path / "init.pt"), "--out",
                     str(tmp_path / "m2.pt")]) == 2
    assert "is not a fwdgrad replay log" in capsys.readouterr().err


@pytest.mark.slow
def test_four_ranks(tmp_path: Path) -> None:
    """4 processes: both equalities, the byte counts and 100 bit-identical steps (replayed, resumed)."""
    codes, results, _ = spawn("basic", tmp_path, nproc=4, timeout_s=240)
    assert codes == [0] * 4
    for mode in ("data", "tangent"):
        want = worker.reference(mode, 4, worker.WORLD_STEPS)
        for r in range(4):
            got = torch.load(tmp_path / f"{mode}_{r}.pt", weights_only=True)
            for p, q in zip(got, want, strict=True):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for res in results:
        assert res["data_bytes_per_step"] == 8 * (worker.K + 1)
        assert res["tangent_bytes_per_step"] == 8 * worker.K * 4 <= 8 * worker.K * 4 + 64
    for name, mode, options in worker.ZO_RUNS:
        want = worker.zo_reference(name, mode, 4, worker.WORLD_STEPS, **options)
        for r in range(4):
            got = torch.load(tmp_path / f"{name}_{mode}_{r}.pt", weights_only=True)
            for p, q in zip(got, want, strict=True):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    zo_replayed = replay(tmp_path / "zo_run.log", torch.load(tmp_path / "zo_init.pt", weights_only=True))
    for r in range(4):
        got = torch.load(tmp_path / f"zo_long_{r}.pt", weights_only=True)
        assert all(torch.equal(got[k], zo_replayed[k]) for k in got)
    states = [torch.load(tmp_path / f"{what}_{r}.pt", weights_only=True) for what in ("long", "resumed")
              for r in range(4)]
    replayed = replay(tmp_path / "run.log", torch.load(tmp_path / "init.pt", weights_only=True))
    for k in replayed:
        assert all(torch.equal(s[k], replayed[k]) for s in states), k
