"""``benchmarks/edge/edge.py``'s accounting on hand-written job records (no processes; the benchmark takes minutes): tokens
over time, idle fractions, useful tokens and goodput, interpolation of the loss curves, time to a target loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "edge"))

import edge

CFG = dict(edge.PRESETS["default"], speeds=[1.0, 0.5], step_seconds=0.1, batch_size=2, block_size=5)  # 10 tok/step


def _attempt(step: int, weight: float, committed: bool = True) -> dict:
    return {"step": step, "weight": weight, "committed": committed, "seconds": 0.01, "participants": 2}


def _federated_run() -> dict:
    # device 0 (1×): 8 steps at 0.1 s from t=10; syncs committed at 4 and 8 (weight > 0), snapshots after each.
    # device 1 (½×): first incarnation 2 steps at 0.2 s, synced at 2, killed at step 3 (1 step lost); the restart
    # heals at step 4 (weight 0), trains 2 steps, syncs at 6 (an attempt at 6 failed first).
    d0 = dict(device=0, start_step=0, heals=0, bytes_sent=1000, steps=[[10 + 0.1 * s, s] for s in range(1, 9)],
              attempts=[_attempt(0, 0.0), _attempt(4, 40.0), _attempt(8, 40.0)],
              snapshots=[dict(t=10.0, step=0, val_loss=5.0), dict(t=10.4, step=4, val_loss=4.0),
                         dict(t=10.8, step=8, val_loss=3.0)])
    d1a = dict(device=1, start_step=0, heals=0, bytes_sent=300, steps=[[10 + 0.2 * s, s] for s in range(1, 4)],
               attempts=[_attempt(0, 0.0), _attempt(2, 20.0)], snapshots=[], killed=dict(step=3))
    d1b = dict(device=1, start_step=4, heals=1, bytes_sent=200, steps=[[10.4 + 0.2 * s, 4 + s] for s in range(1, 3)],
               attempts=[_attempt(4, 0.0), _attempt(6, 20.0, committed=False), _attempt(6, 20.0)], snapshots=[])
    return dict(run="timed", records=[d0, d1a, d1b], restarts=[{}])


def test_tokens_at_count_every_incarnations_own_steps():
    run = _federated_run()
    assert edge.tokens_at(run, CFG, 10.0) == 0
    # by t=10.4: device 0 took 4 steps, device 1's first incarnation 2 (its 3rd ends at 10.6)
    assert edge.tokens_at(run, CFG, 10.4) == (4 + 2) * 10
    # by the end: 8 + 3 + 2 steps (the lost step was paid for: it counts as tokens trained on)
    assert edge.tokens_at(run, CFG, 11.0) == 13 * 10
    ddp = dict(run="DDP", records=[dict(steps=[[1.0, 1], [2.0, 2]])])
    assert edge.tokens_at(ddp, CFG, 1.5) == 1 * 10 * 2  # the world's two devices


def test_device_rows_idle_useful_tokens_and_bytes_by_hand():
    rows = edge.device_rows(_federated_run(), CFG)
    wall = 10.8 - 10.1  # first step end to last step end of the run
    d0, d1 = rows
    assert d0["steps"] == 8 and math.isclose(d0["idle_fraction"], 1 - 8 * 0.1 / wall)
    assert d0["useful_tokens"] == 8 * 10 and d0["bytes_sent"] == 1000
    # device 1: synced 2 steps at step 2 (the step-0 join weighs 0); the restart's steps 5-6 entered the commit at 6
    assert d1["steps"] == 5 and math.isclose(d1["idle_fraction"], 1 - 5 * 0.2 / wall)
    assert d1["useful_tokens"] == (2 + 2) * 10 and d1["bytes_sent"] == 500 and d1["heals"] == 1
    assert d1["incarnations"] == 2


def test_curve_interpolation_and_time_to_target():
    points = edge.curve(_federated_run(), CFG)
    assert [p["seconds"] for p in points] == [0.0, pytest_approx(0.3), pytest_approx(0.7)]
    assert [p["val_loss"] for p in points] == [5.0, 4.0, 3.0]
    assert math.isclose(edge.at(points, "seconds", 0.5), 3.5)
    assert math.isnan(edge.at(points, "seconds", 5.0))
    assert math.isclose(edge.time_to(points, 3.5), 0.5)
    assert math.isnan(edge.time_to(points, 2.0))
    assert edge.time_to(points, 6.0) == 0.0


def test_summary_goodput_and_speedup_by_hand():
    ddp = dict(run="DDP", restarts=[], records=[dict(
        global_step=4, bytes_sent=4000, steps=[[20 + 1.0 * s, s] for s in range(1, 5)],
        snapshots=[dict(t=20.0, step=0, val_loss=5.0), dict(t=24.0, step=4, val_loss=3.5)])])
    rows, devices, curves = edge.summarize(CFG, [ddp, _federated_run()])
    by = {r["run"]: r for r in rows}
    # DDP's final loss 3.5 is reached after 3.0 s (from its first step end at 21: 24 - 21); the timed run at 0.5 s
    assert math.isclose(by["DDP"]["seconds_to_ddp_final_loss"], 3.0)
    assert math.isclose(by["timed"]["seconds_to_ddp_final_loss"], 0.5)
    assert math.isclose(by["timed"]["speedup_vs_ddp"], 6.0)
    # goodput: useful tokens / what the devices could do at nominal speed in the wall clock
    wall = 0.7
    could = (wall / 0.1 + wall / 0.2) * 10
    assert math.isclose(by["timed"]["goodput"], (80 + 40) / could)
    assert math.isclose(by["timed"]["bytes_per_device"], (1000 + 500) / 2)
    assert by["timed"]["restarts"] == 1 and by["timed"]["heals"] == 1
    # DDP: both devices take every step; the 1× one idles while the ½× one works and the all-reduce runs
    ddp_fast = next(d for d in devices if d["run"] == "DDP" and d["device"] == 0)
    assert math.isclose(ddp_fast["idle_fraction"], 1 - 4 * 0.1 / 3.0)
    assert {c["run"] for c in curves} == {"DDP", "timed"}


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x)


def test_straggler_run_counts_idle_and_goodput_at_its_own_speeds():
    # the straggler legs run at their own speeds (here both devices 1×), not the preset's 1× / ½×
    run = dict(_federated_run(), run="straggler", speeds=[1.0, 1.0])
    wall = 0.7
    d0, d1 = edge.device_rows(run, CFG)
    assert d1["speed"] == 1.0 and math.isclose(d1["idle_fraction"], 1 - 5 * 0.1 / wall)
    rows, devices, _ = edge.summarize(CFG, [run])  # no DDP leg: no target loss, no speed-up
    (row,) = rows
    assert math.isnan(row["speedup_vs_ddp"]) and math.isnan(row["seconds_to_ddp_final_loss"])
    assert math.isclose(row["goodput"], (80 + 40) / (2 * wall / 0.1 * 10))
    # both devices are fast here: their mean idle fraction
    assert math.isclose(row["fast_idle_fraction"], (d0["idle_fraction"] + d1["idle_fraction"]) / 2)


LABELS = {"timed": "s", "whole": "w", "churn": "s+c", "async": "w a", "async_churn": "w a+c", "straggler": "st",
          "straggler_async": "st a"}


def _row(run: str, loss: float, **kw) -> dict:
    return dict(dict(run=run, final_val_loss=loss, speedup_vs_ddp=float("nan"), fast_idle_fraction=0.05,
                     goodput=0.9), **kw)


def test_relative_losses_churn_and_straggler_against_their_twins():
    rows = [_row("s", 2.0), _row("w", 2.5), _row("s+c", 2.1), _row("w a", 2.4), _row("w a+c", 2.424),
            _row("st", 3.0), _row("st a", 2.7)]
    edge.relative_losses(rows, LABELS)
    by = {r["run"]: r for r in rows}
    assert math.isclose(by["s+c"]["final_loss_vs_twin"], 2.1 / 2.0)  # synchronous churn vs streaming
    assert math.isclose(by["w a+c"]["final_loss_vs_twin"], 2.424 / 2.4)  # async churn vs async without churn
    assert math.isclose(by["st a"]["final_loss_vs_twin"], 2.7 / 3.0)  # async straggler vs synchronous straggler
    assert math.isnan(by["w"]["final_loss_vs_twin"]) and math.isnan(by["st"]["final_loss_vs_twin"])
    assert math.isclose(by["w a"]["final_loss_vs_time_based_whole"], 2.4 / 2.5)
    assert math.isclose(by["w"]["final_loss_vs_time_based"], 2.5 / 2.0)
    partial = [_row("w a", 2.4), _row("w a+c", 2.5)]  # a partial run without the synchronous legs
    edge.relative_losses(partial, LABELS)
    assert math.isnan(partial[0]["final_loss_vs_time_based_whole"])
    assert math.isclose(partial[1]["final_loss_vs_twin"], 2.5 / 2.4)


def test_targets_name_the_async_churn_and_straggler_verdicts():
    rows = [_row("w a", 2.4), _row("w a+c", 2.424, goodput=0.93), _row("st", 3.0, goodput=0.7, fast_idle_fraction=0.3),
            _row("st a", 2.7, goodput=0.96, fast_idle_fraction=0.04)]
    edge.relative_losses(rows, LABELS)
    text = " ".join(edge.targets({r["run"]: r for r in rows}, LABELS))
    assert "async_sync with churn costs +1.0% final loss against the same run without it (≤ 2%: met)" in text
    assert "with async_sync: goodput 0.960 (≥ 0.95: met), fast devices idle 4.0%" in text
    assert "synchronous: goodput 0.700, fast devices idle 30.0%" in text
    rows[1]["final_val_loss"], rows[3]["goodput"] = 2.5, 0.94
    edge.relative_losses(rows, LABELS)
    text = " ".join(edge.targets({r["run"]: r for r in rows}, LABELS))
    assert "(≤ 2%: missed)" in text and "(≥ 0.95: missed)" in text
    assert "Churn (streaming" not in text  # a leg that did not run says nothing
    # no DDP and no synchronous whole-model run here: the async sentence gives only what was measured
    assert "async_sync (whole model): fast devices idle 5.0% (met)." in text and "nan" not in text
