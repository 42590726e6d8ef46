"""``benchmarks/chaos/chaos.py``'s schedule and accounting on hand-written job records (no processes; the benchmark itself
takes minutes): when kills fall, and goodput's useful / lost / skipped group-steps counted by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "chaos"))

import chaos


def test_kill_schedule_every_k_syncs_while_k_syncs_remain():
    cfg = dict(chaos.PRESETS["default"])  # H=16, 512 steps = 32 syncs, a kill every 8 syncs, 3 groups
    kills = chaos.kill_schedule(cfg, seed=0)
    assert [k["sync"] for k in kills] == [8, 16, 24]  # not at 32: no sync would be left to rejoin
    assert sorted(k["group"] for k in kills) == [0, 1, 2]  # the victims take turns
    for k in kills:
        if k["kind"] == "sync":
            assert k["step"] == 16 * k["sync"]
        else:
            assert 16 * k["sync"] < k["step"] < 16 * (k["sync"] + 1)
    assert kills == chaos.kill_schedule(cfg, seed=0) and kills != chaos.kill_schedule(cfg, seed=1)


def _attempt(step: int, weight: float, committed: bool = True) -> dict:
    return {"step": step, "weight": weight, "committed": committed, "seconds": 0.01, "participants": 3}


def test_useful_and_lost_steps_by_hand():
    # H = 4; trained from 0, synced at 4 and 8, killed mid-interval at step 10: 8 useful, 2 lost
    killed = {"start_step": 0, "killed": {"kind": "interval", "step": 10},
              "attempts": [_attempt(0, 0.0), _attempt(4, 1.0), _attempt(8, 1.0)],
              "steps": [[0.1 * s, s] for s in range(1, 11)]}
    assert chaos.useful_and_lost(killed) == (8, 2)
    # killed inside the sync of step 12 (its step 12 ran but was not recorded yet): 4 lost
    in_sync = dict(killed, killed={"kind": "sync", "step": 12}, steps=[[0.1 * s, s] for s in range(1, 12)])
    assert chaos.useful_and_lost(in_sync) == (8, 4)
    # restarted, healed at 12 (weight 0, no work), synced at 16 (a failed attempt first) and 20: 8 useful
    healed = {"start_step": 12, "killed": None,
              "attempts": [_attempt(12, 0.0), _attempt(16, 1.0, committed=False), _attempt(16, 1.0), _attempt(20, 1.0)],
              "steps": [[0.1 * s, s] for s in range(13, 21)]}
    assert chaos.useful_and_lost(healed) == (8, 0)


def test_step_durations_skip_gaps():
    job = {"steps": [[1.0, 1], [1.5, 2], [3.0, 3], [10.0, 12], [10.2, 13]]}
    assert chaos.step_durations(job) == pytest.approx({2: 0.5, 3: 1.5, 13: 0.2})  # not step 12: it follows a gap
