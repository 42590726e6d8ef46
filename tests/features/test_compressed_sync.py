"""Compressed sync through LocalSGDStrategy; the codecs and their exchanges (two-phase all-reduce, all-gather):
engine/test_compression.py."""

from __future__ import annotations

import math

from lightning_localsgd.engine.codecs import payload_bytes
from workers.tiny import TOPK_TEST


def test_strategy_int8_sync_sends_a_quarter(tmp_path):
    from _launch import run_tiny

    ranks = run_tiny(tmp_path, devices=2, sync_every=2, steps=4, compression="int8")
    numel = 49  # two syncs, each one compressed copy: 2 chunks of 25 values with one scale each
    assert ranks[0]["info"]["bytes_sent"] == 2 * 2 * payload_bytes("int8", math.ceil(numel / 2))
    assert math.isclose(payload_bytes("int8", 10**6) / (4 * 10**6), 0.25, rel_tol=0.02)
    assert max(float((a - b).abs().max()) for a, b in zip(ranks[0]["steps"][1].values(), ranks[1]["steps"][1].values())) == 0.0


def test_strategy_topk_fit_matches_the_hand_reference(tmp_path):
    """A Lightning fit with sparse syncs (top 4 of each 64 values, 2 bits, error feedback decayed by 0.95) follows the
    hand reference's all-gathered sparse mean step by step, and moves other values than the plain mean would."""
    from _launch import max_diff, run_tiny
    from reference import simulate

    steps, h = 6, 2
    ranks = run_tiny(tmp_path, devices=2, sync_every=h, steps=steps, compression=TOPK_TEST)
    history, final, _ = simulate(2, 1, sync_every=h, outer="average", steps=steps, compression=TOPK_TEST)
    for r, dump in enumerate(ranks):
        assert len(dump["steps"]) == steps
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[r]) <= 1e-6, (r, b, max_diff(got, want[r]))
        assert max_diff(dump["final"], final[r]) <= 1e-6
        # 3 syncs, each one payload of the 49 values, all-gathered: per chunk of 64 (one here) 4 entries of 2 bits,
        # 4 indices of 6 bits, one fp32 scale
        assert dump["info"]["bytes_sent"] == 3 * payload_bytes(TOPK_TEST, 49) == 3 * (1 + 3 + 4)
    plain, _, _ = simulate(2, 1, sync_every=h, outer="average", steps=steps)
    assert max_diff(plain[h - 1][0], history[h - 1][0]) > 1e-3  # sparse: not the plain mean
