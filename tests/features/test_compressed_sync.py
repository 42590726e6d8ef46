"""Compressed sync through LocalSGDStrategy; the codecs and the two-phase all-reduce: engine/test_compression.py."""

from __future__ import annotations

import math

from lightning_localsgd.engine.codecs import payload_bytes


def test_strategy_int8_sync_sends_a_quarter(tmp_path):
    from _launch import run_tiny

    ranks = run_tiny(tmp_path, devices=2, sync_every=2, steps=4, compression="int8")
    numel = 49  # two syncs, each one compressed copy: 2 chunks of 25 values with one scale each
    assert ranks[0]["info"]["bytes_sent"] == 2 * 2 * payload_bytes("int8", math.ceil(numel / 2))
    assert math.isclose(payload_bytes("int8", 10**6) / (4 * 10**6), 0.25, rel_tol=0.02)
    assert max(float((a - b).abs().max()) for a, b in zip(ranks[0]["steps"][1].values(), ranks[1]["steps"][1].values())) == 0.0
