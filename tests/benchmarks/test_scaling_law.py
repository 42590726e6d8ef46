"""``benchmarks/scaling_law/scaling_law.py``: the fits, the learning-rate sweep, the run plan and the report, without training.

The fits must recover the exponent of losses made from a known law; the sweep must bracket the minimum of a known
loss curve; every planned run must reach the preset's tokens per parameter in whole sync intervals; and the report,
fed runs whose losses follow a known law and a known gap, must state that gap, its trend and the targets.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scaling_law"))

import harness
import scaling_law as sl


def test_fits_recover_a_known_law() -> None:
    N = np.array([2.5e4, 1e5, 2.2e5, 3.9e5, 8e5])
    A, alpha = sl.fit_power(N, 7.0 * N ** -0.09)
    assert alpha == pytest.approx(-0.09, rel=1e-9) and A == pytest.approx(7.0, rel=1e-9)
    E, A2, alpha2 = sl.fit_offset(N, 1.2 + 40.0 * N ** -0.35)
    assert (E, A2, alpha2) == pytest.approx((1.2, 40.0, -0.35), rel=1e-3)
    assert sl.ratio_slope(N, 1.01 * (N / N[0]) ** 0.02) == pytest.approx(0.02)


def test_sweep_brackets_the_minimum() -> None:
    calls: list[float] = []

    def loss(lr: float) -> float:  # minimum at 4e-3, convex in log lr
        calls.append(lr)
        return (math.log(lr) - math.log(4e-3)) ** 2

    assert sl.sweep_lr(loss, 4e-3)[0] == 4e-3 and sorted(calls) == [2e-3, 4e-3, 8e-3]  # 3 runs when centred
    calls.clear()
    best, losses = sl.sweep_lr(loss, 1.6e-2)  # start above: up once (worse), then down until it gets worse
    assert best == 4e-3 and sorted(losses) == [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    calls.clear()
    best, losses = sl.sweep_lr(loss, 1e-3)  # start below: up until it gets worse
    assert best == 4e-3 and sorted(losses) == [1e-3, 2e-3, 4e-3, 8e-3]
    best, losses = sl.sweep_lr(loss, 1.28e-1, max_runs=3)  # the cap: best of what ran, at the grid's edge
    assert len(losses) == 3 and best == min(losses, key=losses.get) == 6.4e-2


@pytest.mark.parametrize("preset", ["cpu", "gpu", "full"])
def test_every_run_is_in_the_papers_regime(preset: str) -> None:
    cfg = sl.PRESETS[preset]
    for n_layer, n_head, n_embd, batch in sl.LADDERS[cfg["ladder"]].values():
        assert n_embd % n_head == 0
        p = sl.plan_size(n_layer, n_embd, batch, cfg)
        assert p["tokens"] >= 20 * p["N"]
        assert p["steps"] % 64 == 0 and p["local_warmup"] % 64 == 0  # whole intervals at H = 16 and 64
        assert 0 < p["local_warmup"] <= p["steps"] / 8
    assert len(sl.LADDERS[cfg["ladder"]]) >= 4
    # one corpus cap for every size: the held-out windows (the start of its last 5%) are the same for every model
    caps = {sl.run_config("x", "ddp", 1, size, 1e-3, 1234, cfg)["data"]["max_tokens"] for size in
            sl.LADDERS[cfg["ladder"]]}
    assert caps == {sl.corpus_tokens(cfg)}
    train_tokens = sl.corpus_tokens(cfg) * (1 - harness.DEFAULT_DATA["val_fraction"])
    largest = max(sl.plan_size(n_layer, n_embd, batch, cfg)["tokens"]
                  for n_layer, _, n_embd, batch in sl.LADDERS[cfg["ladder"]].values())
    # no run sees a token twice, but on the CPU: the largest size takes 1.1 passes over the 8M-token default corpus
    assert largest <= train_tokens * (1.11 if preset == "cpu" else 1.0)


def test_gpu_preset_is_sized_for_eight_minutes() -> None:
    # at the stated assumptions (GPU_TFLOPS sustained in bf16 by all runs together, STARTUP_S per run, 6 at a time)
    assert sl.estimate_seconds(sl.PRESETS["gpu"], sl.GPU_TFLOPS, sl.STARTUP_S) <= 8 * 60
    # the estimate is proportional to the work: the CPU preset at the CPU's measured rate is over an hour
    assert sl.estimate_seconds(sl.PRESETS["cpu"], sl.CPU_TFLOPS, sl.STARTUP_S) > 3600


def synthetic_runs(sizes: dict, gap: dict, seeds: tuple[int, ...] = (1234,), windows: int = 64) -> list[dict]:
    """Runs whose per-window losses follow L = 1 + 30·N^-0.3 (DDP) times ``gap[(mode, H)](N)``."""
    rng = np.random.default_rng(0)
    noise = 1 + 0.01 * rng.standard_normal(windows)
    runs = []
    for seed in seeds:
        for size, N in sizes.items():
            for (mode, H), g in {("ddp", 1): lambda n: 1.0, **gap}.items():
                per_window = list((1 + 30 * N ** -0.3) * g(N) * noise * (1 + 1e-3 * (seed != 1234)))
                runs.append(dict(mode=mode, H=H, size=size, seed=seed, lr=1e-3, local_warmup=0,
                                 non_embedding_params=N, params=N + 1000, steps=1024, tokens=21 * N,
                                 final_val_loss=float(np.mean(per_window)), per_window=per_window,
                                 train_seconds=1.0, num_syncs=0, state_bytes=0, process_seconds=0.2))
    return runs


def test_report_states_the_gap_its_trend_and_the_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sl, "RESULTS", tmp_path)
    sizes = {"25K": 2.5e4, "99K": 9.9e4, "0.22M": 2.2e5, "0.39M": 3.9e5}
    gap = {("average", 16): lambda n: 1.01, ("diloco", 16): lambda n: 1.03 * (n / 2.5e4) ** 0.01}
    runs = synthetic_runs(sizes, gap, seeds=(1234, 1))
    runs = [r for r in runs if r["seed"] == 1234 or r["size"] == "25K"]
    cfg = dict(sl.PRESETS["cpu"], seeds=[1234, 1])
    args = argparse.Namespace(out_name="sl", bootstrap=50)
    sl.report(runs, [], list(gap), list(sizes), cfg, "cpu", args, started=0.0)

    trend = {r["mode"]: r for r in harness.read_csv(tmp_path / "sl_trend.csv")}
    assert float(trend["local SGD H=16"]["ratio_0.39M"]) == pytest.approx(1.01)
    assert float(trend["local SGD H=16"]["slope"]) == pytest.approx(0.0, abs=1e-9)
    assert float(trend["DiLoCo H=16"]["slope"]) == pytest.approx(0.01, rel=1e-6)
    fits = [f for f in harness.read_csv(tmp_path / "sl_fits.csv") if f["source"] == "this run"]
    alpha = {f["mode"]: float(f["alpha"]) for f in fits if f["form"] == "A·N^α"}
    assert alpha["local SGD H=16"] == pytest.approx(alpha["DDP"], rel=1e-6)  # a constant factor keeps α
    md = (tmp_path / "sl.md").read_text()
    assert "| local SGD H=16 / DDP ≤ 1.02 at every size ≥ 0.1M | 0.22M 1.0100, 0.39M 1.0100 | yes |" in md
    assert "| DiLoCo H=16 / DDP ≤ 1.02 at every size ≥ 0.1M | 0.22M 1.0526, 0.39M 1.0587 | no |" in md
    assert "| DiLoCo H=16: ratio not growing with N | slope +0.0100 [0.010, 0.010] | no |" in md
    assert "| 25K | average | 16 | " in md  # the seed table: both seeds at the smallest size
    line = next(x for x in md.splitlines() if x.startswith("| local SGD H=16: ratio not growing with N |"))
    assert line.endswith("| yes |") and "0.0000" in line
    assert "| Charles et al. 2025 | data-parallel | A·N^α | -0.095 |" in md
    assert "runs' process time in total: 0.1 min" in md
    assert (tmp_path / "sl.png").exists()


def test_local_lr_table_scales_only_the_local_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sl, "RESULTS", tmp_path)
    runs = synthetic_runs({"25K": 2.5e4}, {("average", 16): lambda n: 1.05, ("diloco", 16): lambda n: 1.04})
    launched = []

    def launch(name: str, mode: str, H: int, size: str, lr: float, seed: int) -> dict:
        launched.append((mode, H, size, lr, seed))
        ddp = next(r for r in runs if r["mode"] == "ddp")
        return dict(final_val_loss=ddp["final_val_loss"] * (1 + lr))  # a known loss per lr

    sl.local_lr_table(runs, [0.5], launch, dict(sl.PRESETS["cpu"]), started=0.0)
    assert sorted(launched) == [("average", 16, "25K", 5e-4, 1234), ("diloco", 16, "25K", 5e-4, 1234)]
    rows = harness.read_csv(tmp_path / "scaling_law_local_lr.csv")
    ratio = {(r["mode"], float(r["lr_factor"])): float(r["loss_ratio_to_ddp"]) for r in rows}
    assert ratio == pytest.approx({("average", 1.0): 1.05, ("average", 0.5): 1.0005, ("diloco", 1.0): 1.04,
                                   ("diloco", 0.5): 1.0005})
